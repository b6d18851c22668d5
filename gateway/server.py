"""Run the gateway under gunicorn (production) or Werkzeug (``--debug`` only).

Why gunicorn and not granian: granian 2.8 is faster on hello-world, but its WSGI environ has no raw request
target (no RAW_URI/REQUEST_URI) and PATH_INFO arrives with ``%2F`` already decoded to ``/``, so the gateway
could not refuse encoded slashes and would match a different path than the portal sees. gunicorn gives
RAW_URI. Measured figures: README.md, "Performance".
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker
from gunicorn.workers.gthread import ThreadWorker

from gateway.config_source import ConfigErrors
from gateway.settings import Settings

log = logging.getLogger("gateway.server")

#: prometheus_client's multiprocess directory variable (read by gateway.metrics at import time).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class LoadedConfig:
    """Settings and policies validated in the master, and the factory workers build their app with."""

    settings: Settings
    app_factory: Callable[[], Flask]


#: Re-reads and validates the configuration; raises ConfigErrors with every error.
ConfigLoader = Callable[[], LoadedConfig]


class GatewayArbiter(Arbiter):
    """gunicorn's master, except that a reload (SIGHUP) first validates the new configuration: when it is
    refused, the running workers are left alone instead of being replaced by workers that cannot start."""

    def reload(self) -> None:
        if self.app.accept_new_config():
            super().reload()


#: How long a thread that has just answered on a kept-alive connection waits for the next request on it.
KEEPALIVE_LINGER = 0.05
#: While lingering, how often the thread checks whether another connection is waiting for a thread.
_LINGER_SLICE_MS = 2


class LingeringThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, except that a thread that has just answered on a kept-alive connection
    waits briefly for the next request on it instead of handing the connection straight back.

    Why: with plain gthread every request on a kept-alive connection crosses threads three times (the main
    thread's poller, a pool thread, back to the poller through a pipe). On this 2-vCPU VM those wake-ups cost
    about 0.2 ms per request (README, "Performance"). The wait is short (``KEEPALIVE_LINGER``) and given up as
    soon as another connection waits for a thread, so idle or slow clients still cannot hold the pool.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Connections submitted to the pool and not yet picked up by a thread.
        self._queued = 0
        self._queued_lock = threading.Lock()

    def handle_quit(self, sig: int, frame: Any) -> None:
        # Ctrl-C / SIGQUIT. gthread's handler first calls the pool's shutdown(), which takes the pool's lock;
        # when the signal lands while this (main) thread is inside submit() holding that lock, the worker
        # deadlocks until the arbiter's SIGKILL (seen in tests/devtools/test_demo.py). The base handler only
        # marks the worker stopped and exits; interpreter exit then shuts the pool down (and lingering
        # threads stop as soon as they see ``alive`` false).
        Worker.handle_quit(self, sig, frame)

    def enqueue_req(self, conn: Any) -> None:
        with self._queued_lock:
            self._queued += 1
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        with self._queued_lock:
            self._queued -= 1
        while True:
            keepalive = super().handle(conn)
            if keepalive is not True or conn.is_http2 or not self.alive:
                return keepalive
            if conn.parser.unreader.buf.getvalue():
                continue  # the next request is already read (pipelining)
            if not self._next_request_arrives(conn.sock):
                return keepalive  # back to the poller, as plain gthread does

    def _next_request_arrives(self, sock: Any) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        slices = max(1, int(KEEPALIVE_LINGER * 1000 / _LINGER_SLICE_MS))
        for _ in range(slices):
            if self._queued > 0 or not self.alive:
                return False
            if poller.poll(_LINGER_SLICE_MS):
                return True
        return False


class GatewayServer(BaseApplication):
    """gunicorn with threaded workers; each worker builds its own app (connection pools are per process)."""

    def __init__(
        self,
        settings: Settings,
        app_factory: Callable[[], Flask],
        *,
        reload_config: ConfigLoader | None = None,
    ) -> None:
        self._settings = settings
        self._app_factory = app_factory
        self._reload_config = reload_config
        super().__init__()

    def accept_new_config(self) -> bool:
        """Validate the configuration files again (master, on SIGHUP); adopt them only if all is well."""
        if self._reload_config is None:
            return True
        try:
            config = self._reload_config()
        except ConfigErrors as exc:
            _reload_refused(self._settings, exc)
            return False
        except Exception as exc:  # an unexpected error must not kill the master and its healthy workers
            log.exception("configuration reload failed")
            _reload_refused(self._settings, exc)
            return False
        self._settings, self._app_factory = config.settings, config.app_factory
        _reload_accepted(config.settings)
        return True

    def run(self) -> None:
        try:
            GatewayArbiter(self).run()
        except RuntimeError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(1)

    def load_config(self) -> None:
        server = self._settings.server
        options: dict[str, Any] = {
            "bind": [server.listen],
            "workers": server.workers,
            "worker_class": LingeringThreadWorker,
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
            "pidfile": str(server.pid_file) if server.pid_file else None,
            "when_ready": _start_metrics_listener(self._settings),
            "child_exit": _forget_worker_metrics,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app_factory()


def serve(
    settings: Settings,
    app_factory: Callable[[], Flask],
    *,
    debug: bool = False,
    reload_config: ConfigLoader | None = None,
) -> None:
    if debug:
        app_factory().run(
            host=settings.server.host, port=settings.server.port, debug=True, use_reloader=False
        )
        return
    GatewayServer(settings, app_factory, reload_config=reload_config).run()


# --- Metrics in the master -------------------------------------------------------------------------------


def prepare_metrics_dir() -> Path:
    """A fresh private directory for the workers' metric files; MUST run before gateway.metrics is imported.

    A directory shared with an earlier run would add a dead server's counters to this one's.
    """
    directory = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    os.environ[METRICS_DIR_ENV] = str(directory)
    return directory


def remove_metrics_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _start_metrics_listener(settings: Settings) -> Callable[[Any], None]:
    def when_ready(_arbiter: Any) -> None:
        # Once, in the master: a reload replaces workers, never this listener.
        if settings.metrics is not None:
            from gateway import metrics

            metrics.serve_metrics(settings.metrics.listen)
            log.info("metrics on http://%s/metrics", settings.metrics.listen)

    return when_ready


def _forget_worker_metrics(_arbiter: Any, worker: Any) -> None:
    if os.environ.get(METRICS_DIR_ENV):
        from gateway import metrics

        metrics.worker_exited(worker.pid)


# --- Reload outcome: logged, audited, counted -------------------------------------------------------------


def _reload_refused(settings: Settings, error: Exception) -> None:
    errors = [str(e) for e in error.errors] if isinstance(error, ConfigErrors) else [type(error).__name__]
    for message in errors:
        log.error("configuration reload refused, the running configuration stays: %s", message)
    _audit_reload(settings, "deny", errors)
    _count_reload("refused")


def _reload_accepted(settings: Settings) -> None:
    log.info("configuration reloaded: replacing workers gracefully")
    _audit_reload(settings, "allow", [])
    _count_reload("accepted")


def _audit_reload(settings: Settings, decision: str, errors: list[str]) -> None:
    from gateway.runtime import build_audit_log

    audit = build_audit_log(settings)
    try:
        audit.record("config_reload", decision=decision, errors=errors)
    finally:
        if settings.audit.file is not None:
            audit.close()


def _count_reload(outcome: str) -> None:
    if os.environ.get(METRICS_DIR_ENV):
        from gateway import metrics

        metrics.config_reload(outcome)
