"""Typed, frozen settings from one YAML file (+ ``${ENV}`` references), validated all at once.

Every key is documented here field by field; README.md's configuration table is generated from the same
descriptions (``gateway settings keys``). Relative paths are relative to the settings file, except in the
embedded default (the demo), whose paths are relative to the working directory: it runs from an installed
package as well as from the source checkout, and keeps what it generates (``gateway dev init``: dev PKI,
assertion key, example policies; the audit log) where it is run.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pydantic
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pydantic import ConfigDict, Field, field_validator, model_validator

from gateway.audit import read_audit_key
from gateway.config_source import (
    ConfigError,
    ConfigErrors,
    Duration,
    LocatedDocument,
    parse_yaml,
    validate,
)
from gateway.redis_client import check_store_url
from gateway.wsgi import normalise_host

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


def _files_must_exist(*names: str) -> Callable[..., Any]:
    """The named path fields, when given, name existing files (unless the context says they are coming)."""

    def check(value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        if value is not None:
            _require_file(value, info)
        return value

    return field_validator(*names, mode="after")(check)


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return value


def _origin_value(value: str, what: str = "an origin (scheme://host[:port], no path)") -> str:
    """scheme://host[:port] with an optional trailing slash, returned without it."""
    if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+/?$", value):
        raise ValueError(f"{value!r} is not {what}")
    return value.rstrip("/")


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
        description=(
            "Networks the card-login host's nginx connects from; its X-SSL-Client-* headers are believed "
            "only from there, with card.host_secret, for the Host of card.login_origin."
        ),
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Host names the gateway answers for besides those of public_origin and card.login_origin; "
            "any other Host is refused (400, audited), in proxy and forward-auth mode alike."
        ),
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Other sites (scheme://host[:port]) whose pages may POST/PUT/PATCH/DELETE to authenticate "
        "routes; public_origin always may (others are refused as cross-site, see policies/README.md).",
    )
    language: Literal["fr", "en"] = Field("fr", description="Page language when the browser states none.")
    support_contact: str | None = Field(
        None,
        max_length=200,
        pattern=r"^[^\x00-\x1f]*$",
        description="Whom a professional should contact when refused (e.g. 'l'assistance au 01 23 45 67 89'), "
        "shown as is on every refusal page; none: no such line.",
    )
    pid_file: Path | None = Field(
        None, description="File where the master writes its PID (`gateway reload` signals that process)."
    )
    header_timeout: Duration = Field(
        10.0,
        description="A request's head (request line and headers) must arrive within this time of its first byte; "
        "else 408 and the connection closes. Heads are read by the worker's poller: a slow one holds no thread.",
    )
    body_timeout: Duration = Field(
        30.0,
        description="Longest silence while reading a request body or sending a response to the client; a body "
        "must also keep up body_min_rate once this time has passed. Past either: 408 (or the connection cut).",
    )
    body_min_rate: int = Field(
        500, ge=1, description="Bytes per second a request body must average after its first body_timeout."
    )
    keepalive_timeout: Duration = Field(
        75.0,
        description="How long a connection may stay open without sending a request (new or kept alive); "
        "it waits in the worker's poller, holding no thread.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Open connections per worker; when full, the longest-idle one is closed to admit a new one.",
    )

    _resolve_paths = _paths_relative_to_settings("pid_file")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _check_listen(value)

    @field_validator("public_origin")
    @classmethod
    def _origin(cls, value: str) -> str:
        if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+$", value):
            raise ValueError(f"{value!r} is not an origin (scheme://host[:port], no path)")
        return value.rstrip("/")

    @field_validator("allowed_origins")
    @classmethod
    def _allowed_origins(cls, value: list[str]) -> list[str]:
        return [_origin_value(origin).lower() for origin in value]

    @property
    def trusted_origins(self) -> frozenset[str]:
        """Origins whose pages may send state-changing requests: the portal's own and the allowed ones."""
        return frozenset({self.public_origin.lower(), *self.allowed_origins})

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: list[str]) -> list[str]:
        bad = [host for host in value if normalise_host(host) != host.lower().rstrip(".")]
        if bad:
            raise ValueError(f"not host names (no scheme, port or path): {', '.join(map(repr, bad))}")
        return [host.lower().rstrip(".") for host in value]

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
    max_concurrent: int | None = Field(
        None,
        ge=1,
        description="Portal requests one worker forwards at once; beyond it a fast 503 page. Must stay below "
        "server.threads so the gateway's own pages always find a thread (default: threads minus a quarter).",
    )
    host_header: Literal["upstream", "preserve"] = Field(
        "upstream",
        description="Host sent to the portal: its own ('upstream') or the client's ('preserve').",
    )
    ca_file: Path | None = Field(None, description="CA bundle to verify an https portal (default: system).")

    _resolve_paths = _paths_relative_to_settings("ca_file")
    _files_exist = _files_must_exist("ca_file")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _origin_value(value, "an http(s) origin (scheme://host[:port])")


class AssertionSettings(_Section):
    key_file: Path = Field(
        description="PEM EC P-256 private key signing X-Gateway-Assertion (shared by every instance)."
    )
    lifetime: Duration = Field(60.0, description="Validity of one assertion.")
    issuer: str = Field("cps-gateway", description="`iss` of the assertion.")
    audience: str = Field("portal", description="`aud` of the assertion: the portal checks it.")

    _resolve_paths = _paths_relative_to_settings("key_file")
    _files_exist = _files_must_exist("key_file")


class SessionSettings(_Section):
    store: str = Field(
        "memory://",
        description=(
            "memory:// (one process only), redis://host:port/db (rediss://, unix://) or, for failover, "
            "redis+sentinel://host:port[,host:port…]/service[/db] (Redis Sentinel; Redis Cluster is not supported)."
        ),
    )
    idle_timeout: Duration = Field(1800.0, description="A session unused this long ends (PSC: 30 min).")
    absolute_timeout: Duration = Field(
        14400.0, description="A session ends this long after login (PSC: 4 h)."
    )
    cookie_name: str = Field("__Host-gateway-session", description="Session cookie; must start with __Host-.")
    local_cache_seconds: float = Field(
        1.0,
        ge=0,
        le=10,
        description=(
            "With redis://, a session read less than this many seconds ago in this process is not read again; "
            "revocations made by another instance take effect within it. 0: always ask Redis."
        ),
    )

    _store = field_validator("store")(check_store_url)

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


class LimitsSettings(_Section):
    storage: str | None = Field(
        None,
        description="memory:// or a Redis URL as for sessions.store, for counters and bans (default: sessions.store).",
    )
    login_requests_per_ip: str = Field(
        "120/minute",
        description="Requests to the login endpoints per client IP (flask-limiter; e.g. challenges), but PSC's callback.",
    )
    login_attempts_per_ip: str = Field("20/minute", description="Login attempts allowed per client IP.")
    backchannel_logout_requests_per_ip: str = Field(
        "120/minute",
        description="POSTs to the e-CPS back-channel logout endpoint per client IP (PSC's servers send them).",
    )
    login_attempts_per_identity: str = Field(
        "10/minute",
        description="Login attempts allowed per card, counted once its holder proved it (key and trusted chain).",
    )
    ban_after: int = Field(5, ge=1, description="Failed logins within ban_window that ban the IP / identity.")
    ban_window: Duration = Field(600.0, description="Window in which failed logins are counted.")
    ban_duration: Duration = Field(900.0, description="How long a ban lasts (at least ban_window).")

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        return None if value is None else check_store_url(value)

    @field_validator(
        "login_requests_per_ip",
        "login_attempts_per_ip",
        "login_attempts_per_identity",
        "backchannel_logout_requests_per_ip",
    )
    @classmethod
    def _rate(cls, value: str) -> str:
        if not re.match(r"^\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?$", value.strip()):
            raise ValueError(f"{value!r} is not a rate such as 20/minute")
        return value

    @model_validator(mode="after")
    def _ban_covers_window(self) -> LimitsSettings:
        if self.ban_duration < self.ban_window:
            raise ValueError("ban_duration must be at least ban_window")
        return self


class AuditSettings(_Section):
    file: Path | None = Field(None, description="Append-only JSON-lines audit file (hash-chained).")
    key_file: Path | None = Field(
        None,
        description=(
            "Secret of at least 32 bytes (`openssl rand -hex 32`) keying the chain with HMAC-SHA256: without "
            "it nobody can rewrite the log undetected; `gateway audit verify --key` checks it. None: SHA-256."
        ),
    )
    head_interval: Duration = Field(
        60.0,
        gt=0,
        description="How often the master logs and exports the audit head (sequence + hash) to keep off-host.",
    )

    _resolve_paths = _paths_relative_to_settings("file", "key_file")

    @field_validator("key_file", mode="after")
    @classmethod
    def _key(cls, value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        if value is None or not (info.context or {}).get("require_files", True):
            return value
        try:
            read_audit_key(value)
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror}") from None
        return value


class MetricsSettings(_Section):
    listen: str = Field(
        description="Prometheus /metrics address (host:port, e.g. 127.0.0.1:9108), separate from the gateway's"
        " own listener. Without a metrics section no metrics are served.",
    )

    _listen = field_validator("listen")(_check_listen)


class ForwardAuthSettings(_Section):
    """nginx asking the gateway (auth_request) and serving the portal itself: docs/operations.md."""

    trusted_nginx: list[Network] = Field(
        default_factory=list,
        description="Networks (nginx) whose X-Original-Method/-URI are believed on /.gateway/auth.",
    )
    access_log: Path | None = Field(
        None,
        description=(
            "The access log nginx writes in the template's cps_gateway_access format: every line becomes an "
            "`access` audit record and counts for quotas (docs/operations.md, 'Access stream'). Needs "
            "audit.file. Without it nginx may cache no decision on a protected route (each one is audited "
            "as it is made)."
        ),
    )
    cache_seconds: Duration = Field(
        5.0,
        ge=0,
        le=60,
        description=(
            "How long nginx may serve an allow from its decision cache (X-Accel-Expires; never past the "
            "login's max_age or the session's end). A policy reload reaches cached requests at most this "
            "much (plus sessions.local_cache_seconds) later; the end of a session too, unless "
            "ended_sessions is set (then at once). 0: no caching."
        ),
    )
    ended_sessions: Path | None = Field(
        None,
        description=(
            "Directory where the gateway marks each session it ends (logout, back-channel logout, quota or "
            "card revocation, login rotation), for nginx to stop serving its cached allows at once: the "
            "template's __CACHE_DIR__/ended-sessions, on a disk this instance writes and nginx reads. Without "
            "it the end of a session reaches cached requests within cache_seconds."
        ),
    )
    max_lag: Duration = Field(
        10.0,
        gt=0,
        description=(
            "Longest the audit trail may lag behind the access log: beyond it, and while the ingester is "
            "down, decisions are refused (503) and the instance is not ready."
        ),
    )

    _resolve_paths = _paths_relative_to_settings("access_log", "ended_sessions")


class EcpsSettings(_Section):
    """e-CPS login through Pro Santé Connect (PSC), the ANS OpenID Connect provider. See docs/ecps.md."""

    metadata_url: str = Field(
        description=(
            "PSC discovery document, given explicitly: PSC serves it at the NON-standard path "
            "<issuer>/.well-known/wallet-openid-configuration."
        )
    )
    issuer: str | None = Field(
        None, description="Expected issuer; when set, the discovery document must name exactly this one."
    )
    client_id: str = Field(description="Client id registered with ANS for this service.")
    client_auth: Literal["client_secret_basic", "private_key_jwt", "tls_client_auth"] = Field(
        "client_secret_basic",
        description=(
            "Token endpoint client authentication: client_secret_basic, private_key_jwt (RS256 or ES256, "
            "from the key) or tls_client_auth (mTLS, required in the ANS 'Espace de Confiance')."
        ),
    )
    client_secret: str | None = Field(
        None, description="Client secret for client_secret_basic; write a ${ENV} reference, never the value."
    )
    private_key_file: Path | None = Field(
        None,
        description="PEM private key signing the private_key_jwt client assertion: RSA (RS256) or EC P-256 (ES256).",
    )
    key_id: str | None = Field(None, description="`kid` of private_key_file as registered with ANS.")
    client_certificate_file: Path | None = Field(
        None,
        description="tls_client_auth: PEM certificate the gateway presents to PSC (token, userinfo, PAR).",
    )
    client_certificate_key_file: Path | None = Field(
        None, description="tls_client_auth: unencrypted PEM private key of client_certificate_file."
    )
    server_ca_file: Path | None = Field(
        None, description="PEM CA certificates PSC's TLS certificates must chain to (none: the system's)."
    )
    pushed_authorization_requests: bool = Field(
        False,
        description="Send the authorization request to PSC's PAR endpoint first (RFC 9126); always when PSC requires it.",
    )
    scopes: str = Field("openid scope_all", description="Requested scopes (must include openid).")
    acr_values: str = Field("eidas1", description="acr_values sent in the authorization request.")
    accepted_acr: list[str] = Field(
        default_factory=lambda: ["eidas1", "eidas2", "eidas3"],
        description="acr values accepted in the id_token; any other refuses the login.",
    )
    accept_missing_acr: bool = Field(
        False, description="Accept an id_token without acr (PSC has omitted it at times)."
    )
    redirect_uri: str = Field(
        description="Callback registered with ANS: <public origin>/.gateway/ecps/callback."
    )
    post_logout_redirect_uri: str | None = Field(
        None, description="Where PSC sends the browser after logout (registered with ANS); None: PSC's page."
    )
    timeout: Duration = Field(5.0, description="Time limit of each call to PSC (discovery, token, userinfo).")
    login_cookie_secret: str = Field(
        min_length=32,
        description=(
            "Secret signing the short-lived __Host-gateway-login cookie that binds state, nonce and PKCE "
            "to the browser; identical on every instance; write a ${ENV} reference."
        ),
    )

    _resolve_paths = _paths_relative_to_settings(
        "private_key_file", "client_certificate_file", "client_certificate_key_file", "server_ca_file"
    )
    _files_exist = _files_must_exist("private_key_file", "client_certificate_key_file")

    @field_validator("private_key_file", mode="after")
    @classmethod
    def _assertion_key(cls, value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        if value is not None and value.is_file():
            _check_client_assertion_key(_load_private_key(value))
        return value

    @field_validator("client_certificate_file", "server_ca_file", mode="after")
    @classmethod
    def _certificate_files(cls, value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        if value is not None:
            _check_certificates(value, info)
        return value

    @field_validator("metadata_url", "redirect_uri", "post_logout_redirect_uri")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/?#]+(/[^\s#]*)?$", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @field_validator("scopes")
    @classmethod
    def _openid(cls, value: str) -> str:
        if "openid" not in value.split():
            raise ValueError("scopes must include openid")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> EcpsSettings:
        if self.client_auth == "client_secret_basic" and not self.client_secret:
            raise ValueError("client_auth client_secret_basic needs client_secret")
        if self.client_auth == "private_key_jwt" and self.private_key_file is None:
            raise ValueError("client_auth private_key_jwt needs private_key_file (and usually key_id)")
        if self.client_auth == "tls_client_auth":
            if self.client_certificate_file is None or self.client_certificate_key_file is None:
                raise ValueError(
                    "client_auth tls_client_auth needs client_certificate_file and client_certificate_key_file"
                )
            if self.client_certificate_file.is_file() and self.client_certificate_key_file.is_file():
                _check_tls_client_certificate(self.client_certificate_file, self.client_certificate_key_file)
        return self


def _load_private_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise ValueError(
            f"{path}: the key is encrypted; give it unencrypted (file readable by the gateway only)"
        ) from None
    except ValueError:
        raise ValueError(f"{path}: not a PEM private key") from None


def _check_client_assertion_key(key: PrivateKeyTypes) -> None:
    """Only keys whose algorithm PSC can be asked to accept: RSA (RS256) or EC P-256 (ES256)."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA key of {key.key_size} bits is too short: use 2048 bits or more")
        return
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"an EC key on {key.curve.name} cannot sign ES256: use P-256 (or RSA for RS256)")
        return
    raise ValueError(
        f"a {type(key).__name__} cannot sign RS256 or ES256 client assertions: use RSA or EC P-256"
    )


def _check_tls_client_certificate(certificate_file: Path, key_file: Path) -> None:
    """The certificate and its key belong together, and the certificate can authenticate a TLS client now."""
    key = _load_private_key(key_file)
    certificate = x509.load_pem_x509_certificates(certificate_file.read_bytes())[0]
    public_format = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*public_format) != certificate.public_key().public_bytes(*public_format):
        raise ValueError(f"{key_file} is not the private key of {certificate_file}")
    now = datetime.now(UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise ValueError(
            f"{certificate_file} is not valid now (from {certificate.not_valid_before_utc:%Y-%m-%d} "
            f"to {certificate.not_valid_after_utc:%Y-%m-%d})"
        )
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if x509.ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise ValueError(f"{certificate_file} lacks the TLS client authentication usage (extendedKeyUsage)")


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
        "e.g. https://carte.portail.fr; the login page's card button leads there (through the main host's "
        "/.gateway/card/start)."
    )
    challenge_ttl: Duration = Field(
        60.0, gt=0, le=600, description="Lifetime of a challenge nonce (`gateway card login`)."
    )
    nonce_store: str | None = Field(
        None,
        description="memory:// or a Redis URL as for sessions.store, for challenge nonces and card-host hand-offs "
        "(default: sessions.store).",
    )
    host_secret: str | None = Field(
        None,
        description=(
            "Secret the card-login host's nginx adds to every request it forwards (X-Card-Host-Secret); "
            "client-certificate headers count only with it. At least 32 random bytes (openssl rand -hex 32); "
            "write a ${ENV} reference, or use host_secret_file."
        ),
    )
    host_secret_file: Path | None = Field(
        None,
        description="File holding the card host secret instead of host_secret (one of them is required).",
    )

    _resolve_paths = _paths_relative_to_settings("trust_anchors", "intermediates", "host_secret_file")

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
        return None if value is None else check_store_url(value)

    @field_validator("host_secret")
    @classmethod
    def _host_secret(cls, value: str | None) -> str | None:
        return check_card_host_secret(value) if value is not None else None

    @field_validator("host_secret_file", mode="after")
    @classmethod
    def _host_secret_file(cls, value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        if value is None or (not (info.context or {}).get("require_files", True) and not value.is_file()):
            return value
        _require_file(value, info)
        check_card_host_secret(_read_secret(value), f"{value}: ")
        return value

    @model_validator(mode="after")
    def _one_host_secret(self) -> CardSettings:
        if (self.host_secret is None) == (self.host_secret_file is None):
            raise ValueError(
                "set exactly one of host_secret and host_secret_file: without the card host's secret no "
                "client certificate is believed (the same value fills the card-login nginx template)"
            )
        return self

    @property
    def login_host(self) -> str:
        """The host name of login_origin (what the card-login nginx sends as Host)."""
        host = normalise_host(self.login_origin.split("://", 1)[1])
        assert host is not None  # login_origin was validated as an origin
        return host

    def host_secret_value(self) -> bytes:
        """The card host secret, read from host_secret_file when that is how it was given."""
        if self.host_secret is not None:
            return self.host_secret.encode("ascii")
        assert self.host_secret_file is not None
        return _read_secret(self.host_secret_file).encode("ascii")


_SECRET_CHARACTERS = re.compile(r"^[A-Za-z0-9+/=_.~-]+$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def check_card_host_secret(value: str, where: str = "") -> str:
    """At least 32 bytes' worth (64 hex digits, or 43 base64 characters), and safe inside an nginx string
    and an HTTP header."""
    if not _SECRET_CHARACTERS.match(value):
        raise ValueError(f"{where}the card host secret may only hold letters, digits and + / = _ . ~ -")
    needed = 64 if _HEX.match(value) else 43
    if len(value) < needed:
        raise ValueError(
            f"{where}the card host secret is too short: at least 32 random bytes "
            f"({needed} characters in this encoding; e.g. openssl rand -hex 32)"
        )
    return value


def _read_secret(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


class Settings(_Section):
    """The whole configuration of one gateway deployment."""

    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    upstream: UpstreamSettings
    policies: list[Path] = Field(description="Policy files or directories of *.yaml files, in order.")
    assertion: AssertionSettings
    sessions: SessionSettings = Field(default_factory=SessionSettings)  # type: ignore[arg-type]
    limits: LimitsSettings = Field(default_factory=LimitsSettings)  # type: ignore[arg-type]
    audit: AuditSettings = Field(default_factory=AuditSettings)  # type: ignore[arg-type]
    card: CardSettings | None = Field(None, description="CPS card login (absent: no card login).")
    ecps: EcpsSettings | None = Field(None, description="e-CPS login via Pro Santé Connect (None: off).")
    metrics: MetricsSettings | None = Field(None, description="Prometheus metrics; absent: none are served.")
    forward_auth: ForwardAuthSettings = Field(default_factory=ForwardAuthSettings)  # type: ignore[arg-type]

    @property
    def https_hosts(self) -> frozenset[str]:
        """Host header values (lower-case, with and without the port) of the gateway's https origins."""
        origins = [self.server.public_origin, self.card.login_origin if self.card else ""]
        hosts: set[str] = set()
        for origin in origins:
            if origin.lower().startswith("https://"):
                netloc = origin[len("https://") :].lower()
                # nginx's ``proxy_set_header Host $host`` drops the port: match the bare host name too.
                hostname = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
                hosts.update({netloc, hostname})
        return frozenset(hosts)

    @property
    def limits_storage(self) -> str:
        return self.limits.storage or self.sessions.store

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """Every Host the gateway answers for: server.allowed_hosts and the hosts of the two origins."""
        origin_host = normalise_host(self.server.public_origin.split("://", 1)[1])
        hosts = {*self.server.allowed_hosts, *([origin_host] if origin_host else [])}
        if self.card is not None:
            hosts.add(self.card.login_host)
        return frozenset(hosts)

    _resolve_paths = _paths_relative_to_settings("policies")

    @property
    def upstream_concurrency(self) -> int:
        """Portal requests forwarded at once per worker (``upstream.max_concurrent`` or its default)."""
        threads = self.server.threads
        return self.upstream.max_concurrent or max(1, threads - max(1, threads // 4))

    @model_validator(mode="after")
    def _own_pages_keep_a_thread(self) -> Settings:
        limit = self.upstream.max_concurrent
        if limit is not None and self.server.threads > 1 and limit >= self.server.threads:
            raise ValueError(
                f"upstream.max_concurrent ({limit}) must be below server.threads ({self.server.threads}): "
                "the gateway's own pages (health, login) need a thread while the portal is slow"
            )
        return self

    @model_validator(mode="after")
    def _access_stream_is_audited(self) -> Settings:
        forward_auth = self.forward_auth
        if forward_auth.access_log is not None and self.audit.file is None:
            raise ValueError(
                "forward_auth.access_log needs audit.file: the access records and the ingester's position "
                "are kept beside it"
            )
        if forward_auth.cache_seconds >= self.assertion.lifetime / 2:
            # The signer reuses a token while more than half its lifetime remains: a cached allow must
            # never hand nginx an expired one.
            raise ValueError(
                f"forward_auth.cache_seconds ({forward_auth.cache_seconds:g}) must be below half of "
                f"assertion.lifetime ({self.assertion.lifetime:g})"
            )
        return self

    @model_validator(mode="after")
    def _memory_store_is_one_process(self) -> Settings:
        if self.sessions.store.startswith("memory://") and self.server.workers > 1:
            raise ValueError(
                "sessions.store memory:// lives in one process: set server.workers to 1 or use a redis:// store"
            )
        return self

    @model_validator(mode="after")
    def _memory_limits_are_one_process(self) -> Settings:
        if self.limits.storage and self.limits.storage.startswith("memory://") and self.server.workers > 1:
            raise ValueError(
                "limits.storage memory:// counts per process: with several workers each would allow the whole "
                "rate and ban on its own; use a redis:// store (or server.workers 1)"
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
    def _policies(cls, value: list[Path], info: pydantic.ValidationInfo) -> list[Path]:
        if not value:
            raise ValueError("name at least one policy file or directory")
        missing = [str(p) for p in value if not p.exists()]
        if missing and (info.context or {}).get("require_files", True):
            raise ValueError(f"not found: {', '.join(missing)}")
        return value


def load_settings(
    path: Path, environ: dict[str, str] | None = None, *, require_files: bool = True
) -> Settings:
    """Read, substitute ``${ENV}`` references, validate; raise ConfigErrors with every error at once.

    ``require_files=False`` accepts missing key and policy files (``gateway dev init`` is about to create them).
    """
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigErrors(
            [ConfigError(file, None, "", f"cannot read the settings file: {reason}")]
        ) from None
    document = parse_yaml(text, file)
    document = _substitute_environment(document, os.environ if environ is None else environ)
    context = {"base_dir": str(settings_base_dir(path)), "require_files": require_files}
    return validate(Settings, document, context=context)


def settings_base_dir(path: Path) -> Path:
    """What relative paths in the settings file ``path`` are relative to (see the module's docstring)."""
    if path.resolve() == DEFAULT_SETTINGS_FILE.resolve():
        return Path.cwd()
    return path.parent.resolve()


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
        section = _section_type(field.annotation)
        if section is not None:
            rows.extend(documented_keys(section, f"{key}."))
            continue
        item_section = _list_item_section(field.annotation)
        if item_section is not None:
            rows.extend(documented_keys(item_section, f"{key}[]."))
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())  # type: ignore[call-arg]
        else:
            default = repr(field.default)
        rows.append((key, default, field.description or ""))
    return rows


def _section_type(annotation: Any) -> type[_Section] | None:
    """The settings section behind ``Section`` or ``Section | None``, else None."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in typing.get_args(annotation) if is_union else (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, _Section):
            return candidate
    return None


def _list_item_section(annotation: Any) -> type[_Section] | None:
    """The section of a ``list[Section]`` field (e.g. ``card.crls``), else None."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, _Section):
            return item
    return None
