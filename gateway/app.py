"""create_app(settings): wiring only — settings, policies, stores, upstream, blueprints."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import MethodNotAllowed

from gateway.audit import AuditLog
from gateway.authn.ecps import ProSanteConnect, ProviderState
from gateway.endpoints import card, ecps, forward_auth, logout, operations, pages
from gateway.endpoints.proxy import ProxyApp
from gateway.i18n import load_catalogs
from gateway.limits import build_limiter
from gateway.login import refuse_cross_site_logins
from gateway.policy.decision import Reason
from gateway.policy.loader import LoadedPolicies
from gateway.readiness import NotReady
from gateway.runtime import (
    GATEWAY_PREFIX,
    LOGIN_COOKIE_NAME,
    audit_event,
    build_gateway,
    client_ip,
    gateway_of,
    read_policies,
    refuse,
    refuse_method,
    refused_host,
    request_host,
    unexpected_error,
)
from gateway.sessions import SessionStore
from gateway.settings import Settings
from gateway.wsgi import (
    BAD_HEADER_KEY,
    BAD_TARGET_KEY,
    RAW_ROUTES_ATTRIBUTE,
    NormalisedTargetMiddleware,
    StrictTransportSecurity,
)

log = logging.getLogger("gateway")

__all__ = ["create_app", "gateway_of", "read_policies"]


def create_app(
    settings: Settings,
    *,
    policies: LoadedPolicies | None = None,
    sessions: SessionStore | None = None,
    audit: AuditLog | None = None,
) -> Flask:
    load_catalogs()
    app = Flask(__name__, static_folder=None)
    # The gateway's own endpoints take small bodies (a certificate, a signed challenge, a logout token): a
    # larger one is refused (413) before it is read, and never fills a worker's memory. Portal requests never
    # enter Flask: their bodies stream through.
    app.config.update(
        MAX_CONTENT_LENGTH=OWN_ENDPOINTS_MAX_BODY,
        MAX_FORM_MEMORY_SIZE=OWN_ENDPOINTS_MAX_BODY,
        PROPAGATE_EXCEPTIONS=False,
    )
    loaded = policies or read_policies(settings)
    for warning in loaded.warnings:
        log.warning("policy: %s", warning)
    gateway = app.extensions["gateway"] = build_gateway(settings, loaded, sessions=sessions, audit=audit)

    app.register_blueprint(pages.blueprint())
    app.register_blueprint(operations.blueprint())
    app.register_blueprint(logout.blueprint())
    app.register_blueprint(forward_auth.blueprint())
    # Registered before the limiter's own hook: a cross-site request is refused before anything counts it.
    app.before_request(refuse_cross_site_logins)
    app.before_request(_read_chunked_body_within_limit)
    limiter = build_limiter(app, settings.limits_storage, lambda: client_ip(gateway_of()), key_prefix="gw:rl")
    app.extensions[_LIMITER] = limiter
    login_rate = limiter.limit(
        settings.limits.login_requests_per_ip,
        # PSC's servers call the back-channel endpoint: it has a limit of its own, never the browsers'. PSC's
        # redirect back answers a login start the limits counted; another site can send a browser there
        # with any state, and such a callback is refused without counting (endpoints/ecps.py).
        exempt_when=lambda: request.endpoint in _NOT_RATE_LIMITED,
    )
    if settings.ecps is not None and gateway.ecps is not None:
        _wire_ecps(app, settings.ecps.login_cookie_secret)
        gateway.ecps.init_app(app)
        # PSC down must not take the instance out of the load balancer: card login and public pages work.
        gateway.readiness.register("ecps", _psc_state_check(gateway.ecps), required=False)
        gateway.ecps.start_background_discovery()
        ecps_routes = ecps.blueprint(
            backchannel_rate=limiter.limit(settings.limits.backchannel_logout_requests_per_ip)
        )
        login_rate(ecps_routes)  # flask-limiter marks the blueprint (and returns nothing)
        app.register_blueprint(ecps_routes)
    if settings.card is not None:
        card_routes = card.blueprint()
        login_rate(card_routes)
        app.register_blueprint(card_routes)
    app.register_error_handler(429, _too_many_requests)
    app.register_error_handler(413, _too_large)
    app.register_error_handler(405, _method_not_allowed)
    app.before_request(_refuse_bad_target)
    app.after_request(_redirects_never_cached)
    app.register_error_handler(Exception, unexpected_error)
    # Portal requests and forward-auth decisions never enter Flask (see endpoints/proxy.py); all see the one
    # normalised target.
    hot_paths = ProxyApp(app, app.wsgi_app, hot_routes={forward_auth.AUTH_PATH: forward_auth.decide})
    app.wsgi_app = NormalisedTargetMiddleware(hot_paths)  # type: ignore[method-assign]
    # Under the gateway's worker, decisions asked in nginx's plain shape skip WSGI too (gateway/worker.py).
    setattr(app, RAW_ROUTES_ATTRIBUTE, {forward_auth.AUTH_PATH: forward_auth.raw_route(gateway)})
    https_hosts = settings.https_hosts
    if https_hosts:
        app.wsgi_app = StrictTransportSecurity(app.wsgi_app, https_hosts)  # type: ignore[method-assign]
    return app


#: The largest request body the gateway's own endpoints read (64 KiB: a card certificate is about 2 KiB).
OWN_ENDPOINTS_MAX_BODY = 64 * 1024


def _read_chunked_body_within_limit() -> None:
    """A body without Content-Length (chunked) is read now: werkzeug stops silently at MAX_CONTENT_LENGTH (a
    view would parse a truncated body), and one byte more than that raises its 413."""
    if request.content_length is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        request.get_data(cache=True)
        request.stream.read(1)


def _too_large(error: Exception) -> Response:
    audit_event(
        gateway_of(), "bad_request", reasons=[Reason.REQUEST_TOO_LARGE.value], endpoint=request.endpoint
    )
    response = refuse(Reason.REQUEST_TOO_LARGE, next_path="/")
    response.headers["Connection"] = "close"  # the unread rest of the body must not be taken for a request
    return response


def _redirects_never_cached(response: Response) -> Response:
    """Every redirect the gateway answers itself is a login, hand-off or logout step, most of them setting a
    cookie (Flask's login cookie is added after this hook): no cache may keep one for another user."""
    if 300 <= response.status_code < 400:
        response.headers["Cache-Control"] = "no-store"
    return response


def _wire_ecps(app: Flask, login_cookie_secret: str) -> None:
    """Flask's session is only the e-CPS login cookie: state, nonce and PKCE bound to this browser."""
    app.config.update(
        SECRET_KEY=login_cookie_secret,
        SESSION_COOKIE_NAME=LOGIN_COOKIE_NAME,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        # Lax: PSC's redirect back is a top-level GET navigation from another site; it must carry the cookie.
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/",
    )


#: Reached by internal names (load balancer probes, the portal fetching the JWKS): no Host check. Nor on the
#: refusal page (asked by nginx only): the decision judged the Host already, and for a request nginx refused
#: over the client's limit (no decision) the page does not depend on it, so nginx keeps one page for every
#: Host rather than asking the gateway again for each one a client makes up.
_ANY_HOST_PATHS = frozenset(
    f"{GATEWAY_PREFIX}/{name}" for name in ("healthz", "readyz", "jwks.json", "refused")
)


def _refuse_bad_target() -> Response | None:
    gateway = gateway_of()
    problem = request.environ.get(BAD_TARGET_KEY)
    if problem is not None:
        audit_event(gateway, "bad_request", reasons=[Reason.BAD_REQUEST_PATH.value], detail=problem)
        return refuse(Reason.BAD_REQUEST_PATH, next_path="/")
    problem = request.environ.get(BAD_HEADER_KEY)
    if problem is not None:
        audit_event(gateway, "bad_request", reasons=[Reason.BAD_REQUEST_HEADER.value], detail=problem)
        return refuse(Reason.BAD_REQUEST_HEADER, next_path="/")
    if request.path in _ANY_HOST_PATHS:
        return None
    host = request_host(gateway)
    reason = refused_host(gateway, request.environ, host, request.environ.get("HTTP_HOST", ""))
    return refuse(reason, next_path="/") if reason is not None else None


_LIMITER = "gateway_login_limiter"
_NOT_RATE_LIMITED = frozenset({ecps.BACKCHANNEL_LOGOUT_ENDPOINT, ecps.CALLBACK_ENDPOINT})


def _method_not_allowed(error: MethodNotAllowed) -> Response:
    return refuse_method(error.valid_methods or ())


def _too_many_requests(error: Exception) -> Response:
    limiter = current_app.extensions.get(_LIMITER)
    limit = limiter.current_limit if limiter is not None else None
    retry_after = max(1, math.ceil(limit.reset_at - time.time())) if limit is not None else 60
    audit_event(
        gateway_of(),
        "rate_limited",
        decision="deny",
        reasons=[Reason.RATE_LIMITED.value],
        endpoint=request.endpoint,
    )
    return refuse(Reason.RATE_LIMITED, retry_after=retry_after)


def _psc_state_check(client: ProSanteConnect) -> Callable[[], None]:
    def check() -> None:
        status = client.status()
        if status.state is not ProviderState.UP:
            detail = f": {status.detail}" if status.detail else ""
            raise NotReady(f"Pro Santé Connect {status.state.value}{detail}")

    return check
