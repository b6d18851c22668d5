"""For the portal behind the gateway: verify ``X-Gateway-Assertion`` and hand each view the professional.

The gateway signs, for every request it lets through, a short-lived ES256 JWT saying who logged in; the plain
``X-Gateway-*`` headers are only a convenience. A portal trusts the assertion alone, after checking it here:
the signature with the gateway's published keys (``/.gateway/jwks.json``, fetched and cached), ``iss``,
``aud``, ``exp``/``nbf``, and the request binding (``htm`` = this request's method, ``htu`` = its path): an
assertion copied from one request is worth nothing on another. A request without a valid assertion gets 401;
when the keys cannot be had at all, 503 (fail closed).

Two ways in, both built on :class:`AssertionVerifier`:

- :class:`AssertionMiddleware` wraps any WSGI application and puts the :class:`Professional` in
  ``environ["gateway.professional"]``;
- :class:`GatewayAssertion` is a Flask extension (``init_app``); views read :func:`current_professional`.

Routes the gateway's policies make public carry no assertion: declare them optional (``public_paths`` for the
middleware, ``@gateway.optional`` for Flask); an assertion that is present is still verified there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from flask import Flask, current_app, g, request
from joserfc import jwt
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from werkzeug.datastructures import ResponseCacheControl
from werkzeug.exceptions import HTTPException, ServiceUnavailable, Unauthorized
from werkzeug.http import parse_cache_control_header

from gateway.policy.origin import SAFE_METHODS

log = logging.getLogger("gateway.portal")

HEADER = "X-Gateway-Assertion"
ENVIRON_KEY = "gateway.professional"
ALGORITHMS = ["ES256"]
METHODS = frozenset({"card", "ecps"})


@dataclass(frozen=True, slots=True)
class Professional:
    """Who the gateway let in, as its assertion says."""

    #: National identifier (``8`` + RPPS, ``0`` + ADELI...).
    idnat: str
    #: TRE_G15 profession codes ("10" Médecin...).
    professions: tuple[str, ...]
    #: How they logged in to the gateway: ``card`` or ``ecps``.
    method: str
    #: When they logged in (not when this request was made).
    login_time: datetime
    given_name: str = ""
    family_name: str = ""
    #: PSC ``authMode`` for e-CPS logins ("CARD" when the card was used at PSC too).
    auth_mode: str = ""
    #: The gateway policy rule that let the request through.
    rule: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


class AssertionRefused(Exception):
    """No valid assertion for this request. ``code`` is short and stable; nothing here quotes the token."""

    status = 401

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


class KeysUnavailable(AssertionRefused):
    """The gateway's keys could not be fetched and none are cached: nothing can be verified (503)."""

    status = 503


class GatewayKeys:
    """The gateway's published keys: fetched on first use, kept for the answer's ``max-age`` (default
    ``ttl``), fetched again early for an unknown ``kid`` (key rotation) but at most once per
    ``min_refetch_interval``, so tokens naming made-up kids cannot make the portal hammer the gateway. A
    failed fetch keeps the keys already known."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        ttl: float = 300.0,
        min_refetch_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"the JWKS URL must be http(s): {url!r}")
        self.url = url
        self.timeout = timeout
        self.ttl = ttl
        self.min_refetch_interval = min_refetch_interval
        self._clock = clock
        self._keys: KeySet | None = None
        self._expires = 0.0
        self._fetched = float("-inf")
        self._lock = threading.Lock()

    def get(self, *, refetch: bool = False) -> KeySet:
        with self._lock:
            now = self._clock()
            stale = self._keys is None or now >= self._expires
            may_refetch = now - self._fetched >= self.min_refetch_interval
            if stale or (refetch and may_refetch):
                self._fetch(now)
            if self._keys is None:
                raise KeysUnavailable(
                    "keys_unavailable", f"the gateway's keys could not be fetched from {self.url}"
                )
            return self._keys

    def _fetch(self, now: float) -> None:
        self._fetched = now
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as answer:  # noqa: S310 - scheme checked
                document = json.load(answer)
                cache_control = parse_cache_control_header(
                    answer.headers.get("Cache-Control"), cls=ResponseCacheControl
                )
            keys = KeySet.import_key_set(document)
        except (OSError, ValueError, JoseError) as exc:
            log.warning("gateway keys not fetched from %s: %s", self.url, type(exc).__name__)
            # Known keys stay usable; an empty cache retries on the next request.
            self._expires = now + min(self.ttl, self.min_refetch_interval)
            return
        self._keys = keys
        self._expires = now + (cache_control.max_age if cache_control.max_age is not None else self.ttl)


class AssertionVerifier:
    """Checks one request's assertion; built once, shared by every request (thread-safe)."""

    def __init__(
        self,
        keys: GatewayKeys,
        *,
        issuer: str = "cps-gateway",
        audience: str = "portal",
        leeway: int = 5,
        require_request_binding: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        #: False accepts assertions without htm/htu/jti (a gateway older than these claims); present, they
        #: are always checked.
        self.require_request_binding = require_request_binding
        self._clock = clock
        self._spent = _SpentTokens()

    def verify(self, token: str | None, *, method: str, path: str) -> Professional:
        if not token:
            raise AssertionRefused("missing", f"no {HEADER}: the request did not come through the gateway")
        claims = self._verified_claims(token)
        self._check_binding(claims, method, path)
        if method.upper() not in SAFE_METHODS:
            self._refuse_replay(claims)
        return _professional(claims)

    def _verified_claims(self, token: str) -> dict[str, Any]:
        try:
            try:
                decoded = jwt.decode(token, self.keys.get(), algorithms=ALGORITHMS)
            except InvalidKeyIdError:
                decoded = jwt.decode(token, self.keys.get(refetch=True), algorithms=ALGORITHMS)
            registry = jwt.JWTClaimsRegistry(
                now=int(self._clock()),
                leeway=self.leeway,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
                sub={"essential": True},
                auth_time={"essential": True},
            )
            registry.validate(decoded.claims)
        except ExpiredTokenError:
            raise AssertionRefused("expired", "the assertion has expired") from None
        except (InvalidClaimError, MissingClaimError) as exc:
            raise AssertionRefused("invalid_claims", exc.description or "a claim does not verify") from None
        except (JoseError, ValueError):
            raise AssertionRefused(
                "invalid", "the assertion does not verify with the gateway's keys"
            ) from None
        return dict(decoded.claims)

    def _check_binding(self, claims: Mapping[str, Any], method: str, path: str) -> None:
        htm, htu = claims.get("htm"), claims.get("htu")
        if htm is None and htu is None and not self.require_request_binding:
            return
        if htm != method.upper() or htu != path:
            raise AssertionRefused("request_mismatch", "the assertion was issued for another request")

    def _refuse_replay(self, claims: Mapping[str, Any]) -> None:
        """The gateway mints a fresh token for every state-changing request: a second use is a replay. (Reads
        share tokens by design.) Remembered in this process until the token expires."""
        jti = claims.get("jti")
        if jti is None and not self.require_request_binding:
            return
        if not isinstance(jti, str) or not self._spent.first_use(jti, float(claims["exp"]), self._clock()):
            raise AssertionRefused("replayed", "this state-changing request's assertion was already used")


class _SpentTokens:
    """``jti`` of state-changing requests until their ``exp``; at most ``limit`` (the oldest forgotten)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._expiry: OrderedDict[str, float] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def first_use(self, jti: str, expires: float, now: float) -> bool:
        with self._lock:
            while self._expiry and (
                next(iter(self._expiry.values())) < now or len(self._expiry) >= self._limit
            ):
                self._expiry.popitem(last=False)
            if jti in self._expiry:
                return False
            self._expiry[jti] = expires
            return True


def _professional(claims: Mapping[str, Any]) -> Professional:
    methods = claims.get("amr")
    professions = claims.get("professions", [])
    if not (isinstance(methods, list) and len(methods) == 1 and methods[0] in METHODS):
        raise AssertionRefused("invalid_claims", "amr must name the login method (card or ecps)")
    if not (isinstance(professions, list) and all(isinstance(p, str) for p in professions)):
        raise AssertionRefused("invalid_claims", "professions must be a list of codes")
    try:
        login_time = datetime.fromtimestamp(float(claims["auth_time"]), UTC)
    except (TypeError, ValueError, OverflowError):
        raise AssertionRefused("invalid_claims", "auth_time is not a time") from None
    return Professional(
        idnat=str(claims["sub"]),
        professions=tuple(professions),
        method=methods[0],
        login_time=login_time,
        given_name=str(claims.get("given_name") or ""),
        family_name=str(claims.get("family_name") or ""),
        auth_mode=str(claims.get("auth_mode") or ""),
        rule=str(claims.get("rule") or ""),
        claims=claims,
    )


def request_path(environ: Mapping[str, Any]) -> str:
    """The path as the gateway forwarded it (what ``htu`` names): the raw request target without its query
    (gunicorn's RAW_URI, or REQUEST_URI), else the decoded path quoted again."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw).split("?", 1)[0]
    decoded = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1")
    return quote(decoded, safe="/:@!$&'()*+,;=-._~")


def _http_error(refused: AssertionRefused) -> HTTPException:
    if isinstance(refused, KeysUnavailable):
        return ServiceUnavailable("The identity of the request cannot be checked right now.")
    error = Unauthorized(f"No valid gateway assertion ({refused.code}).")
    error.www_authenticate = []  # no Basic/Bearer challenge: only the gateway can log the user in
    return error


def _verify_environ(
    verifier: AssertionVerifier, environ: Mapping[str, Any], *, optional: bool
) -> Professional | None:
    token = environ.get("HTTP_X_GATEWAY_ASSERTION")
    if not token and optional:
        return None
    try:
        return verifier.verify(token, method=environ.get("REQUEST_METHOD", ""), path=request_path(environ))
    except AssertionRefused as refused:
        log.warning("request refused (%s): %s", refused.code, refused.description)
        raise


class AssertionMiddleware:
    """WSGI: the wrapped application sees only requests with a valid assertion (``environ[ENVIRON_KEY]`` the
    professional), or, under ``public_paths``, without one (``None``). ``public_paths``: exact paths, or
    prefixes ending in ``/`` (``/static/``)."""

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        verifier: AssertionVerifier,
        public_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.public_paths = tuple(public_paths)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            environ[ENVIRON_KEY] = _verify_environ(self.verifier, environ, optional=self._public(environ))
        except AssertionRefused as refused:
            return _http_error(refused)(environ, start_response)
        return self.app(environ, start_response)

    def _public(self, environ: Mapping[str, Any]) -> bool:
        path = environ.get("PATH_INFO", "")
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.public_paths)


View = TypeVar("View", bound=Callable[..., Any])
_OPTIONAL = "_gateway_assertion_optional"


class GatewayAssertion:
    """Flask extension: every request needs a valid assertion (401 otherwise) unless its view is marked
    :meth:`optional`. Settings (``app.config``): ``GATEWAY_JWKS_URL`` (required, e.g.
    ``https://portal.example.fr/.gateway/jwks.json``), ``GATEWAY_ISSUER`` (``cps-gateway``),
    ``GATEWAY_AUDIENCE`` (``portal``), ``GATEWAY_LEEWAY`` (5 s), ``GATEWAY_REQUIRE_REQUEST_BINDING`` (True)."""

    def __init__(self, app: Flask | None = None, *, verifier: AssertionVerifier | None = None) -> None:
        self._verifier = verifier
        self._optional_endpoints: set[str] = set()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        verifier = self._verifier or _verifier_from_config(app.config)
        app.extensions["gateway_assertion"] = verifier
        app.before_request(self._authenticate)

    def optional(self, view: View) -> View:
        """Mark a view the gateway's policies make public: no assertion needed, one present is verified."""
        setattr(view, _OPTIONAL, True)
        return view

    def optional_endpoint(self, endpoint: str) -> None:
        """The same for a view registered by name (e.g. Flask's ``static``)."""
        self._optional_endpoints.add(endpoint)

    def _authenticate(self) -> None:
        verifier: AssertionVerifier = current_app.extensions["gateway_assertion"]
        view = current_app.view_functions.get(request.endpoint or "")
        optional = request.endpoint in self._optional_endpoints or getattr(view, _OPTIONAL, False)
        try:
            g.gateway_professional = _verify_environ(verifier, request.environ, optional=optional)
        except AssertionRefused as refused:
            raise _http_error(refused) from None


def _verifier_from_config(config: Mapping[str, Any]) -> AssertionVerifier:
    url = config.get("GATEWAY_JWKS_URL")
    if not url:
        raise RuntimeError("GatewayAssertion needs GATEWAY_JWKS_URL (the gateway's /.gateway/jwks.json)")
    return AssertionVerifier(
        GatewayKeys(url),
        issuer=config.get("GATEWAY_ISSUER", "cps-gateway"),
        audience=config.get("GATEWAY_AUDIENCE", "portal"),
        leeway=int(config.get("GATEWAY_LEEWAY", 5)),
        require_request_binding=bool(config.get("GATEWAY_REQUIRE_REQUEST_BINDING", True)),
    )


def current_professional() -> Professional | None:
    """The professional of the Flask request being served (None on an optional view without assertion)."""
    return g.get("gateway_professional")
