"""Operator endpoints under /.gateway/: readiness (liveness stays in pages.py as /healthz)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from gateway.runtime import GATEWAY_PREFIX, gateway_of


def blueprint() -> Blueprint:
    operations = Blueprint("gateway_operations", __name__, url_prefix=GATEWAY_PREFIX)

    @operations.get("/readyz")
    def readyz() -> Response:
        results = gateway_of().readiness.run()
        ready = not any(result.blocks_readiness for result in results.values())
        response = jsonify(
            status="ready" if ready else "not_ready",
            checks={name: result.as_json() for name, result in results.items()},
        )
        response.status_code = 200 if ready else 503
        response.headers["Cache-Control"] = "no-store"
        return response

    return operations
