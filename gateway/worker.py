"""The gateway's gunicorn worker: no client holds a thread without sending work, and a request crosses as
few threads as possible.

- The worker's main thread is a poller (epoll, one-shot registrations): it accepts connections and reads
  request heads without blocking; a thread gets a connection only once a whole head has arrived. New, idle
  kept-alive and slow-header connections cost a file descriptor, never a thread. A head must be complete
  ``server.header_timeout`` after its first byte (else 408); an idle connection closes after
  ``server.keepalive_timeout``; with ``server.max_connections`` open, the longest-idle one is closed to admit
  a new one; a head larger than ``MAX_HEAD_BYTES`` is answered 431.
- Threads take complete heads from a queue and serve them with gunicorn's own parser and WSGI plumbing.
  Request bodies and answers have deadlines (:class:`_ClientUnreader`, SO_RCVTIMEO / SO_SNDTIMEO).
- A thread that has answered on a kept-alive connection waits briefly (``KEEPALIVE_LINGER``) for the next
  request on it, unless other connections wait for a thread; otherwise it re-arms the connection in the
  poller itself (epoll is thread-safe) without waking the main thread. gunicorn's gthread worker crosses
  three threads per request (poller, pool thread through a Future, back through a pipe) and toggles the
  socket's blocking mode twice; here sockets stay blocking (the poller reads with MSG_DONTWAIT).
- Closing connections are half-closed and drained by the poller (RFC 9112 9.6), not by a blocking linger.
- A request to one of the app's raw routes (``RAW_ROUTES_ATTRIBUTE``: forward-auth's decision endpoint) is
  answered from its head alone, without gunicorn's parser, a WSGI environ or the app: only when the head has
  the plain shape nginx sends (exact request line, each field once, no body, nothing gunicorn would refuse or
  rewrite); any other head takes the usual way, so odd requests are judged exactly as before.

gunicorn's ``handle_request`` (gthread) serves each request; HTTP/2 and TLS are not offered (the gateway
sits behind a TLS terminator).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import heapq
import itertools
import os
import queue
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from gunicorn import http
from gunicorn.http import errors as parse_errors
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.base import Worker
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, ThreadWorker
from werkzeug.test import EnvironBuilder, run_wsgi_app

from gateway.settings import ServerSettings
from gateway.wsgi import BAD_HEADER_KEY, BAD_TARGET_KEY, RAW_ROUTES_ATTRIBUTE, RawRoute, RequestBodyTimeout

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
#: Connections accepted in one go when a listening socket is readable.
_ACCEPT_BATCH = 64
#: A connection watched by the poller: one event, then it is disarmed until re-armed.
_ARMED = select.EPOLLIN | select.EPOLLONESHOT
#: An RFC 9110 field name, without "_" (gunicorn drops such fields: X-Original_URI must not pass for one).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+")
#: Bytes gunicorn would refuse, or a peer could read otherwise, in a field value (HTAB is fine).
_ODD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: gunicorn's limits on a request head (limit_request_fields, limit_request_field_size).
_MAX_FIELDS = 100
_MAX_FIELD_BYTES = 8190
#: Fields that announce a body or change the connection: a head with one of them takes the usual way.
_NOT_RAW_FIELDS = frozenset(
    "HTTP_" + name
    for name in ("CONTENT_LENGTH", "TRANSFER_ENCODING", "CONNECTION", "EXPECT", "UPGRADE", "TE", "TRAILER")
)


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


class _State(enum.Enum):
    REQUEST = "request"  # in the poller, waiting for the first byte of a request (new or kept alive)
    HEAD = "head"  # in the poller, waiting for the rest of a request head
    CLOSING = "closing"  # in the poller, half-closed, draining the client's last bytes
    BUSY = "busy"  # queued for a thread, or served by one


class _Connection:
    """A client connection: what gunicorn's handle_request needs (sock, client, server, parser), the head
    being gathered, and its place in the poller."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any, deadlines: ClientDeadlines):
        # Threads read and write blocking, bounded by kernel timeouts; the poller reads with MSG_DONTWAIT.
        sock.setblocking(True)
        timeval = _timeval(deadlines.body_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.sock, self.client, self.server, self.fd = sock, client, server, sock.fileno()
        self.parser = http.get_parser(cfg, sock, client)
        self.parser.unreader = self.unreader = _ClientUnreader(sock, deadlines)
        self.head = bytearray()
        self.head_deadline = 0.0
        self.header_timeout = deadlines.header_timeout
        self.state = _State.BUSY
        #: Bumped at every change of state: older timeout entries are void.
        self.epoch = 0
        self.readable = select.poll()
        self.readable.register(sock, select.POLLIN)

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
        if ahead:
            return self.gather(ahead, now)
        return self.head.find(_HEAD_END) >= 0  # left behind a head answered from a raw route

    def take_head(self, end: int, now: float) -> bytes:
        """The first ``end`` bytes of the gathered head (one whole head); what follows it stays."""
        head = bytes(self.head[:end])
        del self.head[:end]
        if self.head:
            self.head_deadline = now + self.header_timeout
        return head

    def hand_over_head(self) -> None:
        """The gathered head goes to the parser, which reads it before touching the socket."""
        self.unreader.unread(bytes(self.head))
        self.head.clear()


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _Next(enum.Enum):
    """What a thread does with a connection it lets go of."""

    CLOSE = "close"
    IDLE = "idle"
    PARTIAL_HEAD = "partial_head"


#: What gunicorn's parser refuses as a malformed request (its 400s), and how the app names it.
_MALFORMED: dict[type[BaseException], tuple[str, str]] = {
    parse_errors.InvalidRequestLine: (BAD_TARGET_KEY, "a request line"),
    parse_errors.InvalidRequestMethod: (BAD_TARGET_KEY, "a request method"),
    parse_errors.InvalidHTTPVersion: (BAD_TARGET_KEY, "an HTTP version"),
    parse_errors.InvalidHeader: (BAD_HEADER_KEY, "a header"),
    parse_errors.InvalidHeaderName: (BAD_HEADER_KEY, "a header name"),
    parse_errors.ObsoleteFolding: (BAD_HEADER_KEY, "a folded header"),
}
_FRAMING = frozenset({"content-length", "connection", "transfer-encoding"})


class GatewayWorker(ThreadWorker):
    """See the module's documentation. Subclasses gthread for its request handling (``handle_request``),
    error pages and signal handling; its pool, poller and connection life cycle are replaced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = getattr(self.app, "settings", None)
        server = settings.server if settings is not None else ServerSettings.model_validate({})
        self.deadlines = ClientDeadlines.of(server)
        self._epoll: Any = None
        self._ready: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        #: Guards what both the poller and the threads change: the connections, their states and timeouts.
        self._lock = threading.Lock()
        self._conns: dict[int, _Connection] = {}
        #: (expires, sequence, connection, epoch) of every connection in the poller.
        self._timeouts: list[tuple[float, int, _Connection, int]] = []
        self._sequence = itertools.count()
        #: Connections waiting for a request, longest-idle first: evicted when max_connections are open.
        self._idle: dict[_Connection, None] = {}
        #: Request line -> raw route (see the module documentation); read from the app in ``run``.
        self._raw_routes: dict[bytes, RawRoute] = {}

    def init_process(self) -> None:
        self._epoll = select.epoll()
        Worker.init_process(self)  # not gthread's: its pool, selector and pipe are not used

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.alive = False  # the signal also wakes the poller (gunicorn's wakeup pipe is registered)

    def handle_quit(self, sig: int, frame: Any) -> None:
        Worker.handle_quit(self, sig, frame)  # threads are daemons: the process exits with the main thread

    # --- The poller (main thread) ---------------------------------------------------------------------

    def run(self) -> None:
        routes: dict[str, RawRoute] = getattr(self.wsgi, RAW_ROUTES_ATTRIBUTE, None) or {}
        self._raw_routes = {
            f"GET {path} HTTP/1.1\r\n".encode("ascii"): route for path, route in routes.items()
        }
        for number in range(self.cfg.threads):
            threading.Thread(target=self._serve, name=f"gateway-{number}", daemon=True).start()
        self._epoll.register(self.PIPE[0], select.EPOLLIN)
        listeners = {listener.fileno(): (listener, listener.getsockname()) for listener in self.sockets}
        for listener, _ in listeners.values():
            listener.setblocking(False)
        accepting = False
        while self.alive:
            self.notify()
            wanted = self.nr_conns < self.worker_connections or bool(self._idle)
            if wanted != accepting:
                accepting = self._accept_from(listeners, wanted)
            self._dispatch(self._epoll.poll(self._next_timeout()), listeners)
            if not self.is_parent_alive():
                break
            self._expire(time.monotonic())
        if accepting:
            self._accept_from(listeners, False)
        self._stop_gracefully()

    def _accept_from(self, listeners: dict[int, Any], accepting: bool) -> bool:
        for fd in listeners:
            if accepting:
                self._epoll.register(fd, select.EPOLLIN)
            else:
                self._epoll.unregister(fd)
        return accepting

    def _dispatch(self, events: list[tuple[int, int]], listeners: dict[int, Any]) -> None:
        for fd, _mask in events:
            listening = listeners.get(fd)
            if listening is not None:
                self._accept(*listening)
            elif fd == self.PIPE[0]:
                with contextlib.suppress(OSError):
                    while os.read(fd, 4096):
                        pass
            elif (conn := self._conns.get(fd)) is not None:
                if conn.state is _State.CLOSING:
                    self._drain_closing(conn)
                elif conn.state is not _State.BUSY:
                    self._readable(conn)

    def _stop_gracefully(self) -> None:
        # Idle connections stay briefly: a request already on its way is answered with Connection: close.
        now = time.monotonic()
        with self._lock:
            for conn in self._idle:
                conn.epoch += 1
                heapq.heappush(
                    self._timeouts, (now + STOP_KEEPALIVE_LINGER, next(self._sequence), conn, conn.epoch)
                )
        deadline = now + self.cfg.graceful_timeout
        while self.nr_conns > 0 and time.monotonic() < deadline:
            self.notify()
            self._dispatch(self._epoll.poll(self._next_timeout()), {})
            self._expire(time.monotonic())
        with self._lock:
            remaining = list(self._conns.values())
        for conn in remaining:
            conn.sock.close()
        for _ in range(self.cfg.threads):
            self._ready.put(None)
        self._epoll.close()
        for listener in self.sockets:
            listener.close()

    def _accept(self, listener: Any, server: Any) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self.nr_conns >= self.worker_connections and not self._evict_longest_idle():
                return
            try:
                client, address = listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    raise
                return
            conn = _Connection(self.cfg, client, address, server, self.deadlines)
            with self._lock:
                self.nr_conns += 1
                self._conns[conn.fd] = conn
            self._watch(conn, _State.REQUEST, time.monotonic() + self.cfg.keepalive, new=True)

    def _evict_longest_idle(self) -> bool:
        with self._lock:
            conn = next(iter(self._idle), None)
        if conn is None:
            return False
        self._close_now(conn)
        return True

    def _readable(self, conn: _Connection) -> None:
        """A connection waiting for a request head became readable (and was disarmed by epoll)."""
        try:
            data = conn.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._epoll.modify(conn.fd, _ARMED)
            return
        except OSError:
            data = b""
        if not data:
            self._close_now(conn)
            return
        starting = not conn.head
        if conn.gather(data, time.monotonic()):
            with self._lock:
                conn.state, conn.epoch = _State.BUSY, conn.epoch + 1
                self._idle.pop(conn, None)
            self._ready.put(conn)
        elif len(conn.head) > MAX_HEAD_BYTES:
            _count("head_too_large")
            self._refuse(conn, _HEAD_TOO_LARGE)
        elif starting:
            self._watch(conn, _State.HEAD, conn.head_deadline)
        else:
            self._epoll.modify(conn.fd, _ARMED)

    def _next_timeout(self) -> float:
        with self._lock:
            first = self._timeouts[0][0] if self._timeouts else None
        return 1.0 if first is None else min(1.0, max(0.0, first - time.monotonic()))

    def _expire(self, now: float) -> None:
        while True:
            with self._lock:
                if not self._timeouts or self._timeouts[0][0] > now:
                    return
                _expires, _, conn, epoch = heapq.heappop(self._timeouts)
                if epoch != conn.epoch:
                    continue  # the connection moved on since this timeout was set
                state = conn.state
                conn.epoch += 1
            if state is _State.HEAD:
                _count("header_timeout")
                self._refuse(conn, _HEAD_TIMEOUT)
            else:
                self._close_now(conn)

    def _refuse(self, conn: _Connection, answer: bytes) -> None:
        """A short answer from the poller itself (no request reached the app), then a draining close."""
        with contextlib.suppress(OSError):
            conn.sock.send(answer, socket.MSG_DONTWAIT)
        self._close_gracefully(conn)

    def _drain_closing(self, conn: _Connection) -> None:
        try:
            if conn.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT):
                self._epoll.modify(conn.fd, _ARMED)
                return
        except BlockingIOError:
            self._epoll.modify(conn.fd, _ARMED)
            return
        except OSError:
            pass
        self._close_now(conn)

    # --- Shared by the poller and the threads ---------------------------------------------------------

    def _watch(self, conn: _Connection, state: _State, expires: float, *, new: bool = False) -> None:
        """Hand the connection to the poller until it is readable or ``expires``."""
        with (
            self._lock
        ):  # also around epoll: a connection closed meanwhile must not re-arm its fd's next owner
            if self._conns.get(conn.fd) is not conn:
                return  # closed meanwhile (expired, evicted)
            conn.state, conn.epoch = state, conn.epoch + 1
            heapq.heappush(self._timeouts, (expires, next(self._sequence), conn, conn.epoch))
            if state is _State.REQUEST:
                self._idle[conn] = None
            else:
                self._idle.pop(conn, None)
            if new:
                self._epoll.register(conn.fd, _ARMED)
            else:
                self._epoll.modify(conn.fd, _ARMED)

    def _close_gracefully(self, conn: _Connection) -> None:
        """Half-close, then let the poller drain the client's remaining bytes (an RST would destroy the tail
        of the last answer) until it closes too or ``_CLOSE_LINGER`` passes."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn)
            return
        self._watch(conn, _State.CLOSING, time.monotonic() + _CLOSE_LINGER)

    def _close_now(self, conn: _Connection) -> None:
        with self._lock:
            if self._conns.get(conn.fd) is not conn:
                return  # already closed
            del self._conns[conn.fd]
            self._idle.pop(conn, None)
            conn.epoch += 1
            self.nr_conns -= 1
        conn.sock.close()  # also takes it out of the epoll set

    # --- The threads ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        while (conn := self._ready.get()) is not None:
            following = self.handle(conn)
            if following is _Next.CLOSE:
                self._close_gracefully(conn)
                continue
            expires = conn.head_deadline
            if following is _Next.IDLE:
                expires = time.monotonic() + (self.cfg.keepalive if self.alive else STOP_KEEPALIVE_LINGER)
            self._watch(conn, _State.REQUEST if following is _Next.IDLE else _State.HEAD, expires)

    def handle(self, conn: Any) -> _Next:
        """Serve the connection's complete head, and the following ones while they come at once."""
        req = None
        try:
            while True:
                if not self._answered_raw(conn):
                    conn.hand_over_head()
                    req = next(conn.parser)
                    conn.unreader.start_request(time.monotonic())
                    keepalive = self.handle_request(req, conn)
                    if conn.unreader.timed_out or not self._keepalive_after(conn, keepalive):
                        return _Next.CLOSE
                if not self.alive:
                    return _Next.IDLE  # closed after STOP_KEEPALIVE_LINGER
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

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """A request head gunicorn's parser refuses gets the gateway's own 400 page, audited (gunicorn's is a
        bare English page echoing the request line), like any other malformed request."""
        problem = _MALFORMED.get(type(exc))
        if problem is None or not isinstance(addr, tuple):
            super().handle_error(req, client, addr, exc)
            return
        key, what = problem
        environ = EnvironBuilder(path="/", method="GET").get_environ()
        environ.update({"REMOTE_ADDR": str(addr[0]), "RAW_URI": "/"})
        environ[key] = f"{what} the HTTP parser refused ({type(exc).__name__})"
        try:
            body_parts, status, headers = run_wsgi_app(self.wsgi, environ, buffered=True)
            body = b"".join(body_parts)
        except Exception:
            self.log.exception("the page of a malformed request could not be made")
            super().handle_error(req, client, addr, exc)
            return
        fields = [(name, value) for name, value in headers.items() if name.lower() not in _FRAMING]
        fields += [("Content-Length", str(len(body))), ("Connection", "close")]
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields)
        with contextlib.suppress(OSError):
            client.sendall(head.encode("latin-1") + b"\r\n" + body)

    def _answered_raw(self, conn: _Connection) -> bool:
        """Answer the gathered head from a raw route if it is one, in the plain shape; False: not answered."""
        head = conn.head
        route = self._raw_routes.get(bytes(head[: head.find(b"\r\n") + 2])) if self._raw_routes else None
        if route is None or not self.alive or not isinstance(conn.client, tuple):
            return False
        end = head.find(_HEAD_END) + len(_HEAD_END)
        environ = _plain_fields(bytes(head[:end]))
        if environ is None:
            return False
        conn.take_head(end, time.monotonic())
        environ["REMOTE_ADDR"] = str(conn.client[0])
        self.nr += 1
        if self.nr >= self.max_requests:
            self.alive = False  # gunicorn's max_requests: this worker ends after the connection's answer
        conn.sock.sendall(_raw_answer(*route(environ)))
        return True

    def _next_request(self, conn: _Connection) -> _Next | None:
        """None when this thread can serve the connection's next request at once; else what it waits for."""
        if conn.take_read_ahead(time.monotonic()):
            return None
        if self._next_bytes_arrive(conn):
            try:
                data = conn.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = None
            except OSError:
                return _Next.CLOSE
            if data == b"":
                return _Next.CLOSE
            if data and conn.gather(data, time.monotonic()):
                return None
        if not conn.head:
            return _Next.IDLE
        return _Next.CLOSE if len(conn.head) > MAX_HEAD_BYTES else _Next.PARTIAL_HEAD

    def _next_bytes_arrive(self, conn: _Connection) -> bool:
        """Linger on a kept-alive connection while no other connection waits for a thread."""
        for _ in range(max(1, int(KEEPALIVE_LINGER * 1000 / _LINGER_SLICE_MS))):
            if not self._ready.empty() or not self.alive:
                return False
            if conn.readable.poll(_LINGER_SLICE_MS):
                return True
        return False


def _plain_fields(head: bytes) -> dict[str, str] | None:
    """A raw route's request head (request line checked by the caller) as WSGI names (HTTP_*) of its fields,
    or None when it is not of the plain shape (module documentation): gunicorn then parses it as ever."""
    lines = head[: -len(_HEAD_END)].split(b"\r\n")[1:]
    if len(lines) > _MAX_FIELDS:
        return None
    fields: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or len(line) > _MAX_FIELD_BYTES or not _FIELD_NAME.fullmatch(name):
            return None
        if _ODD_VALUE_BYTE.search(value):
            return None
        key = "HTTP_" + name.decode("ascii").upper().replace("-", "_")
        if key in fields or key in _NOT_RAW_FIELDS:
            return None  # repeated: gunicorn would join the values; the usual way judges that
        fields[key] = value.decode("latin-1")
    return fields if "HTTP_HOST" in fields else None


def _raw_answer(status: int, headers: list[tuple[str, str]]) -> bytes:
    """A body-less HTTP/1.1 answer; ValueError (the connection closes) for a value that could split it."""
    lines = [f"HTTP/1.1 {status} {_REASON_PHRASES.get(status, '')}"]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"header {name} holds a line break")
        lines.append(f"{name}: {value}")
    lines.append("Content-Length: 0\r\n\r\n")
    return "\r\n".join(lines).encode("latin-1")


_REASON_PHRASES = {status.value: status.phrase for status in HTTPStatus}


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
