"""Run the gateway under gunicorn (production) or Werkzeug (``--debug`` only).

Why gunicorn and not granian: granian 2.8 is faster on hello-world, but its WSGI environ has no raw request
target (no RAW_URI/REQUEST_URI) and PATH_INFO arrives with ``%2F`` already decoded to ``/``, so the gateway
could not refuse encoded slashes and would match a different path than the portal sees. gunicorn gives
RAW_URI. Measured figures: README.md, "Performance".
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import heapq
import itertools
import logging
import math
import os
import select
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn import http
from gunicorn import sock as gunicorn_sock
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.base import Worker
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from gateway.config_source import ConfigErrors
from gateway.settings import ServerSettings, Settings
from gateway.wsgi import RequestBodyTimeout

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


#: How long a thread that has just answered on a kept-alive connection waits for the next request on it.
KEEPALIVE_LINGER = 0.05
#: While lingering, how often the thread checks whether another connection is waiting for a thread.
_LINGER_SLICE_MS = 2
#: Longest request head (request line and headers) read by the poller; a longer one is answered 431.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_END = b"\r\n\r\n"
_RECV_SIZE = 64 * 1024
#: How long a closing connection is drained so that the client reads the whole last answer (RFC 9112 9.6).
_CLOSE_LINGER = 2.0
#: Connections accepted in one go when the listening socket is readable.
_ACCEPT_BATCH = 64


class _Waiting(enum.Enum):
    """What a connection handed back to the poller waits for."""

    REQUEST = "request"  # the first byte of its next request (idle: new or kept alive)
    HEAD = "head"  # the rest of a request head already started
    CLOSE = "close"  # the client's end of a connection being closed (draining)
    NOTHING = "nothing"  # not in the poller: a thread has it


@dataclass(frozen=True)
class ClientDeadlines:
    """Read and write deadlines imposed on clients (from ``server.*``; defaults for other apps)."""

    header_timeout: float
    body_timeout: float
    body_min_rate: int
    keepalive_timeout: float

    @classmethod
    def of(cls, server: ServerSettings) -> ClientDeadlines:
        return cls(server.header_timeout, server.body_timeout, server.body_min_rate, server.keepalive_timeout)


class _ClientUnreader(SocketUnreader):
    """The client's bytes after its request head: request bodies, drained leftovers.

    Each ``recv`` waits at most ``body_timeout`` (SO_RCVTIMEO, set once per connection, so no extra system
    call per read) and the body must average ``body_min_rate`` bytes per second after its first
    ``body_timeout`` (a client dripping one byte per timeout would otherwise hold a thread for ever), as
    Apache's mod_reqtimeout does. Either way :class:`RequestBodyTimeout` is raised.
    """

    def __init__(self, sock: socket.socket, deadlines: ClientDeadlines) -> None:
        super().__init__(sock)
        self._timeout = deadlines.body_timeout
        self._min_rate = deadlines.body_min_rate
        self._started = 0.0
        self._received = 0
        #: The current request's body timed out: the connection must close (where its next request would
        #: start is unknown), whatever the app answered.
        self.timed_out = False

    def start_request(self, now: float) -> None:
        self._started, self._received, self.timed_out = now, 0, False

    def chunk(self, size_hint: int | None = None) -> bytes:
        try:
            data: bytes = super().chunk(size_hint)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise self._timeout_error(f"no byte of the request body for {self._timeout:g} s") from None
        self._received += len(data)
        if time.monotonic() > self._started + self._timeout + self._received / self._min_rate:
            raise self._timeout_error(f"the request body arrives slower than {self._min_rate} bytes/s")
        return data

    def _timeout_error(self, detail: str) -> RequestBodyTimeout:
        if not self.timed_out:
            self.timed_out = True
            _count("body_timeout")
        return RequestBodyTimeout(detail)


class _Connection(TConn):
    """A client connection; its request heads are gathered by the poller before a thread takes it."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any, deadlines: ClientDeadlines):
        super().__init__(cfg, sock, client, server)  # leaves the socket non-blocking, for the poller
        # Kernel timeouts for the thread's blocking reads and writes: a client that stops reading its answer
        # or sending its body frees the thread after body_timeout.
        timeval = _timeval(deadlines.body_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.parser = http.get_parser(cfg, sock, client)
        self.parser.unreader = self.unreader = _ClientUnreader(sock, deadlines)
        self.initialized = True  # gthread's init() would only build the parser (no TLS here)
        self.head = bytearray()
        self.head_deadline = 0.0
        self.header_timeout = deadlines.header_timeout
        #: Bumped whenever the connection enters or leaves the poller: older timeout entries are void.
        self.epoch = 0
        self.waiting = _Waiting.NOTHING

    def gather(self, data: bytes, now: float) -> bool:
        """Add bytes of the next request head; True once the head is complete."""
        if not self.head:
            self.head_deadline = now + self.header_timeout
        seen = max(0, len(self.head) - len(_HEAD_END) + 1)
        self.head += data
        return self.head.find(_HEAD_END, seen) >= 0

    def take_read_ahead(self, now: float) -> bool:
        """Move bytes read past the last request (pipelining) into the head; True if that head is complete."""
        ahead = self.unreader.take_buffered()
        return bool(ahead) and self.gather(ahead, now)

    def hand_over_head(self) -> None:
        """The gathered head goes to the parser, which reads it before touching the socket."""
        self.unreader.unread(bytes(self.head))
        self.head.clear()


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _Next(enum.Enum):
    """What a thread hands back when it lets go of a connection."""

    CLOSE = "close"
    IDLE = "idle"
    PARTIAL_HEAD = "partial_head"


class GatewayWorker(ThreadWorker):
    """gunicorn's gthread worker, reorganised so that no client can hold a thread without sending work.

    - The poller (the worker's main thread) accepts connections and reads request heads without blocking;
      a thread gets a connection only once a whole head has arrived. New, idle kept-alive and slow-header
      connections cost a file descriptor, never a thread. A head must be complete ``header_timeout`` after
      its first byte (else 408); an idle connection closes after ``keepalive_timeout``; when
      ``max_connections`` are open, the longest-idle one is closed to admit a new one.
    - In a thread, request bodies and responses have deadlines (:class:`_ClientUnreader`, SO_SNDTIMEO).
    - A thread that has just answered on a kept-alive connection waits briefly (``KEEPALIVE_LINGER``) for the
      next request on it instead of handing it straight back: plain gthread crosses threads three times per
      request (poller, pool thread, back through a pipe), about 0.2 ms on this 2-vCPU VM (README,
      "Performance"). The wait is given up as soon as another connection waits for a thread.
    - Each worker accepts from its own listening socket (SO_REUSEPORT, see :class:`GatewayArbiter`), so the
      kernel spreads connections across workers instead of the first worker awake taking them all.
    - Closing connections are drained by the poller, not by a blocking linger.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = getattr(self.app, "settings", None)
        server = settings.server if settings is not None else ServerSettings.model_validate({})
        self.deadlines = ClientDeadlines.of(server)
        # Connections submitted to the pool and not yet picked up by a thread.
        self._queued = 0
        self._queued_lock = threading.Lock()
        # (expires, sequence, connection, epoch) of every connection waiting in the poller.
        self._timeouts: list[tuple[float, int, _Connection, int]] = []
        self._sequence = itertools.count()
        # Connections waiting for a request, longest-idle first: evicted when max_connections are open.
        self._idle: dict[_Connection, None] = {}

    def handle_quit(self, sig: int, frame: Any) -> None:
        # Ctrl-C / SIGQUIT. gthread's handler first calls the pool's shutdown(), which takes the pool's lock;
        # when the signal lands while this (main) thread is inside submit() holding that lock, the worker
        # deadlocks until the arbiter's SIGKILL (seen in tests/devtools/test_demo.py). The base handler only
        # marks the worker stopped and exits; interpreter exit then shuts the pool down (and lingering
        # threads stop as soon as they see ``alive`` false).
        Worker.handle_quit(self, sig, frame)

    # --- The poller (main thread) ---------------------------------------------------------------------

    def run(self) -> None:
        self.poller.register(
            self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks
        )
        while self.alive:
            self.notify()
            self.set_accept_enabled(self.nr_conns < self.worker_connections or bool(self._idle))
            self.wait_for_and_dispatch_events(timeout=self._next_timeout())
            if not self.is_parent_alive():
                break
            self._expire(time.monotonic())
        self._stop_gracefully()

    def _stop_gracefully(self) -> None:
        self.set_accept_enabled(False)
        # Idle connections stay briefly: a request already on its way is answered with Connection: close.
        stop_linger = time.monotonic() + STOP_KEEPALIVE_LINGER
        for conn in list(self._idle):
            self._wait(conn, _Waiting.REQUEST, min(stop_linger, time.monotonic() + self.cfg.keepalive))
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0 and time.monotonic() < deadline:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=self._next_timeout())
            self._expire(time.monotonic())
        for _expires, _, conn, epoch in self._timeouts:
            if epoch == conn.epoch:
                conn.close()
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    def accept(self, listener: Any) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self.nr_conns >= self.worker_connections and not self._evict_longest_idle():
                return
            try:
                client, address = listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    raise
                return
            self.nr_conns += 1
            conn = _Connection(self.cfg, client, address, listener.getsockname(), self.deadlines)
            self._wait(conn, _Waiting.REQUEST, time.monotonic() + self.cfg.keepalive)

    def _evict_longest_idle(self) -> bool:
        if not self._idle:
            return False
        conn = next(iter(self._idle))
        self._forget(conn)
        self._close_now(conn)
        return True

    def _wait(self, conn: _Connection, waiting: _Waiting, expires: float) -> None:
        """Keep the connection in the poller until it is readable (or closed) or ``expires``."""
        previously = conn.waiting
        conn.waiting = waiting
        conn.epoch += 1
        heapq.heappush(self._timeouts, (expires, next(self._sequence), conn, conn.epoch))
        if waiting is _Waiting.REQUEST:
            self._idle[conn] = None
        else:
            self._idle.pop(conn, None)
        if waiting is _Waiting.CLOSE:
            callback = partial(self._drain_closing, conn)
        elif previously in (_Waiting.REQUEST, _Waiting.HEAD):
            return  # already watched for a request
        else:
            callback = partial(self._readable, conn)
        if previously is _Waiting.NOTHING:
            self.poller.register(conn.sock, selectors.EVENT_READ, callback)
        else:
            self.poller.modify(conn.sock, selectors.EVENT_READ, callback)

    def _forget(self, conn: _Connection) -> None:
        """Out of the poller (its pending timeout becomes void)."""
        if conn.waiting is _Waiting.NOTHING:
            return
        conn.waiting = _Waiting.NOTHING
        conn.epoch += 1
        self._idle.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)

    def _readable(self, conn: _Connection, _sock: Any) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._forget(conn)
            self._close_now(conn)
            return
        now = time.monotonic()
        starting = not conn.head
        if conn.gather(data, now):
            self._forget(conn)
            conn.hand_over_head()
            self.enqueue_req(conn)
        elif len(conn.head) > MAX_HEAD_BYTES:
            self._forget(conn)
            _count("head_too_large")
            self._refuse(conn, _HEAD_TOO_LARGE)
        elif starting:
            self._wait(conn, _Waiting.HEAD, conn.head_deadline)

    def _next_timeout(self) -> float:
        if not self._timeouts:
            return 1.0
        return min(1.0, max(0.0, self._timeouts[0][0] - time.monotonic()))

    def _expire(self, now: float) -> None:
        while self._timeouts and self._timeouts[0][0] <= now:
            _expires, _, conn, epoch = heapq.heappop(self._timeouts)
            if epoch != conn.epoch:
                continue  # the connection moved on since this timeout was set
            waiting = conn.waiting
            self._forget(conn)
            if waiting is _Waiting.HEAD:
                _count("header_timeout")
                self._refuse(conn, _HEAD_TIMEOUT)
            else:
                self._close_now(conn)

    def _refuse(self, conn: _Connection, answer: bytes) -> None:
        """A short answer from the poller itself (no request reached the app), then a draining close."""
        with contextlib.suppress(OSError):
            conn.sock.send(answer)
        self._close_gracefully(conn)

    def _close_gracefully(self, conn: _Connection) -> None:
        """Half-close, then let the poller drain the client's remaining bytes (an RST would destroy the tail
        of the last answer) until it closes too or ``_CLOSE_LINGER`` passes."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn)
            return
        conn.sock.setblocking(False)
        self._wait(conn, _Waiting.CLOSE, time.monotonic() + _CLOSE_LINGER)

    def _drain_closing(self, conn: _Connection, _sock: Any) -> None:
        try:
            if conn.sock.recv(_RECV_SIZE):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._forget(conn)
        self._close_now(conn)

    def _close_now(self, conn: _Connection) -> None:
        self.nr_conns -= 1
        conn.close()

    def enqueue_req(self, conn: Any) -> None:
        with self._queued_lock:
            self._queued += 1
        super().enqueue_req(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        """A thread let go of ``conn`` (runs in the poller)."""
        try:
            following = fs.result() if not fs.cancelled() else _Next.CLOSE
        except Exception:
            following = _Next.CLOSE
        if following is _Next.IDLE:
            conn.sock.setblocking(False)
            expires = time.monotonic() + self.cfg.keepalive
            if not self.alive:
                expires = min(expires, time.monotonic() + STOP_KEEPALIVE_LINGER)
            self._wait(conn, _Waiting.REQUEST, expires)
        elif following is _Next.PARTIAL_HEAD:
            conn.sock.setblocking(False)
            self._wait(conn, _Waiting.HEAD, conn.head_deadline)
        else:
            self._close_gracefully(conn)

    # --- A pool thread --------------------------------------------------------------------------------

    def handle(self, conn: Any) -> _Next:
        with self._queued_lock:
            self._queued -= 1
        req = None
        try:
            conn.sock.setblocking(True)
            while True:
                req = next(conn.parser)
                conn.unreader.start_request(time.monotonic())
                keepalive = self.handle_request(req, conn)
                if conn.unreader.timed_out or not self._keepalive_after(conn, keepalive):
                    return _Next.CLOSE
                if not self.alive:
                    return _Next.IDLE  # the poller closes it after STOP_KEEPALIVE_LINGER
                following = self._next_request(conn)
                if following is not None:
                    return following
        except (http.errors.NoMoreData, StopIteration):
            pass
        except RequestBodyTimeout as exc:  # the app let it through: nothing was answered
            self.log.debug("request body timeout from %s: %s", conn.client, exc)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                _count("send_timeout")  # SO_SNDTIMEO: the client stopped reading its answer
            elif exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as exc:
            self.handle_error(req, conn.sock, conn.client, exc)
        return _Next.CLOSE

    def _next_request(self, conn: _Connection) -> _Next | None:
        """None when this thread can serve the connection's next request at once; else what it waits for."""
        now = time.monotonic()
        if conn.take_read_ahead(now):
            conn.hand_over_head()
            return None
        if self._next_bytes_arrive(conn.sock):
            try:
                data = conn.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = None
            except OSError:
                return _Next.CLOSE
            if data == b"":
                return _Next.CLOSE
            if data and conn.gather(data, time.monotonic()):
                conn.hand_over_head()
                return None
        if not conn.head:
            return _Next.IDLE
        return _Next.CLOSE if len(conn.head) > MAX_HEAD_BYTES else _Next.PARTIAL_HEAD

    def _next_bytes_arrive(self, sock: Any) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        slices = max(1, int(KEEPALIVE_LINGER * 1000 / _LINGER_SLICE_MS))
        for _ in range(slices):
            if self._queued > 0 or not self.alive:
                return False
            if poller.poll(_LINGER_SLICE_MS):
                return True
        return False


def _count(event: str) -> None:
    from gateway import metrics  # after fork: gateway serve has set the metrics directory by then

    metrics.client_connection_closed(event)


def _plain_answer(status: str, text: str) -> bytes:
    body = text.encode("utf-8")
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


# No request reached the app, so no negotiated language: both, French first.
_HEAD_TIMEOUT = _plain_answer(
    "408 Request Timeout",
    "Requête incomplète : l'en-tête n'est pas arrivé à temps.\nRequest incomplete: the header did not arrive in time.\n",
)
_HEAD_TOO_LARGE = _plain_answer(
    "431 Request Header Fields Too Large",
    "En-têtes de requête trop grands.\nRequest header fields too large.\n",
)


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
            "worker_class": GatewayWorker,
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
