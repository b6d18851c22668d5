"""Run the gateway under gunicorn (production) or Werkzeug (``--debug`` only).

Why gunicorn and not granian: granian 2.8 is faster on hello-world, but its WSGI environ has no raw request
target (no RAW_URI/REQUEST_URI) and PATH_INFO arrives with ``%2F`` already decoded to ``/``, so the gateway
could not refuse encoded slashes and would match a different path than the portal sees. gunicorn gives
RAW_URI. Measured figures: README.md, "Performance".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from gateway.settings import Settings


class GatewayServer(BaseApplication):  # type: ignore[misc]
    """gunicorn with threaded workers; each worker builds its own app (connection pools are per process)."""

    def __init__(self, settings: Settings, app_factory: Callable[[], Flask]) -> None:
        self._settings = settings
        self._app_factory = app_factory
        super().__init__()

    def load_config(self) -> None:
        server = self._settings.server
        options: dict[str, Any] = {
            "bind": [server.listen],
            "workers": server.workers,
            "worker_class": "gthread",
            "threads": server.threads,
            "keepalive": 75,
            "timeout": 0,  # gthread workers heartbeat from the main thread: long downloads are fine
            "graceful_timeout": 30,
            "control_socket_disable": True,
            # The gateway decides itself whom to trust for X-Forwarded-*; gunicorn must not rewrite the scheme.
            "forwarded_allow_ips": "",
            "secure_scheme_headers": {},
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "info",
            "proc_name": "cps-gateway",
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app_factory()


def serve(settings: Settings, app_factory: Callable[[], Flask], *, debug: bool = False) -> None:
    if debug:
        app_factory().run(
            host=settings.server.host, port=settings.server.port, debug=True, use_reloader=False
        )
        return
    GatewayServer(settings, app_factory).run()
