"""The gateway's long-lived objects (built once per process) and the request-scoped facts every view needs."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_cookie

from gateway import metrics
from gateway.access_stream import StreamHealth
from gateway.audit import AuditError, AuditLog
from gateway.authn.card.challenge import ChallengeIssuer, NonceKind, NonceSpace, NonceStore
from gateway.authn.card.handoff import BINDING_COOKIE
from gateway.authn.card.headers import CardHost
from gateway.authn.card.revocation import RevokedCardSessions
from gateway.authn.card.setup import build_card_login, crls_ready, nonce_store
from gateway.authn.card.verify import CardVerifier, CrlStore
from gateway.authn.ecps import ProSanteConnect, ProviderState
from gateway.config_source import ConfigError, ConfigErrors
from gateway.ended_sessions import EndedSessionMarks, MemoryTagIndex, RedisTagIndex
from gateway.identity import Identity
from gateway.limits import STORAGE_ERRORS, LoginThrottle, QuotaGuard
from gateway.policy.decision import Reason
from gateway.policy.engine import PolicySet
from gateway.policy.loader import LoadedPolicies, load_policies
from gateway.policy.model import Rule
from gateway.policy.paths import BadPath, normalise_target
from gateway.proxy.assertion import AssertionSigner
from gateway.proxy.headers import PortalOrigin, client_address, in_networks
from gateway.proxy.upstream import Upstream
from gateway.readiness import NotReady, ReadinessRegistry, UpstreamProbe
from gateway.responses import LoginLinks, WayForward, login_link, refusal
from gateway.sessions import CachedSessionStore, MemorySessionStore, RedisSessionStore, SessionStore
from gateway.settings import EcpsSettings, Settings, policy_files
from gateway.wsgi import RequestBodyTimeout, normalise_host

log = logging.getLogger("gateway")

GATEWAY_PREFIX = "/.gateway"
ECPS_LOGIN_PATH = GATEWAY_PREFIX + "/login/ecps"
LOGOUT_PATH = GATEWAY_PREFIX + "/logout"
#: Flask's (signed, short-lived) session cookie: only the e-CPS login's state, nonce and PKCE verifier.
LOGIN_COOKIE_NAME = "__Host-gateway-login"


@dataclass
class Gateway:
    """Everything a request needs, built once at start-up; requests never mutate it."""

    settings: Settings
    policies: PolicySet
    upstream: Upstream
    signer: AssertionSigner
    sessions: SessionStore
    audit: AuditLog
    quotas: QuotaGuard
    login_throttle: LoginThrottle
    portal_origin: PortalOrigin
    #: Every Host the gateway answers for (Settings.allowed_hosts).
    allowed_hosts: frozenset[str]
    #: The gateway's cookie names, lower-case: never sent to the portal, never set by it.
    protected_cookies: frozenset[str] = field(default_factory=frozenset)
    #: Where the login page's choices lead; None until that login method is configured.
    card_login_url: str | None = None
    ecps_login_url: str | None = None
    #: Checks behind /.gateway/readyz; login methods register theirs (CRL freshness, IdP metadata).
    readiness: ReadinessRegistry = field(default_factory=ReadinessRegistry)
    #: The Pro Santé Connect relying party; None when ``ecps`` is not configured.
    ecps: ProSanteConnect | None = None
    #: Card login (None when settings.card is absent): built once, see gateway/authn/card/setup.py.
    card_verifier: CardVerifier | None = None
    challenge_issuer: ChallengeIssuer | None = None
    crl_store: CrlStore | None = None
    card_handoffs: NonceStore | None = None
    #: Who may send client-certificate headers (None without a card section: nobody).
    card_host: CardHost | None = None
    #: Forward-auth's access stream (forward_auth.access_log): whether the audit trail keeps up with it.
    stream_health: StreamHealth | None = None

    def login_links(self, next_path: str) -> LoginLinks:
        card, ecps = self.card_login_url, self.ecps_login_url
        return LoginLinks(
            card=login_link(card, next_path) if card else None,
            ecps=login_link(ecps, next_path) if ecps else None,
        )


def read_policies(settings: Settings) -> LoadedPolicies:
    sources, errors = {}, []
    for path in policy_files(settings):
        try:
            sources[str(path)] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            errors.append(ConfigError(str(path), None, "", f"cannot read the policy file: {reason}"))
    if errors:
        raise ConfigErrors(errors)
    return load_policies(sources)


def build_session_store(settings: Settings) -> SessionStore:
    config = settings.sessions
    if config.store.startswith("memory://"):
        return MemorySessionStore(idle_timeout=config.idle_timeout, absolute_timeout=config.absolute_timeout)
    shared = RedisSessionStore(
        config.store, idle_timeout=config.idle_timeout, absolute_timeout=config.absolute_timeout
    )
    return (
        CachedSessionStore(shared, ttl=config.local_cache_seconds) if config.local_cache_seconds else shared
    )


def marking_ended_sessions(settings: Settings, store: SessionStore) -> SessionStore:
    """``store``, marking the ids it ends for nginx when ``forward_auth.ended_sessions`` is set: a mark lives as
    long as an allow nginx cached before it could (its cache lifetime, plus the sessions a process may have
    read before the end), and a minute more."""
    directory = settings.forward_auth.ended_sessions
    if directory is None:
        return store
    keep = settings.forward_auth.cache_seconds + settings.sessions.local_cache_seconds + 60
    url = settings.sessions.store
    tags = MemoryTagIndex() if url.startswith("memory://") else RedisTagIndex(url)
    return EndedSessionMarks(store, directory, keep_seconds=keep, tags=tags)


def build_audit_log(settings: Settings) -> AuditLog:
    """Never raises: an audit file that cannot be opened or written makes an instance not ready (and its
    audited requests 503), it never stops a worker from booting."""
    if settings.audit.file is None:
        return AuditLog(sys.stderr)
    return AuditLog(settings.audit.file, key_file=settings.audit.key_file)


def build_ecps(config: EcpsSettings, settings: Settings) -> ProSanteConnect:
    private_key = config.private_key_file.read_text(encoding="utf-8") if config.private_key_file else None
    certificate = (
        (str(config.client_certificate_file), str(config.client_certificate_key_file))
        if config.client_certificate_file and config.client_certificate_key_file
        else None
    )
    metrics.identity_provider_state("psc", ProviderState.STARTING.value)
    return ProSanteConnect(
        metadata_url=config.metadata_url,
        expected_issuer=config.issuer,
        client_id=config.client_id,
        client_auth=config.client_auth,
        client_secret=config.client_secret,
        private_key_pem=private_key,
        key_id=config.key_id,
        tls_client_certificate=certificate,
        server_ca_file=str(config.server_ca_file) if config.server_ca_file else None,
        pushed_authorization_requests=config.pushed_authorization_requests,
        # Consumed states and logout-token jti: shared by every instance (another one refuses the replay).
        single_use=NonceSpace(
            nonce_store(settings.sessions.store, prefix="gw:ecps-used:"), NonceKind.ECPS_USED
        ),
        on_state_change=lambda state: metrics.identity_provider_state("psc", state.value),
        redirect_uri=config.redirect_uri,
        post_logout_redirect_uri=config.post_logout_redirect_uri,
        scopes=config.scopes,
        acr_values=config.acr_values,
        accepted_acr=frozenset(config.accepted_acr),
        accept_missing_acr=config.accept_missing_acr,
        timeout=config.timeout,
    )


def build_gateway(
    settings: Settings,
    policies: LoadedPolicies,
    *,
    sessions: SessionStore | None = None,
    audit: AuditLog | None = None,
) -> Gateway:
    upstream = settings.upstream
    gateway = Gateway(
        settings=settings,
        policies=policies.policy_set,
        upstream=Upstream(
            upstream.url,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
            pool_size=upstream.pool_size,
            max_concurrent=settings.upstream_concurrency,
            ca_file=str(upstream.ca_file) if upstream.ca_file else None,
        ),
        signer=AssertionSigner(
            settings.assertion.key_file.read_bytes(),
            issuer=settings.assertion.issuer,
            audience=settings.assertion.audience,
            lifetime=settings.assertion.lifetime,
        ),
        sessions=marking_ended_sessions(settings, sessions or build_session_store(settings)),
        audit=audit or build_audit_log(settings),
        quotas=QuotaGuard(settings.limits_storage),
        login_throttle=LoginThrottle(
            settings.limits_storage,
            attempts_per_ip=settings.limits.login_attempts_per_ip,
            attempts_per_identity=settings.limits.login_attempts_per_identity,
            ban_after=settings.limits.ban_after,
            ban_window=settings.limits.ban_window,
            ban_duration=settings.limits.ban_duration,
        ),
        # The login cookie is the gateway's too: never forwarded to the portal.
        protected_cookies=frozenset(
            name.lower() for name in (settings.sessions.cookie_name, LOGIN_COOKIE_NAME, BINDING_COOKIE)
        ),
        portal_origin=PortalOrigin.of(upstream.url),
        allowed_hosts=settings.allowed_hosts,
        ecps=build_ecps(settings.ecps, settings) if settings.ecps else None,
        ecps_login_url=ECPS_LOGIN_PATH if settings.ecps else None,
    )
    gateway.readiness.register("sessions", gateway.sessions.ping)
    gateway.readiness.register("audit", _audit_ready(gateway.audit))
    _add_access_stream(gateway)
    probe_timeout = min(upstream.connect_timeout, 1.0)
    gateway.readiness.register("upstream", UpstreamProbe(upstream.url, timeout=probe_timeout, ttl=1.0))
    _add_card_login(gateway)
    return gateway


def _audit_ready(audit: AuditLog) -> Callable[[], None]:
    def check() -> None:
        problem = audit.unavailable()
        if problem is not None:
            raise NotReady(problem)

    return check


def _add_access_stream(gateway: Gateway) -> None:
    settings = gateway.settings
    access_log, audit_file = settings.forward_auth.access_log, settings.audit.file
    if access_log is None or audit_file is None:
        return
    health = StreamHealth(access_log, audit_file, settings.forward_auth.max_lag)
    gateway.stream_health = health

    def stream_keeps_up() -> None:
        problem = health.problem()
        if problem is not None:
            raise NotReady(problem)

    gateway.readiness.register("access_stream", stream_keeps_up)


CARD_LOGIN_PATH = f"{GATEWAY_PREFIX}/login/card"
#: On the main host: binds the browser (a cookie), then sends it to the card host (authn/card/handoff.py).
CARD_START_PATH = f"{GATEWAY_PREFIX}/card/start"


def _add_card_login(gateway: Gateway) -> None:
    card = gateway.settings.card
    if card is None:
        return
    login = build_card_login(gateway.settings, card, RevokedCardSessions(gateway.sessions, gateway.audit))
    gateway.card_verifier = login.verifier
    gateway.challenge_issuer = login.challenges
    gateway.crl_store = login.crl_store
    gateway.card_handoffs = login.handoffs
    gateway.card_login_url = CARD_START_PATH
    gateway.card_host = CardHost(
        card.login_host, tuple(gateway.settings.server.tls_terminators), card.host_secret_value()
    )

    def card_crls() -> None:
        if not crls_ready(login):
            raise NotReady("a CRL is missing or past nextUpdate + grace: card logins are refused")

    gateway.readiness.register("card_crls", card_crls)


def gateway_of(app: Flask | None = None) -> Gateway:
    return (app or current_app).extensions["gateway"]


# --- Request-scoped facts -------------------------------------------------------------------------------
# Each fact is read from the WSGI environ, so the proxy's hot path (plain WSGI, see endpoints/proxy.py) and
# Flask views share them; the argument-less forms are for code running inside a Flask request.

REQUEST_ID_KEY = "gateway.request_id"
#: When present, the session id to use instead of the Cookie header's (forward-auth: the id nginx keyed its
#: decision cache on; None: no session).
SESSION_ID_KEY = "gateway.session_id"


def request_id_of(environ: dict[str, Any]) -> str:
    value = environ.get(REQUEST_ID_KEY)
    if value is None:
        # A correlation id, not a secret: the non-cryptographic generator (reseeded in each worker after the
        # fork) costs no system call, where secrets.token_hex() reads the kernel's entropy every request.
        value = environ[REQUEST_ID_KEY] = f"{random.getrandbits(64):016x}"
    return value


def session_id_of(gateway: Gateway, environ: dict[str, Any]) -> str | None:
    if SESSION_ID_KEY in environ:
        return environ[SESSION_ID_KEY]
    return parse_cookie(environ.get("HTTP_COOKIE")).get(gateway.settings.sessions.cookie_name) or None


def peer_of(environ: dict[str, Any]) -> str:
    return environ.get("REMOTE_ADDR", "")


def client_ip_of(gateway: Gateway, environ: dict[str, Any]) -> str:
    trusted = gateway.settings.server.trusted_proxies
    return client_address(peer_of(environ), environ.get("HTTP_X_FORWARDED_FOR"), trusted)


def request_host_of(gateway: Gateway, environ: dict[str, Any]) -> str | None:
    trusted = in_networks(peer_of(environ), gateway.settings.server.trusted_proxies)
    raw = (trusted and environ.get("HTTP_X_FORWARDED_HOST")) or environ.get("HTTP_HOST", "")
    return normalise_host(raw)


def refused_host(gateway: Gateway, environ: dict[str, Any], host: str | None, raw: str) -> Reason | None:
    """BAD_HOST (malformed) or HOST_NOT_ALLOWED (not one of Settings.allowed_hosts), audited; None when the
    gateway answers for ``host``."""
    if host is not None and host in gateway.allowed_hosts:
        return None
    reason = Reason.BAD_HOST if host is None else Reason.HOST_NOT_ALLOWED
    audit_request_event(gateway, environ, "bad_request", decision="deny", reasons=[reason.value], host=raw)
    return reason


def audit_request_event(
    gateway: Gateway, environ: dict[str, Any], event: str, *, identity: Identity | None = None, **fields: Any
) -> None:
    """One audit record about a request: its id and client address always, and the identity's idNat, login
    method and PSC authMode when there is one (explicit fields win)."""
    if identity is not None:
        fields.setdefault("idnat", identity.idnat)
        fields.setdefault("method", identity.method.value)
        fields.setdefault("auth_mode", identity.auth_mode)
    gateway.audit.record(
        event, request_id=request_id_of(environ), client_ip=client_ip_of(gateway, environ), **fields
    )


def request_id() -> str:
    return request_id_of(request.environ)


def peer() -> str:
    return peer_of(request.environ)


def client_ip(gateway: Gateway) -> str:
    return client_ip_of(gateway, request.environ)


def request_host(gateway: Gateway) -> str | None:
    return request_host_of(gateway, request.environ)


def audit_event(gateway: Gateway, event: str, *, identity: Identity | None = None, **fields: Any) -> None:
    audit_request_event(gateway, request.environ, event, identity=identity, **fields)


def current_next_path() -> str:
    """Where to send the user back after a login: this request's path and query (same site only)."""
    query = request.query_string.decode("latin-1")
    return f"{request.path}?{query}" if query else request.path


def see_other(location: str) -> Response:
    """303: after a login or logout, the browser goes on with a GET to ``location``."""
    return Response(status=303, headers={"Location": location})


def unexpected_error(error: Exception) -> Response:
    """Flask's error handler (and the proxy's): HTTP errors as they are, anything else a page, never a trace."""
    if isinstance(error, HTTPException):
        return error  # type: ignore[return-value]
    if isinstance(error, RequestBodyTimeout):  # a login form or upload that arrived too slowly
        try:
            audit_event(gateway_of(), "bad_request", reasons=[Reason.CLIENT_TIMEOUT.value], detail=str(error))
        except AuditError:
            return refuse(Reason.AUDIT_UNAVAILABLE, next_path="/")
        return refuse(Reason.CLIENT_TIMEOUT, next_path="/")
    if isinstance(error, AuditError):
        # Logged once per outage by the audit log itself, not once per refused request.
        return refuse(Reason.AUDIT_UNAVAILABLE, next_path="/")
    if isinstance(error, STORAGE_ERRORS):
        log.warning("limits storage unavailable (request %s): %s", request_id(), type(error).__name__)
        return refuse(Reason.LIMITS_UNAVAILABLE, next_path="/")
    log.exception("unexpected error (request %s)", request_id())
    return refuse(Reason.INTERNAL_ERROR, next_path="/")


def destination_rule(gateway: Gateway, next_path: str) -> Rule | None:
    """The rule guarding a GET of ``next_path`` on the portal: what a login must satisfy to get there."""
    try:
        target = normalise_target(next_path)
    except BadPath:
        return None
    return gateway.policies.match("GET", _portal_host(gateway), target.path)


def _portal_host(gateway: Gateway) -> str:
    """The portal host this request is about: its own, except on the card-login host, which serves the
    public origin's pages."""
    public_host = normalise_host(urlsplit(gateway.settings.server.public_origin).netloc) or ""
    host = request_host(gateway)
    card = gateway.settings.card
    if host is None or (card is not None and host == normalise_host(urlsplit(card.login_origin).netloc)):
        return public_host
    return host


def way_forward(gateway: Gateway, *, session_ended: bool = False) -> WayForward:
    """Home, and logout when this browser holds a session (not when this request just ended it: a logout
    link would lead nowhere); absolute, as the card-login host shows pages too."""
    origin = gateway.settings.server.public_origin
    logged_in = not session_ended and gateway.settings.sessions.cookie_name in request.cookies
    return WayForward(
        home=f"{origin}/",
        logout=f"{origin}{LOGOUT_PATH}" if logged_in else None,
        contact=gateway.settings.server.support_contact,
    )


def refuse_method(allowed: Iterable[str]) -> Response:
    """405 for a method the gateway never forwards, audited; ``allowed`` in the Allow header."""
    try:
        audit_event(
            gateway_of(), "bad_request", reasons=[Reason.METHOD_NOT_ALLOWED.value], http_method=request.method
        )
    except AuditError:  # also an error handler, where an exception would become Flask's bare 500
        return refuse(Reason.AUDIT_UNAVAILABLE, next_path="/")
    response = refuse(Reason.METHOD_NOT_ALLOWED, next_path="/")
    response.headers["Allow"] = ", ".join(allowed)
    return response


def refuse(
    reason: Reason,
    *,
    retry_after: int | None = None,
    next_path: str | None = None,
    rule: Rule | None = None,
    as_json: bool = False,
    session_ended: bool = False,
    reference: str | None = None,
) -> Response:
    """The refusal of this request; ``rule`` guards where the professional was going (default: the rule
    matching ``next_path``); ``session_ended``: the refused request ended its session (no logout link);
    ``reference``: the id the page names (default: this request's; "": none, for a page shared by clients)."""
    gateway = gateway_of()
    destination = next_path or current_next_path()
    return refusal(
        reason,
        request,
        default_language=gateway.settings.server.language,
        way_forward=way_forward(gateway, session_ended=session_ended),
        login=gateway.login_links(destination),
        rule=rule or destination_rule(gateway, destination),
        request_id=request_id() if reference is None else reference,
        retry_after=retry_after,
        as_json=as_json,
    )
