"""A portal behind the gateway, checking its assertion with gateway.portal: a Flask app with the extension
under /flask/ and a plain WSGI app with the middleware under /wsgi/ (gunicorn serves ``app``). Every page
answers the professional it was given as JSON, and the assertion it came with (so a test can replay it).
The gateway's JWKS URL comes from the environment (PORTAL_GATEWAY_JWKS)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from gateway.portal import (
    ENVIRON_KEY,
    AssertionMiddleware,
    AssertionVerifier,
    GatewayAssertion,
    GatewayKeys,
    Professional,
    current_professional,
)


def described(professional: Professional | None, token: str | None) -> dict[str, Any]:
    if professional is None:
        return {"professional": None, "token": token}
    fields = asdict(professional)
    fields.pop("claims")
    fields["login_time"] = professional.login_time.timestamp()
    fields["professions"] = list(professional.professions)
    return {"professional": fields, "token": token}


def flask_portal(verifier: AssertionVerifier) -> Flask:
    portal = Flask(__name__)
    gateway = GatewayAssertion(portal, verifier=verifier)

    @portal.route("/public", methods=["GET"])
    @gateway.optional
    def public() -> Any:
        return jsonify(described(current_professional(), request.headers.get("X-Gateway-Assertion")))

    @portal.route("/<path:anything>", methods=["GET", "POST"])
    def protected(anything: str) -> Any:
        return jsonify(described(current_professional(), request.headers.get("X-Gateway-Assertion")))

    return portal


def wsgi_portal(verifier: AssertionVerifier) -> Callable[..., Iterable[bytes]]:
    def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = json.dumps(described(environ[ENVIRON_KEY], environ.get("HTTP_X_GATEWAY_ASSERTION")))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    return AssertionMiddleware(echo, verifier, public_paths=["/public"])


def _app() -> Callable[..., Iterable[bytes]]:
    jwks = os.environ.get("PORTAL_GATEWAY_JWKS", "http://127.0.0.1:9/.gateway/jwks.json")
    verifier = AssertionVerifier(GatewayKeys(jwks, timeout=10))

    def not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    mounts = {"/flask": flask_portal(verifier), "/wsgi": wsgi_portal(verifier)}
    return DispatcherMiddleware(not_found, mounts)  # type: ignore[arg-type]


app = _app()
