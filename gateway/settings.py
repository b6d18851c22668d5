"""Typed, frozen settings from one YAML file (+ ``${ENV}`` references), validated all at once.

Every key is documented here field by field; README.md's configuration table is generated from the same
descriptions (``gateway check --print-keys``). Relative paths are relative to the settings file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from cryptography import x509
from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from gateway.config_source import (
    ConfigError,
    ConfigErrors,
    LocatedDocument,
    parse_duration,
    parse_yaml,
    validate,
)

Duration = Annotated[float, BeforeValidator(parse_duration)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: The embedded default, used by ``make demo`` and when no --config is given.
DEFAULT_SETTINGS_FILE = Path(__file__).parent / "default" / "gateway.yaml"


class _Section(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(path: str | None, info: pydantic.ValidationInfo) -> Path | None:
    if path is None:
        return None
    base = Path((info.context or {}).get("base_dir", "."))
    return (base / path).resolve() if not Path(path).is_absolute() else Path(path)


def _require_file(path: Path, info: pydantic.ValidationInfo) -> None:
    if (info.context or {}).get("require_files", True) and not path.is_file():
        raise ValueError(f"file not found: {path}")


def _paths_relative_to_settings(*names: str) -> Callable[..., Any]:
    def resolve(value: Any, info: pydantic.ValidationInfo) -> Any:
        if isinstance(value, list):
            return [_resolve(str(v), info) for v in value]
        return _resolve(str(value), info) if value is not None else None

    return field_validator(*names, mode="before")(resolve)


class ServerSettings(_Section):
    listen: str = Field("127.0.0.1:8080", description="Address the gateway listens on (host:port).")
    workers: int = Field(
        1, ge=1, le=64, description="Worker processes (more than 1 needs a redis:// session store)."
    )
    threads: int = Field(
        32, ge=1, le=512, description="Threads per worker (each serves one request at a time)."
    )
    public_origin: str = Field(
        "http://127.0.0.1:8080",
        description="The portal's main origin as users see it (scheme://host[:port]): redirects, audience.",
    )
    trusted_proxies: list[Network] = Field(
        default_factory=list,
        description="Networks whose X-Forwarded-For/-Proto/-Host are believed (e.g. the load balancer).",
    )
    tls_terminators: list[Network] = Field(
        default_factory=list,
        description="Networks (e.g. the nginx in front) whose X-SSL-Client-* card headers are believed.",
    )
    language: Literal["fr", "en"] = Field("fr", description="Page language when the browser states none.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        return value

    @field_validator("public_origin")
    @classmethod
    def _origin(cls, value: str) -> str:
        if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+$", value):
            raise ValueError(f"{value!r} is not an origin (scheme://host[:port], no path)")
        return value.rstrip("/")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class UpstreamSettings(_Section):
    url: str = Field(description="The portal behind the gateway (http[s]://host:port).")
    connect_timeout: Duration = Field(2.0, description="Time to open a connection to the portal.")
    read_timeout: Duration = Field(30.0, description="Longest silence while waiting for the portal's bytes.")
    pool_size: int = Field(64, ge=1, le=4096, description="Keep-alive connections kept per worker.")
    host_header: Literal["upstream", "preserve"] = Field(
        "upstream",
        description="Host sent to the portal: its own ('upstream') or the client's ('preserve').",
    )
    ca_file: Path | None = Field(None, description="CA bundle to verify an https portal (default: system).")

    _resolve_paths = _paths_relative_to_settings("ca_file")

    @field_validator("ca_file", mode="after")
    @classmethod
    def _ca_exists(cls, value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        if value is not None:
            _require_file(value, info)
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+/?$", value):
            raise ValueError(f"{value!r} is not an http(s) origin (scheme://host[:port])")
        return value.rstrip("/")


class AssertionSettings(_Section):
    key_file: Path = Field(
        description="PEM EC P-256 private key signing X-Gateway-Assertion (shared by every instance)."
    )
    lifetime: Duration = Field(60.0, description="Validity of one assertion.")
    issuer: str = Field("cps-gateway", description="`iss` of the assertion.")
    audience: str = Field("portal", description="`aud` of the assertion: the portal checks it.")

    _resolve_paths = _paths_relative_to_settings("key_file")

    @field_validator("key_file", mode="after")
    @classmethod
    def _key_exists(cls, value: Path, info: pydantic.ValidationInfo) -> Path:
        _require_file(value, info)
        return value


class SessionSettings(_Section):
    store: str = Field("memory://", description="memory:// (one process only) or redis://host:port/db.")
    idle_timeout: Duration = Field(1800.0, description="A session unused this long ends (PSC: 30 min).")
    absolute_timeout: Duration = Field(
        14400.0, description="A session ends this long after login (PSC: 4 h)."
    )
    cookie_name: str = Field("__Host-gateway-session", description="Session cookie; must start with __Host-.")

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if not value.startswith(("memory://", "redis://", "rediss://", "unix://")):
            raise ValueError("use memory:// or a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("cookie_name")
    @classmethod
    def _cookie(cls, value: str) -> str:
        if not re.match(r"^__Host-[A-Za-z0-9_-]+$", value):
            raise ValueError("the session cookie name must start with __Host- (Secure, no Domain, Path=/)")
        return value

    @model_validator(mode="after")
    def _order(self) -> SessionSettings:
        if self.idle_timeout > self.absolute_timeout:
            raise ValueError("idle_timeout cannot be longer than absolute_timeout")
        return self


class AuditSettings(_Section):
    file: Path | None = Field(None, description="Append-only JSON-lines audit file (hash-chained).")

    _resolve_paths = _paths_relative_to_settings("file")


def _origin_value(value: str) -> str:
    if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+/?$", value):
        raise ValueError(f"{value!r} is not an origin (scheme://host[:port], no path)")
    return value.rstrip("/")


def _check_certificates(path: Path, info: pydantic.ValidationInfo) -> None:
    """The file exists and holds at least one PEM certificate (checked now: start-up errors name the key)."""
    if not (info.context or {}).get("require_files", True) and not path.is_file():
        return
    _require_file(path, info)
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM certificate file ({exc})") from None


class CrlSourceSettings(_Section):
    url_or_file: str = Field(
        description="Where this CA's CRL is published: http(s) URL (ANS distribution point) or a local file."
    )
    issuer: Path = Field(description="PEM certificate of the CA that signs this CRL.")

    _resolve_paths = _paths_relative_to_settings("issuer")

    @field_validator("url_or_file", mode="before")
    @classmethod
    def _location(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        # A file path is relative to the settings file, like every other path; URLs are kept as they are.
        if isinstance(value, str) and not value.startswith(("http://", "https://")):
            return str(_resolve(value, info))
        return value

    @field_validator("issuer", mode="after")
    @classmethod
    def _issuer(cls, value: Path, info: pydantic.ValidationInfo) -> Path:
        _check_certificates(value, info)
        return value


class CardSettings(_Section):
    """CPS card login: by TLS client certificate on a dedicated host, and by PKCS#11 challenge."""

    trust_anchors: list[Path] = Field(
        description="PEM files of the IGC-Santé roots card certificates must chain to (never the dev PKI in production)."
    )
    intermediates: list[Path] = Field(
        default_factory=list,
        description="PEM files of the IGC-Santé intermediate CAs that issue card certificates (… PERSONNES).",
    )
    crls: list[CrlSourceSettings] = Field(
        default_factory=list,
        description="One CRL per CA of the chain ({url_or_file, issuer}); a CA without a fresh CRL refuses every card.",
    )
    crl_refresh: Duration = Field(300.0, gt=0, description="How often CRLs are reloaded in the background.")
    crl_grace: Duration = Field(
        0.0,
        ge=0,
        description="How long past its nextUpdate a CRL is still used when no newer one could be fetched.",
    )
    login_origin: str = Field(
        description="Origin of the dedicated card-login host (nginx asking for the client certificate), "
        "e.g. https://carte.portail.fr; the login page's card button leads there."
    )
    challenge_ttl: Duration = Field(
        60.0, gt=0, le=600, description="Lifetime of a challenge nonce (`gateway card login`)."
    )
    nonce_store: str | None = Field(
        None,
        description="memory:// or redis://… for challenge nonces and card-host hand-offs (default: sessions.store).",
    )

    _resolve_paths = _paths_relative_to_settings("trust_anchors", "intermediates")

    @field_validator("trust_anchors", "intermediates", mode="after")
    @classmethod
    def _certificates(cls, value: list[Path], info: pydantic.ValidationInfo) -> list[Path]:
        for path in value:
            _check_certificates(path, info)
        return value

    @field_validator("trust_anchors")
    @classmethod
    def _some_anchor(cls, value: list[Path]) -> list[Path]:
        if not value:
            raise ValueError("name at least one trust anchor")
        return value

    @field_validator("login_origin")
    @classmethod
    def _login_origin(cls, value: str) -> str:
        return _origin_value(value)

    @field_validator("nonce_store")
    @classmethod
    def _nonce_store(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("memory://", "redis://", "rediss://", "unix://")):
            raise ValueError("use memory:// or a redis://, rediss:// or unix:// URL")
        return value


class Settings(_Section):
    """The whole configuration of one gateway deployment."""

    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    upstream: UpstreamSettings
    policies: list[Path] = Field(description="Policy files or directories of *.yaml files, in order.")
    assertion: AssertionSettings
    sessions: SessionSettings = Field(default_factory=SessionSettings)  # type: ignore[arg-type]
    audit: AuditSettings = Field(default_factory=AuditSettings)  # type: ignore[arg-type]
    card: CardSettings | None = Field(None, description="CPS card login (absent: no card login).")

    _resolve_paths = _paths_relative_to_settings("policies")

    @model_validator(mode="after")
    def _memory_store_is_one_process(self) -> Settings:
        if self.sessions.store.startswith("memory://") and self.server.workers > 1:
            raise ValueError(
                "sessions.store memory:// lives in one process: set server.workers to 1 or use a redis:// store"
            )
        return self

    @model_validator(mode="after")
    def _card_nonces_shared_like_sessions(self) -> Settings:
        store = self.card.nonce_store if self.card else None
        if store and store.startswith("memory://") and self.server.workers > 1:
            raise ValueError(
                "card.nonce_store memory:// lives in one process: use redis:// with several workers"
            )
        return self

    @field_validator("policies", mode="after")
    @classmethod
    def _policies(cls, value: list[Path]) -> list[Path]:
        if not value:
            raise ValueError("name at least one policy file or directory")
        missing = [str(p) for p in value if not p.exists()]
        if missing:
            raise ValueError(f"not found: {', '.join(missing)}")
        return value


def load_settings(
    path: Path, environ: dict[str, str] | None = None, *, require_files: bool = True
) -> Settings:
    """Read, substitute ``${ENV}`` references, validate; raise ConfigErrors with every error at once.

    ``require_files=False`` accepts missing key files (``gateway dev init`` is about to create them).
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigErrors(
            [ConfigError(file, None, "", f"cannot read the settings file: {exc.strerror}")]
        ) from None
    document = parse_yaml(text, file)
    document = _substitute_environment(document, os.environ if environ is None else environ)
    context = {"base_dir": str(path.parent.resolve()), "require_files": require_files}
    return validate(Settings, document, context=context)


def _substitute_environment(document: LocatedDocument, environ: Any) -> LocatedDocument:
    errors: list[ConfigError] = []

    def walk(value: Any, key_path: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*key_path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*key_path, i)) for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:

            def replace(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in environ:
                    errors.append(document.error(key_path, f"environment variable {name} is not set"))
                    return ""
                return str(environ[name])

            return _ENV_REFERENCE.sub(replace, value)
        return value

    data = walk(document.data, ())
    if errors:
        raise ConfigErrors(errors)
    return LocatedDocument(document.file, data, document.lines)


def policy_files(settings: Settings) -> list[Path]:
    """The policy files named by the settings, directories expanded to their *.yaml / *.yml files."""
    files: list[Path] = []
    for entry in settings.policies:
        if entry.is_dir():
            files.extend(sorted(p for p in entry.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()))
        else:
            files.append(entry)
    return files


def documented_keys(
    model: type[pydantic.BaseModel] = Settings, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(key, default, description) for every settings key, for the README and ``gateway check``."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        optional = [a for a in typing.get_args(annotation) if a is not type(None)] if is_union else []
        if len(optional) == 1 and isinstance(optional[0], type) and issubclass(optional[0], _Section):
            annotation = optional[0]  # an optional section (``card``): document its keys too
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            rows.extend(documented_keys(annotation, f"{key}."))
            continue
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())  # type: ignore[call-arg]
        else:
            default = repr(field.default)
        rows.append((key, default, field.description or ""))
    return rows
