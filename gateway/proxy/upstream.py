"""Streaming, pooled forwarding to the portal (urllib3), with explicit timeouts and named failures."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from gateway.policy.decision import Reason

CHUNK_SIZE = 64 * 1024


class UpstreamError(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Upstream:
    """One connection pool per process to the portal; thread-safe (the pool is)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        ca_file: str | None = None,
    ) -> None:
        self.url = url
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
    ) -> urllib3.BaseHTTPResponse:
        """Send a request whose body streams from ``body`` (file-like or iterable); the response is unread."""
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
    """The portal's response body as a WSGI iterable; returns the connection to the pool only when clean."""

    def __init__(self, response: urllib3.BaseHTTPResponse, on_error: Any = None) -> None:
        self._response = response
        self._complete = False
        self._on_error = on_error

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._response.stream(CHUNK_SIZE, decode_content=False):
                if chunk:
                    yield chunk
            self._complete = True
        except (ReadTimeoutError, ProtocolError, OSError) as exc:
            # Headers are already sent: the only honest signal left is to cut the connection.
            if self._on_error is not None:
                self._on_error(exc)
            raise

    def close(self) -> None:
        if not self._complete:
            self._response.close()  # never hand a half-read connection back to the pool
        self._response.release_conn()


def request_body(environ: dict[str, Any], stream: Any) -> tuple[Any, bool, str | None]:
    """(body, chunked, content_length) to forward the client's body as it arrives.

    ``stream`` must stop at the end of the body (Werkzeug's ``request.stream``), never block past it.
    """
    length = environ.get("CONTENT_LENGTH") or None
    if length is not None:
        return (stream if int(length) > 0 else b""), False, length
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _iter_stream(stream), True, None
    return None, False, None


def _iter_stream(stream: Any) -> Iterable[bytes]:
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk
