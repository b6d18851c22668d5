"""The gateway's worker (gateway/worker.py) in real `gateway serve` processes, with real sockets: clients that
never finish a request head, idle connections, bodies that stop coming, clients that stop reading, and the
same slow clients behind nginx."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from pathlib import Path

import pytest
import requests

from tests.support.audit import audit_records
from tests.support.clients import UNFINISHED_HEAD, read_answer, stalled_connections
from tests.support.config import write_config
from tests.support.gateways import serve_argv, serving, status_of_get
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, running_nginx
from tests.support.processes import free_port, running

# --- No client holds a thread without sending work (issue 12, item 4) -----------------------------------


def test_unfinished_heads_and_idle_connections_hold_no_thread(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with (
        serving(tmp_path, upstream_url, assertion_key, threads=4, header_timeout="60s") as (port, _),
        stalled_connections(port, unfinished_heads=300, idle=300),
    ):
        # Four threads, 600 connections that asked for nothing yet: new clients are still served.
        assert [status_of_get(port) for _ in range(20)] == [200] * 20
        kept_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(20):
            kept_alive.request("GET", "/hello")
            assert kept_alive.getresponse().read().startswith(b"<!doctype html>")
        kept_alive.close()


def test_a_request_head_must_be_complete_within_header_timeout(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with serving(tmp_path, upstream_url, assertion_key, header_timeout="1s") as (port, _):
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(UNFINISHED_HEAD)
        started = time.monotonic()
        answer = read_answer(slow)  # until the gateway closes the connection
        slow.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert "Requête incomplète".encode() in answer
        assert time.monotonic() - started < 4.5  # closed by the gateway, not by the client's 5 s timeout


@pytest.mark.parametrize("pace", ["stalls", "drips"])
def test_a_request_body_must_keep_coming(
    tmp_path: Path, upstream_url: str, assertion_key: Path, pace: str
) -> None:
    server = {"body_timeout": "1s", "body_min_rate": 100}
    with serving(tmp_path, upstream_url, assertion_key, **server) as (port, _):
        client = socket.create_connection(("127.0.0.1", port), timeout=6)
        client.sendall(
            b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"x" * 10
        )
        started = time.monotonic()
        if pace == "drips":  # one byte every 0.5 s: never silent for body_timeout, far below 100 bytes/s
            with contextlib.suppress(OSError):
                while time.monotonic() - started < 5:
                    time.sleep(0.5)
                    client.sendall(b"x")
        answer = read_answer(client)
        client.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"client_timeout" in answer  # the gateway's page, with its reason
        [record] = audit_records(tmp_path / "audit.log", "bad_request")
        assert record["reasons"] == ["client_timeout"]


def test_a_client_that_stops_reading_its_answer_frees_its_thread(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with serving(tmp_path, upstream_url, assertion_key, threads=1, body_timeout="1s") as (port, _):
        reader = socket.create_connection(("127.0.0.1", port), timeout=5)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.sendall(b"GET /bytes/500000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reader.recv(100)  # the answer started; now this client reads no more
        # The only thread is stuck sending to it until body_timeout; then the next client is served.
        assert status_of_get(port, timeout=10) == 200
        reader.close()


# --- Behind nginx (the recommended deployment), the same clients never reach the gateway --------------


def test_behind_nginx_unfinished_heads_and_idle_connections_leave_the_gateway_serving(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, listen=f"127.0.0.1:{port}",
        extra={"server": {"threads": 4}, "forward_auth": {"trusted_nginx": ["127.0.0.1/32"]}},
    )  # fmt: skip
    values = {"GATEWAY": f"127.0.0.1:{port}", "PORTAL": upstream_url.removeprefix("http://")}
    with (
        running(serve_argv(config), port, log=tmp_path / "gateway.log"),
        running_nginx(tmp_path / "nginx", FORWARD_AUTH_TEMPLATE, values) as nginx,
        stalled_connections(nginx.port, unfinished_heads=300, idle=300),
    ):
        for _ in range(10):
            assert requests.get(nginx.base_url + "/hello", timeout=5).status_code == 200
            assert requests.get(nginx.base_url + "/.gateway/healthz", timeout=5).status_code == 200
