"""Streaming, pooled forwarding to the portal (urllib3), with explicit timeouts and named failures."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from gateway import metrics
from gateway.policy.decision import Reason
from gateway.wsgi import RequestBodyTimeout

CHUNK_SIZE = 64 * 1024
#: Longest wait for a concurrency slot while the portal keeps freeing them (see :class:`Upstream`).
SLOT_WAIT = 0.25


class UpstreamError(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ClientBodyError(Exception):
    """Reading the client's request body failed while it was being forwarded (e.g. too slow): the client's
    fault, not the portal's. Deliberately not an OSError: urllib3 would report it as a broken portal."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Upstream:
    """One connection pool per process to the portal; thread-safe (the pool is).

    At most ``max_concurrent`` requests are forwarded at once: beyond, :meth:`send` fails fast with
    ``upstream_busy`` instead of taking one more thread into a wait on a slow portal, so that the threads left
    keep serving the gateway's own pages (health, login). A slot is held from :meth:`send` until the body of
    the answer is closed (:class:`StreamedBody`). A healthy portal under load frees slots every few
    milliseconds: a request finding none waits for one up to ``SLOT_WAIT``, but only while some slot was
    taken or freed within that time; when the portal is slow (every request in flight is older than that and
    none finished since) it is refused at once.
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
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        #: When a slot was last taken or freed: long ago means every request in flight is old.
        self._last_change = 0.0
        metrics.upstream_concurrency_limit(max_concurrent)
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        tls = {"ca_certs": ca_file} if url.startswith("https://") and ca_file else {}
        self.pool = urllib3.connectionpool.connection_from_url(
            url,
            maxsize=pool_size,
            block=False,
            timeout=self.timeout,
            retries=False,
            blocksize=CHUNK_SIZE,
            **tls,
        )
        self.host_header = (
            self.pool.host if self.pool.port in (None, 80, 443) else f"{self.pool.host}:{self.pool.port}"
        )

    def send(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: Any = None,
        *,
        chunked: bool = False,
    ) -> StreamedBody:
        """Send a request whose body streams from ``body`` (file-like or iterable); the answer's body is unread.

        The caller owns one concurrency slot until it closes the returned :class:`StreamedBody`.
        """
        if not self._slots.acquire(blocking=False) and (
            time.monotonic() - self._last_change > SLOT_WAIT or not self._slots.acquire(timeout=SLOT_WAIT)
        ):
            metrics.upstream_busy()
            raise UpstreamError(
                Reason.UPSTREAM_BUSY,
                f"{self.max_concurrent} portal requests already in flight in this worker",
            )
        self._last_change = time.monotonic()
        metrics.upstream_started()
        try:
            return StreamedBody(self._urlopen(method, target, headers, body, chunked), self._release)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        metrics.upstream_finished()
        self._last_change = time.monotonic()
        self._slots.release()

    def _urlopen(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: Any, chunked: bool
    ) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.urlopen(
                method,
                target,
                body=body,
                headers=urllib3.HTTPHeaderDict(headers),
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
                chunked=chunked,
                timeout=self.timeout,
                release_conn=False,
            )
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise UpstreamError(_timeout_reason(exc), f"the portal did not answer in time: {exc}") from None
        except (NewConnectionError, ProtocolError, MaxRetryError, HTTPError, OSError) as exc:
            raise UpstreamError(Reason.UPSTREAM_UNAVAILABLE, f"the portal is unreachable: {exc}") from None

    def close(self) -> None:
        self.pool.close()


def _timeout_reason(exc: Exception) -> Reason:
    return Reason.UPSTREAM_UNAVAILABLE if isinstance(exc, ConnectTimeoutError) else Reason.UPSTREAM_TIMEOUT


class StreamedBody:
    """The portal's answer: its status and headers, and its body as a WSGI iterable. Closing it returns the
    connection to the pool (only when the body was read cleanly) and the request's concurrency slot."""

    def __init__(self, response: urllib3.BaseHTTPResponse, release: Callable[[], None]) -> None:
        self._response = response
        self._complete = False
        self._release: Callable[[], None] | None = release
        self.status = response.status
        self.headers = response.headers

    def __iter__(self) -> Iterator[bytes]:
        # A failure here propagates: the headers are already sent, cutting the connection is the only honest
        # signal left.
        for chunk in self._response.stream(CHUNK_SIZE, decode_content=False):
            if chunk:
                yield chunk
        self._complete = True

    def close(self) -> None:
        if self._release is None:
            return
        try:
            if not self._complete:
                self._response.close()  # never hand a half-read connection back to the pool
            self._response.release_conn()
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
    spooled = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - handed to urllib3
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
    """The client's body as urllib3 reads it, with the client's failures named as such."""

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
