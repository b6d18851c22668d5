"""The gunicorn server and its worker (gateway/server.py) as real processes, with real sockets: clients that
never finish a request head, idle connections, bodies that stop coming, clients that stop reading, connections
spread across workers, and the same slow clients behind nginx."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.audit import audit_records
from tests.support.clients import UNFINISHED_HEAD, read_answer, stalled_connections
from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, running_nginx
from tests.support.processes import free_port, running
from tests.support.redis import redis_server


@contextlib.contextmanager
def gateway(
    directory: Path, upstream_url: str, assertion_key: Path, **server: Any
) -> Iterator[tuple[int, int]]:
    """A `gateway serve` process with these ``server`` settings: (port, master pid)."""
    port = free_port()
    extra: dict[str, Any] = {"server": server}
    with contextlib.ExitStack() as stack:
        if server.get("workers", 1) > 1:
            extra["sessions"] = {"store": stack.enter_context(redis_server()).url}
        config = write_config(
            directory, upstream_url=upstream_url, assertion_key=assertion_key,
            listen=f"127.0.0.1:{port}", extra=extra,
        )  # fmt: skip
        process = stack.enter_context(running(serve_argv(config), port, log=directory / "gateway.log"))
        yield port, process.pid


def get(port: int, path: str = "/hello", timeout: float = 5) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


# --- No client holds a thread without sending work (issue 12, item 4) -----------------------------------


def test_unfinished_heads_and_idle_connections_hold_no_thread(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with (
        gateway(tmp_path, upstream_url, assertion_key, threads=4, header_timeout="60s") as (port, _),
        stalled_connections(port, unfinished_heads=300, idle=300),
    ):
        # Four threads, 600 connections that asked for nothing yet: new clients are still served.
        assert [get(port) for _ in range(20)] == [200] * 20
        kept_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(20):
            kept_alive.request("GET", "/hello")
            assert kept_alive.getresponse().read().startswith(b"<!doctype html>")
        kept_alive.close()


def test_a_request_head_must_be_complete_within_header_timeout(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with gateway(tmp_path, upstream_url, assertion_key, header_timeout="1s") as (port, _):
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
    with gateway(tmp_path, upstream_url, assertion_key, **server) as (port, _):
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
    with gateway(tmp_path, upstream_url, assertion_key, threads=1, body_timeout="1s") as (port, _):
        reader = socket.create_connection(("127.0.0.1", port), timeout=5)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.sendall(b"GET /bytes/500000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reader.recv(100)  # the answer started; now this client reads no more
        # The only thread is stuck sending to it until body_timeout; then the next client is served.
        assert get(port, timeout=10) == 200
        reader.close()


# --- Connections spread across workers (issue 14, goal 4) -----------------------------------------------


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def spawned_workers(master: int, count: int) -> list[int]:
    """The master's workers, once there are ``count`` (each has its listening socket from then on)."""
    deadline = time.monotonic() + 15
    while len(pids := worker_pids(master)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers not spawned in time")
        time.sleep(0.05)
    return pids


def established_sockets(port: int) -> set[str]:
    """Inodes of the server ends of established connections to ``port`` (from /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01":
            inodes.add(fields[9])
    return inodes


def connections_held(pid: int, inodes: set[str]) -> int:
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            held += target.startswith("socket:[") and target[8:-1] in inodes
    return held


def test_connections_spread_across_workers_even_while_one_is_not_accepting(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with gateway(tmp_path, upstream_url, assertion_key, workers=2, threads=4) as (port, master):
        first, second = spawned_workers(master, 2)
        # A worker busy elsewhere (here: stopped) while 32 clients connect: with one shared listening
        # socket, the other worker would take all 32 and keep them (kept alive) for good.
        os.kill(first, signal.SIGSTOP)
        try:
            clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
            for client in clients:
                client.sendall(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            time.sleep(0.3)
        finally:
            os.kill(first, signal.SIGCONT)
        for client in clients:
            assert client.recv(12) == b"HTTP/1.1 200"
        inodes = established_sockets(port)
        held = {pid: connections_held(pid, inodes) for pid in (first, second)}
        for client in clients:
            client.close()
    assert sum(held.values()) == 32
    assert min(held.values()) >= 4, held  # the kernel's hash: about 16 each, 4 is 1 chance in 10^5


def test_connections_queued_for_a_killed_worker_reach_its_replacement(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with gateway(tmp_path, upstream_url, assertion_key, workers=2, threads=4) as (port, master):
        killed = spawned_workers(master, 2)[0]
        os.kill(killed, signal.SIGKILL)
        # Connections hashed to the dead worker's listening socket wait for the replacement instead of
        # being reset: the master keeps that socket open.
        assert [get(port, timeout=15) for _ in range(16)] == [200] * 16
        assert killed not in worker_pids(master)


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
