"""create_app(settings): wiring only — settings, policies, stores, upstream, blueprints."""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from gateway.audit import AuditLog
from gateway.endpoints import card, pages
from gateway.endpoints.proxy import ALL_METHODS, proxy_view
from gateway.policy.decision import Reason
from gateway.policy.loader import LoadedPolicies
from gateway.runtime import build_gateway, gateway_of, read_policies, refuse, request_id
from gateway.sessions import SessionStore
from gateway.settings import Settings
from gateway.wsgi import BAD_TARGET_KEY, NormalisedTargetMiddleware

log = logging.getLogger("gateway")

__all__ = ["create_app", "gateway_of", "read_policies"]


def create_app(
    settings: Settings,
    *,
    policies: LoadedPolicies | None = None,
    sessions: SessionStore | None = None,
    audit: AuditLog | None = None,
) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config.update(MAX_FORM_MEMORY_SIZE=64 * 1024, PROPAGATE_EXCEPTIONS=False)
    loaded = policies or read_policies(settings)
    for warning in loaded.warnings:
        log.warning("policy: %s", warning)
    app.extensions["gateway"] = build_gateway(settings, loaded, sessions=sessions, audit=audit)

    app.register_blueprint(pages.blueprint())
    if settings.card is not None:
        app.register_blueprint(card.blueprint())
    for rule in ("/", "/<path:path>"):
        app.add_url_rule(
            rule,
            "proxy",
            proxy_view,
            methods=ALL_METHODS,
            provide_automatic_options=False,
            strict_slashes=False,
        )
    app.before_request(_refuse_bad_target)
    app.register_error_handler(Exception, _unexpected_error)
    app.wsgi_app = NormalisedTargetMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


def _refuse_bad_target() -> Response | None:
    problem = request.environ.get(BAD_TARGET_KEY)
    if problem is None:
        return None
    gateway = gateway_of()
    gateway.audit.record(
        "bad_request",
        request_id=request_id(),
        client_ip=request.environ.get("REMOTE_ADDR", ""),
        reasons=[Reason.BAD_REQUEST_PATH.value],
        detail=problem,
    )
    return refuse(Reason.BAD_REQUEST_PATH, next_path="/")


def _unexpected_error(error: Exception) -> Response:
    if isinstance(error, HTTPException):
        return error  # type: ignore[return-value]
    log.exception("unexpected error (request %s)", request_id())
    response = refuse(Reason.UPSTREAM_UNAVAILABLE, next_path="/")
    response.status_code = 500
    return response
