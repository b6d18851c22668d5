"""HTTP requests exactly as written: the request target byte for byte (no client-side normalisation), repeated
headers, the client's source address chosen (a loopback address of its own, so that no server mistakes the
test client for a trusted hop)."""

from __future__ import annotations

import http.client
from collections.abc import Sequence
from dataclasses import dataclass

CLIENT_ADDRESS = "127.0.0.9"


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def raw_request(
    port: int,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    host: str | None = None,
    source: str = CLIENT_ADDRESS,
    body: bytes = b"",
) -> RawResponse:
    """Send ``method target`` to 127.0.0.1:``port`` with exactly ``headers`` (Host: 127.0.0.1:port unless
    ``host`` or a Host header is given)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        if not any(name.lower() == "host" for name, _ in headers):
            connection.putheader("Host", host or f"127.0.0.1:{port}")
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return RawResponse(response.status, response.getheaders(), response.read())
    finally:
        connection.close()
