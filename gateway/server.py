"""Run the gateway under gunicorn (production) or Werkzeug (``--debug`` only).

Why gunicorn and not granian: granian 2.8 is faster on hello-world, but its WSGI environ has no raw request
target (no RAW_URI/REQUEST_URI) and PATH_INFO arrives with ``%2F`` already decoded to ``/``, so the gateway
could not refuse encoded slashes and would match a different path than the portal sees. gunicorn gives
RAW_URI. Its worker is the gateway's own (gateway/worker.py). Measured figures: docs/performance.md.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn import sock as gunicorn_sock
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from gateway.config_source import ConfigErrors
from gateway.settings import Settings
from gateway.worker import GatewayWorker

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
    """gunicorn's master, with two changes.

    - A reload (SIGHUP) first validates the new configuration: when it is refused, the running workers are
      left alone instead of being replaced by workers that cannot start.
    - One listening socket per worker *slot*, all bound to ``server.listen`` with SO_REUSEPORT: the kernel
      spreads new connections evenly across the slots, so across workers. With one shared socket, whichever
      worker happened to be awake took every new connection (bench runs saw 32/0 splits of 32 kept-alive
      connections, one core idle). The master keeps every slot's socket open: a worker that dies, or is
      replaced by a reload, leaves the connections queued on its socket to its successor on the same slot,
      where per-worker sockets (gunicorn's ``reuse_port``) would reset them when the worker closes its own.
    """

    LISTENERS: list[Any]

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        #: The slots' listeners; None when the listeners were inherited (systemd, re-exec): then shared.
        self._slots: list[Any] | None = None

    def start(self) -> None:
        inherited = os.environ.get("LISTEN_FDS") or os.environ.get("GUNICORN_FD")
        if not self.LISTENERS and not inherited:
            self._slots = [self._new_slot()]
            self.LISTENERS = self._slots
        super().start()

    def _new_slot(self) -> Any:
        (address,) = self.cfg.address
        listener_class = gunicorn_sock._sock_type(address)
        raw = socket.socket(listener_class.FAMILY, socket.SOCK_STREAM)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            raw.bind(address)
        except OSError:
            raw.close()
            raise
        return listener_class(address, self.cfg, self.log, fd=raw.detach())  # listens, non-blocking

    def assign_slot(self, worker: Any) -> None:
        """gunicorn's pre_fork hook (master): the new worker takes the slot with the fewest live workers."""
        if self._slots is None:
            return
        wanted = self.num_workers
        while len(self._slots) < wanted:
            self._slots.append(self._new_slot())
        for surplus in self._slots[wanted:]:  # fewer workers after a reload; old workers hold their copies
            surplus.close()
        del self._slots[wanted:]
        holders = collections.Counter(getattr(w, "slot", None) for w in self.WORKERS.values())
        worker.slot = min(range(wanted), key=lambda index: (holders[index], index))
        worker.sockets = [self._slots[worker.slot]]

    def adopt_new_listeners(self) -> None:
        """gunicorn's on_reload hook: a changed ``server.listen`` made gunicorn open one plain listener in
        place of the slots; bind slots to the new address instead."""
        if self._slots is None or self.LISTENERS is self._slots:
            return
        for listener in self.LISTENERS:
            listener.close()
        self._slots = [self._new_slot()]
        self.LISTENERS = self._slots

    def reload(self) -> None:
        if self.app.accept_new_config():
            super().reload()


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

    @property
    def settings(self) -> Settings:
        return self._settings

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
            "worker_class": GatewayWorker,  # gateway/worker.py
            "threads": server.threads,
            "keepalive": math.ceil(server.keepalive_timeout),
            "worker_connections": server.max_connections,
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
            "when_ready": self._when_ready,
            "child_exit": _forget_worker_metrics,
            "pre_fork": _assign_slot,
            "on_reload": _adopt_new_listeners,
            "post_worker_init": _start_worker_services,
            "worker_exit": _stop_worker_services,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app_factory()

    def _when_ready(self, _arbiter: Any) -> None:
        """Once, in the master: a reload replaces workers, never the metrics listener or the head exporter."""
        settings = self._settings
        if settings.metrics is not None:
            from gateway import metrics

            metrics.serve_metrics(settings.metrics.listen)
            log.info("metrics on http://%s/metrics", settings.metrics.listen)
        _start_head_exporter(self, publish_metrics=settings.metrics is not None)


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


def _start_worker_services(worker: Any) -> None:
    """gunicorn's post_worker_init hook (in each worker, its app loaded): forward-auth's access-stream reader
    (one worker of the instance reads at a time, see gateway/access_stream.py)."""
    from gateway.access import access_stream_reader
    from gateway.access_stream import run_in_background
    from gateway.runtime import gateway_of

    reader = access_stream_reader(gateway_of(worker.wsgi))
    if reader is not None:
        worker.stop_services = run_in_background(reader)


def _stop_worker_services(_arbiter: Any, worker: Any) -> None:
    """gunicorn's worker_exit hook (in the worker): the reader finishes its batch and saves its position."""
    stop = getattr(worker, "stop_services", None)
    if stop is not None:
        stop()


def _assign_slot(arbiter: Any, worker: Any) -> None:
    if isinstance(arbiter, GatewayArbiter):
        arbiter.assign_slot(worker)


def _adopt_new_listeners(arbiter: Any) -> None:
    if isinstance(arbiter, GatewayArbiter):
        arbiter.adopt_new_listeners()


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


def _start_head_exporter(server: GatewayServer, *, publish_metrics: bool) -> None:
    """The audit head (sequence + hash) as a log line on stderr every audit.head_interval, and as metrics,
    from the master alone: one export per instance, whatever the number of workers. Follows reloads."""
    from gateway.audit import Head, HeadExporter

    head_log = logging.getLogger("gateway.audit")
    if not head_log.handlers:  # gunicorn configures its own loggers only: give this one the same format
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(message)s"))
        head_log.addHandler(handler)
        head_log.setLevel(logging.INFO)
        head_log.propagate = False

    def publish(file: str, head: Head) -> None:
        from gateway import metrics

        metrics.audit_head(file, head.seq, head.hash)

    HeadExporter(
        lambda: server.settings.audit.file,
        lambda: server.settings.audit.head_interval,
        publish if publish_metrics else None,
    ).start()


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
    """Never raises: the master outlives any audit outage (the reload itself goes on, logged here)."""
    from gateway.audit import AuditError
    from gateway.runtime import build_audit_log

    audit = build_audit_log(settings)
    try:
        audit.record("config_reload", decision=decision, errors=errors)
    except AuditError as exc:
        log.error("configuration reload (%s) could not be audited: %s", decision, exc)
    finally:
        if settings.audit.file is not None:
            audit.close()


def _count_reload(outcome: str) -> None:
    if os.environ.get(METRICS_DIR_ENV):
        from gateway import metrics

        metrics.config_reload(outcome)
