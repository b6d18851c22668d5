"""The gunicorn master (gateway/server.py) as a real process: connections spread across its workers, and
connections queued for a dead worker reach its replacement."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

from tests.support.gateways import serving, status_of_get

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
    with serving(tmp_path, upstream_url, assertion_key, workers=2, threads=4) as (port, master):
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
    with serving(tmp_path, upstream_url, assertion_key, workers=2, threads=4) as (port, master):
        killed = spawned_workers(master, 2)[0]
        os.kill(killed, signal.SIGKILL)
        # Connections hashed to the dead worker's listening socket wait for the replacement instead of
        # being reset: the master keeps that socket open.
        assert [status_of_get(port, timeout=15) for _ in range(16)] == [200] * 16
        assert killed not in worker_pids(master)
