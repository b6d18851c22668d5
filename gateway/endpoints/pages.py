"""The gateway's own pages under /.gateway/: login choices, public key, static files, liveness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_from_directory

from gateway.policy.decision import Reason
from gateway.responses import bounded_next_path
from gateway.runtime import GATEWAY_PREFIX, audit_event, gateway_of, refuse

_STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def safe_next_path(value: str | None) -> str:
    """A same-site path to return to after login; anything else (absolute URL, //host, \\) becomes '/'."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or "\\" in value:
        return "/"
    if any(ord(c) < 0x20 for c in value):
        return "/"
    return bounded_next_path(value)


def blueprint() -> Blueprint:
    pages = Blueprint("gateway_pages", __name__, url_prefix=GATEWAY_PREFIX)

    @pages.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    @pages.get("/jwks.json")
    def jwks() -> Any:
        response = jsonify(gateway_of().signer.jwks)
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @pages.get("/login")
    def login() -> Response:
        response = refuse(Reason.UNAUTHENTICATED, next_path=safe_next_path(request.args.get("next")))
        response.status_code = 200
        return response

    @pages.route("/<path:unknown>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    def not_ours(unknown: str) -> Response:
        # /.gateway/ belongs to the gateway: an unknown path there never falls through to the portal.
        audit_event(gateway_of(), "bad_request", reasons=[Reason.UNKNOWN_GATEWAY_PATH.value])
        return refuse(Reason.UNKNOWN_GATEWAY_PATH, next_path="/")

    @pages.get("/static/<path:name>")
    def static(name: str) -> Response:
        return send_from_directory(_STATIC_DIR, name, max_age=3600)

    return pages
