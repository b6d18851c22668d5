"""Streaming, pooled forwarding to the portal, with explicit timeouts and named failures.

The one module that imports httptools: the portal's answers are parsed by llhttp (Node.js's HTTP parser,
in C, strict by default) through it. The request side is small enough to write here: a request line and
header lines (refused if a value could split them), then the body as it arrives (Content-Length, or
spooled by request_body when it came chunked). Why not urllib3 (used before): on this 2-vCPU VM its pure-Python client path cost about ten
times the CPU of this one per proxied request (docs/performance.md), the largest single cost of the
gateway's proxy mode.

What keeps the connection pool honest: a connection goes back to the pool only after a complete answer
that allows keep-alive with nothing after it; a pooled connection that became readable (closed by the
portal) is discarded before use; an answer to HEAD, or one whose body ends when the connection does,
closes its connection. A request that fails on a reused connection before any byte of an answer is sent
once more on a new connection, only when its method is idempotent and it has no body (what nginx does).
"""

from __future__ import annotations

import functools
import itertools
import re
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any
from urllib.parse import urlsplit

import httptools

from gateway import metrics
from gateway.policy.decision import Reason
from gateway.wsgi import RequestBodyTimeout

CHUNK_SIZE = 64 * 1024
#: A request finding every concurrency slot taken waits for one until the oldest request in flight has
#: waited this long for the portal (see :class:`Upstream`).
SLOT_WAIT = 1.0
#: Methods sent a second time when a reused connection turns out closed before any answer (RFC 9110 9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: What may not appear in a request line or header: it would end the line and smuggle another.
_LINE_BREAKERS = re.compile(r"[\r\n\0]")


class UpstreamError(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ClientBodyError(Exception):
    """Reading the client's request body failed while it was being forwarded (e.g. too slow): the client's
    fault, not the portal's."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _StaleConnection(Exception):
    """A reused connection failed before any byte of an answer: the portal had closed it."""


class Upstream:
    """Pooled keep-alive connections to the portal, per process; thread-safe.

    At most ``max_concurrent`` requests are forwarded at once: beyond, :meth:`send` fails fast with
    ``upstream_busy`` instead of taking one more thread into a wait on a slow portal, so that the threads left
    keep serving the gateway's own pages (health, login). A slot is held from :meth:`send` until the body of
    the answer is closed (:class:`StreamedBody`). A request finding every slot taken waits for one while the
    oldest request in flight is younger than ``SLOT_WAIT``: a healthy portal under load (or a gateway short
    of CPU) frees slots within milliseconds; a slow portal holds them longer, and then requests beyond the
    bound are refused at once.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        max_concurrent: int,
        ca_file: str | None = None,
    ) -> None:
        self.url = url
        parts = urlsplit(url)
        self._tls = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
        self._address = (parts.hostname or "", parts.port or (443 if self._tls else 80))
        default_port = parts.port is None or parts.port == (443 if self._tls else 80)
        self.host_header = self._address[0] if default_port else f"{self._address[0]}:{self._address[1]}"
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.pool_size = pool_size
        self._idle: list[_Pooled] = []
        self._idle_lock = threading.Lock()
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        #: When each request in flight took its slot (by a number of its own).
        self._in_flight: dict[int, float] = {}
        self._in_flight_lock = threading.Lock()
        self._numbers = itertools.count()
        metrics.upstream_concurrency_limit(max_concurrent)

    def send(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: Any = None,
    ) -> StreamedBody:
        """Send a request whose body streams from ``body`` (file-like with a Content-Length header, or an
        bytes); the answer's body is not read yet.

        The caller owns one concurrency slot until it closes the returned :class:`StreamedBody`.
        """
        number = self._take_slot()
        release = functools.partial(self._release, number)
        try:
            return self._exchange(method, _request_head(method, target, headers), body, release)
        except BaseException:
            release()
            raise

    def _take_slot(self) -> int:
        while not self._slots.acquire(blocking=False):
            with self._in_flight_lock:
                oldest = min(self._in_flight.values(), default=time.monotonic())
            wait = oldest + SLOT_WAIT - time.monotonic()
            if wait <= 0:
                metrics.upstream_busy()
                raise UpstreamError(
                    Reason.UPSTREAM_BUSY,
                    f"{self.max_concurrent} portal requests in flight in this worker, one for {SLOT_WAIT:g} s",
                )
            if self._slots.acquire(timeout=wait):
                break
        number = next(self._numbers)
        with self._in_flight_lock:
            self._in_flight[number] = time.monotonic()
        metrics.upstream_started()
        return number

    def _exchange(self, method: str, head: bytes, body: Any, release: Callable[[], None]) -> StreamedBody:
        conn, reused = self._connection()
        try:
            return self._answer(conn, reused, method, head, body, release)
        except _StaleConnection as exc:
            if method not in _IDEMPOTENT or body is not None:
                raise UpstreamError(
                    Reason.UPSTREAM_UNAVAILABLE, f"the portal closed the connection: {exc}"
                ) from None
        return self._answer(self._connect(), False, method, head, body, release)

    def _answer(
        self, conn: _Pooled, reused: bool, method: str, head: bytes, body: Any, release: Callable[[], None]
    ) -> StreamedBody:
        answer, sock = _Answer(method), conn.sock
        try:
            sock.sendall(head)
            if body is not None:
                _send_body(sock, body)
            answer.read_head(sock)
        except _StaleConnection:
            sock.close()
            if not reused:
                raise UpstreamError(Reason.UPSTREAM_UNAVAILABLE, "the portal closed the connection") from None
            raise
        except (TimeoutError, BlockingIOError):  # a Python-level or a kernel (SO_RCVTIMEO) timeout
            sock.close()
            raise UpstreamError(Reason.UPSTREAM_TIMEOUT, "the portal did not answer in time") from None
        except (OSError, httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            sock.close()
            if reused and not answer.started and isinstance(exc, OSError):
                raise _StaleConnection(str(exc)) from None
            raise UpstreamError(Reason.UPSTREAM_UNAVAILABLE, f"the portal failed: {exc!r}") from None
        except BaseException:  # the client's body failed (ClientBodyError): where the request ends is lost
            sock.close()
            raise
        return StreamedBody(answer, conn, self._give_back, release)

    def _connection(self) -> tuple[_Pooled, bool]:
        """A pooled connection the portal has not closed meanwhile, or a new one: (connection, reused)."""
        while True:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if not conn.closed_by_portal():
                return conn, True
            conn.sock.close()

    def _connect(self) -> _Pooled:
        try:
            sock = socket.create_connection(self._address, timeout=self.connect_timeout)
        except OSError as exc:
            raise UpstreamError(Reason.UPSTREAM_UNAVAILABLE, f"the portal is unreachable: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self._address[0])
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise UpstreamError(Reason.UPSTREAM_UNAVAILABLE, f"TLS to the portal failed: {exc}") from None
            sock.settimeout(self.read_timeout)
            return _Pooled(sock)
        # Plain TCP: the kernel enforces read_timeout on each read and write (EAGAIN), where a Python-level
        # timeout would add a poll() before every recv() and send().
        sock.settimeout(None)
        timeval = struct.pack("ll", int(self.read_timeout), int(self.read_timeout % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return _Pooled(sock)

    def _give_back(self, conn: _Pooled) -> None:
        with self._idle_lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.sock.close()

    def _release(self, number: int) -> None:
        metrics.upstream_finished()
        with self._in_flight_lock:
            del self._in_flight[number]
        self._slots.release()

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.sock.close()


def _request_head(method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    # Every piece is checked before the line breaks are added: none may add one of its own.
    if " " in target or _LINE_BREAKERS.search("".join(lines)):
        raise UpstreamError(Reason.BAD_REQUEST_PATH, "a request line or header value would break the request")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send_body(sock: socket.socket, body: Any) -> None:
    if isinstance(body, bytes):
        sock.sendall(body)
        return
    while data := body.read(CHUNK_SIZE):
        sock.sendall(data)


class _Pooled:
    """A connection to the portal, with the poll object that tells whether it was closed while idle."""

    __slots__ = ("_readable", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)

    def closed_by_portal(self) -> bool:
        """An idle connection with something to read: the portal closed it (or sent stray bytes)."""
        return bool(self._readable.poll(0))


class _Answer:
    """The portal's answer as llhttp parses it (httptools calls the ``on_*`` methods)."""

    __slots__ = (
        "_interim",
        "_method",
        "_parser",
        "body",
        "complete",
        "headers",
        "headers_done",
        "keep_alive",
        "started",
        "status",
        "trailing",
    )  # fmt: skip

    def __init__(self, method: str) -> None:
        self._method = method
        self._parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.status = 0
        self.started = self.headers_done = self.complete = self._interim = self.keep_alive = False
        #: Bytes came after the final answer: the connection is out of step, never reused.
        self.trailing = False

    # --- llhttp callbacks (they never raise: httptools would wrap the error)

    def on_message_begin(self) -> None:
        if self.complete or self.headers_done:
            self.trailing = True
        else:
            self.headers.clear()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.trailing:
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.trailing:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the final answer follows
        else:
            self.status, self.headers_done = status, True

    def on_body(self, body: bytes) -> None:
        if not self.trailing:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self.trailing:
            self.complete = True
            # Only meaningful now: llhttp forgets it once the message is over.
            self.keep_alive = bool(self._parser.should_keep_alive())

    # --- reading

    def read_head(self, sock: socket.socket) -> None:
        """Read until the final answer's headers."""
        while not self.headers_done:
            self.feed(sock)
        if self._method == "HEAD":
            self.complete = True  # no body, whatever Content-Length says

    def feed(self, sock: socket.socket) -> None:
        data = sock.recv(CHUNK_SIZE)
        if not data:
            if not self.started:
                raise _StaleConnection("closed before answering")
            if self.headers_done and self.ends_with_connection:
                self.complete = True
                return
            raise httptools.HttpParserError("the portal closed the connection in the middle of its answer")
        self.started = True
        self._parser.feed_data(data)

    @property
    def ends_with_connection(self) -> bool:
        """The body ends when the portal closes the connection (no length, not chunked)."""
        if self.status in (204, 304) or self._method == "HEAD":
            return False
        names = {name.lower() for name, _ in self.headers}
        return "content-length" not in names and "transfer-encoding" not in names

    @property
    def reusable(self) -> bool:
        """The connection may carry another request: one complete answer allowing keep-alive, nothing after."""
        return (
            self.complete
            and not self.trailing
            and self._method != "HEAD"
            and not self.ends_with_connection
            and self.keep_alive
        )


class StreamedBody:
    """The portal's answer: its status and headers, and its body as a WSGI iterable. Closing it returns the
    connection to the pool (only when the answer was read completely and allows it) and the request's
    concurrency slot."""

    def __init__(
        self,
        answer: _Answer,
        conn: _Pooled,
        give_back: Callable[[_Pooled], None],
        release: Callable[[], None],
    ) -> None:
        self._answer = answer
        self._conn: _Pooled | None = conn
        self._give_back = give_back
        self._release: Callable[[], None] | None = release
        self.status = answer.status
        self.headers = answer.headers

    def __iter__(self) -> Iterator[bytes]:
        # A failure here propagates: the headers are already sent, cutting the connection is the only honest
        # signal left.
        answer, conn = self._answer, self._conn
        assert conn is not None
        while True:
            if answer.body:
                chunks, answer.body = answer.body, []
                yield from chunks
            if answer.complete:
                return
            answer.feed(conn.sock)

    def close(self) -> None:
        if self._release is None:
            return
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                if self._answer.reusable:
                    self._give_back(conn)
                else:
                    conn.sock.close()  # never hand a half-read connection back to the pool
        finally:
            release, self._release = self._release, None
            release()


def request_body(environ: dict[str, Any], stream: Any) -> tuple[Any, bool, str | None]:
    """(body, chunked, content_length) to forward the client's body.

    ``stream`` must stop at the end of the body (Werkzeug's ``request.stream``), never block past it. A body
    with a Content-Length streams as it arrives. A chunked body is read whole first (memory up to
    ``SPOOL_IN_MEMORY``, then a temporary file, as nginx's ``proxy_request_buffering`` does) and forwarded
    with its Content-Length: its framing is only known to be valid at its last chunk, and a malformed one
    must reach the portal not at all, rather than truncated. Raises ClientBodyError before anything is sent.
    """
    length = environ.get("CONTENT_LENGTH") or None
    if length is not None:
        return (_ClientBody(stream) if int(length) > 0 else b""), False, length
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        spooled, size = _spool(_ClientBody(stream))
        return spooled, False, str(size)
    return None, False, None


#: A chunked request body is kept in memory up to this size, then in a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024


def _spool(body: _ClientBody) -> tuple[IO[bytes], int]:
    spooled = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by the caller
    try:
        size = 0
        while chunk := body.read(CHUNK_SIZE):
            spooled.write(chunk)
            size += len(chunk)
    except BaseException:
        spooled.close()
        raise
    spooled.seek(0)
    return spooled, size


class _ClientBody:
    """The client's body as it is forwarded, with the client's failures named as such."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            data: bytes = self._stream.read(size)
        except RequestBodyTimeout as exc:
            raise ClientBodyError(Reason.CLIENT_TIMEOUT, str(exc)) from None
        except (
            Exception
        ) as exc:  # the server's parser of the client's bytes: bad chunk sizes, EOF mid-body...
            raise ClientBodyError(
                Reason.BAD_REQUEST_BODY, f"malformed request body: {type(exc).__name__}"
            ) from None
        return data
