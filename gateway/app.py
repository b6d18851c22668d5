"""create_app(settings): wiring only — settings, policies, stores, upstream, blueprints."""

from __future__ import annotations

import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, send_from_directory

from gateway.audit import AuditLog
from gateway.identity import Identity
from gateway.policy.decision import Decision, Outcome, Reason
from gateway.policy.engine import PolicySet, decide_rule
from gateway.policy.loader import LoadedPolicies, load_policies
from gateway.policy.model import Action, Rule
from gateway.proxy.assertion import AssertionSigner
from gateway.proxy.forward import forward, identity_headers
from gateway.proxy.headers import client_address, filter_request_headers, in_networks
from gateway.proxy.upstream import Upstream, UpstreamError
from gateway.responses import LoginLinks, decision_response, login_link, refusal
from gateway.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    Session,
    SessionStore,
    SessionStoreUnavailable,
)
from gateway.settings import Settings, policy_files
from gateway.wsgi import BAD_TARGET_KEY, NormalisedTargetMiddleware, normalise_host, request_headers, target_of

log = logging.getLogger("gateway")

GATEWAY_PREFIX = "/.gateway"
_NO_RULE = Decision(Outcome.DENY, (Reason.NO_MATCHING_RULE,))
_STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class Gateway:
    """Everything a request needs, built once at start-up; never mutated by requests."""

    settings: Settings
    policies: PolicySet
    upstream: Upstream
    signer: AssertionSigner
    sessions: SessionStore
    audit: AuditLog
    protected_cookies: frozenset[str] = field(default_factory=frozenset)

    def login_links(self, next_path: str) -> LoginLinks:
        # Login methods arrive with the card and e-CPS blueprints; until then none is offered.
        card = self.card_login_url
        ecps = self.ecps_login_url
        return LoginLinks(
            card=login_link(card, next_path) if card else None,
            ecps=login_link(ecps, next_path) if ecps else None,
        )

    card_login_url: str | None = None
    ecps_login_url: str | None = None


def build_session_store(settings: Settings) -> SessionStore:
    config = settings.sessions
    timeouts = {"idle_timeout": config.idle_timeout, "absolute_timeout": config.absolute_timeout}
    if config.store.startswith("memory://"):
        return MemorySessionStore(**timeouts)
    return RedisSessionStore(config.store, **timeouts)


def build_audit_log(settings: Settings) -> AuditLog:
    if settings.audit.file is None:
        return AuditLog(sys.stderr)
    settings.audit.file.parent.mkdir(parents=True, exist_ok=True)
    return AuditLog(settings.audit.file)


def read_policies(settings: Settings) -> LoadedPolicies:
    sources = {str(path): path.read_text(encoding="utf-8") for path in policy_files(settings)}
    return load_policies(sources)


def create_app(
    settings: Settings,
    *,
    policies: LoadedPolicies | None = None,
    sessions: SessionStore | None = None,
    audit: AuditLog | None = None,
) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config.update(
        MAX_FORM_MEMORY_SIZE=64 * 1024,
        TRAP_HTTP_EXCEPTIONS=False,
        PROPAGATE_EXCEPTIONS=False,
    )
    loaded = policies or read_policies(settings)
    for warning in loaded.warnings:
        log.warning("policy: %s", warning)
    upstream = settings.upstream
    gateway = Gateway(
        settings=settings,
        policies=loaded.policy_set,
        upstream=Upstream(
            upstream.url,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
            pool_size=upstream.pool_size,
            ca_file=str(upstream.ca_file) if upstream.ca_file else None,
        ),
        signer=AssertionSigner(
            settings.assertion.key_file.read_bytes(),
            issuer=settings.assertion.issuer,
            audience=settings.assertion.audience,
            lifetime=settings.assertion.lifetime,
        ),
        sessions=sessions or build_session_store(settings),
        audit=audit or build_audit_log(settings),
        protected_cookies=frozenset({settings.sessions.cookie_name}),
    )
    app.extensions["gateway"] = gateway
    app.register_blueprint(_gateway_routes())
    app.add_url_rule(
        "/", "proxy", _proxy, defaults={"path": ""}, methods=_ALL_METHODS, provide_automatic_options=False
    )
    app.add_url_rule(
        "/<path:path>", "proxy_path", _proxy, methods=_ALL_METHODS, provide_automatic_options=False,
        strict_slashes=False,
    )
    app.before_request(_refuse_bad_target)
    app.register_error_handler(Exception, _unexpected_error)
    app.wsgi_app = NormalisedTargetMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def gateway_of(app: Flask | None = None) -> Gateway:
    return (app or current_app).extensions["gateway"]  # type: ignore[no-any-return]


# --- Per-request facts ------------------------------------------------------------------------------


def _request_id() -> str:
    request_id = g.get("request_id")
    if request_id is None:
        request_id = g.request_id = secrets.token_hex(8)
    return request_id


def _peer() -> str:
    return request.environ.get("REMOTE_ADDR", "")


def _client_ip(gateway: Gateway) -> str:
    return client_address(_peer(), request.headers.get("X-Forwarded-For"), gateway.settings.server.trusted_proxies)


def _host(gateway: Gateway) -> str | None:
    trusted = in_networks(_peer(), gateway.settings.server.trusted_proxies)
    raw = (trusted and request.headers.get("X-Forwarded-Host")) or request.headers.get("Host", "")
    return normalise_host(raw)


def _refuse(reason: Reason, *, rule: str | None = None, retry_after: int | None = None) -> Response:
    gateway = gateway_of()
    return refusal(
        reason,
        request,
        default_language=gateway.settings.server.language,
        login=gateway.login_links(request.full_path.rstrip("?") if request.query_string else request.path),
        request_id=_request_id(),
        retry_after=retry_after,
        rule=rule,
    )


def _refuse_bad_target() -> Response | None:
    problem = request.environ.get(BAD_TARGET_KEY)
    if problem is None:
        return None
    gateway = gateway_of()
    gateway.audit.record(
        "bad_request",
        request_id=_request_id(),
        client_ip=_client_ip(gateway),
        reasons=[Reason.BAD_REQUEST_PATH.value],
        detail=problem,
        target=request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI", ""),
    )
    return _refuse(Reason.BAD_REQUEST_PATH)


def _unexpected_error(error: Exception) -> Response:
    from werkzeug.exceptions import HTTPException

    if isinstance(error, HTTPException):
        return error  # type: ignore[return-value]
    log.exception("unexpected error (request %s)", _request_id())
    response = _refuse(Reason.UPSTREAM_UNAVAILABLE)
    response.status_code = 500
    return response


# --- The proxy --------------------------------------------------------------------------------------


def _proxy(path: str) -> Response:
    gateway = gateway_of()
    target = target_of(request.environ)
    host = _host(gateway)
    if host is None:
        return _refuse(Reason.BAD_HOST)
    now = time.time()
    rule = gateway.policies.match(request.method, host, target.path)
    session: Session | None = None
    if rule is not None and rule.action is Action.AUTHENTICATE:
        try:
            session = _current_session(gateway, now)
        except SessionStoreUnavailable:
            _audit_decision(gateway, rule, None, Decision(Outcome.DENY, (Reason.SESSION_STORE_UNAVAILABLE,), rule))
            return _refuse(Reason.SESSION_STORE_UNAVAILABLE, rule=rule.name)
    identity = session.identity if session else None
    decision = decide_rule(rule, identity, now) if rule is not None else _NO_RULE
    if rule is None or rule.action is not Action.PUBLIC:
        _audit_decision(gateway, rule, identity, decision)
    if not decision.allowed:
        return decision_response(
            decision,
            request,
            default_language=gateway.settings.server.language,
            login=gateway.login_links(_next_path(target.path, target.query)),
            request_id=_request_id(),
        )
    return _forward(gateway, target.path, target.query, rule, session, now)


def _next_path(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def _current_session(gateway: Gateway, now: float) -> Session | None:
    session_id = request.cookies.get(gateway.settings.sessions.cookie_name)
    if not session_id:
        return None
    return gateway.sessions.get(session_id, now)


def _forward(
    gateway: Gateway, path: str, query: str, rule: Rule | None, session: Session | None, now: float
) -> Response:
    peer = _peer()
    server = gateway.settings.server
    incoming = filter_request_headers(
        request_headers(request.environ),
        from_tls_terminator=in_networks(peer, server.tls_terminators),
        drop_cookies=gateway.protected_cookies,
    )
    if incoming.spoofed:
        gateway.audit.record(
            "spoofed_header",
            request_id=_request_id(),
            client_ip=_client_ip(gateway),
            reasons=[Reason.SPOOFED_HEADER.value],
            headers=sorted(incoming.spoofed),
        )
    extra = [("X-Request-Id", _request_id())]
    if session is not None and rule is not None:
        assertion = gateway.signer.assertion(session.identity, session.id, rule.name, now)
        extra.extend(identity_headers(session.identity, assertion))
    upstream_host = request.headers.get("Host", "") if gateway.settings.upstream.host_header == "preserve" else None
    try:
        return forward(
            gateway.upstream,
            request,
            target=_next_path(path, query),
            headers=incoming.forwardable,
            peer=peer,
            host=request.headers.get("Host", ""),
            from_trusted_proxy=in_networks(peer, server.trusted_proxies),
            host_header=upstream_host or gateway.upstream.host_header,
            extra_headers=extra,
            protected_cookies=gateway.protected_cookies,
        )
    except UpstreamError as exc:
        log.warning("upstream error (request %s): %s", _request_id(), exc.detail)
        gateway.audit.record(
            "upstream_error", request_id=_request_id(), rule=rule.name if rule else None, reasons=[exc.reason.value]
        )
        return _refuse(exc.reason)


def _audit_decision(gateway: Gateway, rule: Rule | None, identity: Identity | None, decision: Decision) -> None:
    gateway.audit.record(
        "decision",
        request_id=_request_id(),
        client_ip=_client_ip(gateway),
        idnat=identity.idnat if identity else None,
        method=identity.method.value if identity else None,
        auth_mode=identity.auth_mode if identity else None,
        http_method=request.method,
        path=target_of(request.environ).path,
        rule=rule.name if rule else None,
        decision=decision.outcome.value,
        reasons=[r.value for r in decision.reasons],
    )


# --- The gateway's own endpoints ----------------------------------------------------------------------


def _gateway_routes() -> Blueprint:
    routes = Blueprint("gateway", __name__, url_prefix=GATEWAY_PREFIX)

    @routes.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    @routes.get("/jwks.json")
    def jwks() -> Any:
        response = jsonify(gateway_of().signer.jwks)
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @routes.get("/login")
    def login() -> Response:
        response = _refuse(Reason.UNAUTHENTICATED)
        response.status_code = 200
        return response

    @routes.get("/static/<path:name>")
    def static(name: str) -> Response:
        return send_from_directory(_STATIC_DIR, name, max_age=3600)

    return routes
