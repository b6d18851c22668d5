"""Requests the gateway must refuse before anything reaches the portal: a real gunicorn gateway in front of a
recording portal (tests/support/upstream.py) that proves what it received."""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.audit import audit_records
from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running
from tests.support.upstream import gunicorn_argv, recorded


@dataclass(frozen=True)
class Stack:
    port: int
    record: Path
    audit: Path

    def received(self) -> list[dict[str, object]]:
        return recorded(self.record)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, assertion_key: Path) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("refused")
    record = directory / "portal.jsonl"
    portal_port, port = free_port(), free_port()
    portal = gunicorn_argv(portal_port, app="tests.support.upstream:recording_app")
    config = write_config(
        directory / "gateway",
        upstream_url=f"http://127.0.0.1:{portal_port}",
        assertion_key=assertion_key,
        listen=f"127.0.0.1:{port}",
    )
    with (
        running(
            portal, portal_port, env=dict(os.environ, UPSTREAM_RECORD=str(record)), log=directory / "p.log"
        ),
        running(serve_argv(config), port, log=directory / "gateway.log"),
    ):
        yield Stack(port, record, directory / "gateway" / "audit.log")


def raw_get(stack: Stack, target: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5)
    try:
        connection.request("GET", target, headers={"Accept": "text/html"})
        response = connection.getresponse()
        return response.status, response.getheader("X-Gateway-Reason") or ""
    finally:
        connection.close()


@pytest.mark.parametrize(
    "target",
    [
        "/echo/public/%252e%252e/protected/x",
        "/echo/public/%25%32%65%25%32%65/protected/x",
        "/echo/public/..%252fprotected/x",
        "/echo/public/%EF%BC%8E%EF%BC%8E/protected/x",
        "/echo/public/%E2%80%A5/protected/x",
        "/echo/public/..%E2%88%95protected",
        "/echo/public/..%C2%A5protected",
        "/echo/public/a/b//..//..",
    ],
)
def test_ambiguous_paths_are_refused_and_never_reach_the_portal(stack: Stack, target: str) -> None:
    before = len(stack.received())
    assert raw_get(stack, target) == (400, "bad_request_path")
    assert stack.received()[before:] == []
    assert audit_records(stack.audit)[-1]["reasons"] == ["bad_request_path"]
    # The same gateway still forwards a plain public request (the portal is up and recording).
    assert raw_get(stack, "/echo/public/ok")[0] == 200
    assert stack.received()[-1]["raw_uri"] == "/echo/public/ok"


def raw_exchange(stack: Stack, head: bytes, body: bytes, *, half_close: bool = False) -> bytes:
    """Send a request byte for byte (``half_close``: then stop sending); the whole answer."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


CHUNKED_HEAD = (
    b"POST /echo/public/upload HTTP/1.1\r\nHost: portal.test\r\nAccept: text/html\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize(
    ("body", "half_close"),
    [
        (b"5\r\nhello\r\nZZ\r\nxx\r\n0\r\n\r\n", False),  # a chunk size that is not hex
        (b"5\r\nhello\r\n1000\r\npartial", True),  # cut short: the client stops mid-chunk
        (b"5\r\nhello\r\n", True),  # no last chunk
        (b"3\r\nhello\r\n0\r\n\r\n", False),  # more data than the chunk size says
    ],
)
def test_a_malformed_chunked_body_is_a_400_and_nothing_reaches_the_portal(
    stack: Stack, body: bytes, half_close: bool
) -> None:
    before = len(stack.received())
    answer = raw_exchange(stack, CHUNKED_HEAD, body, half_close=half_close)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"X-Gateway-Reason: bad_request_body" in answer and b"Traceback" not in answer
    assert stack.received()[before:] == []
    assert audit_records(stack.audit)[-1]["reasons"] == ["bad_request_body"]


def test_a_well_formed_chunked_body_reaches_the_portal_whole_with_its_length(stack: Stack) -> None:
    answer = raw_exchange(stack, CHUNKED_HEAD, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    received = stack.received()[-1]
    assert received["body_length"] == 11 and received["content_length"] == "11"
    assert "transfer-encoding" not in received["headers"]
