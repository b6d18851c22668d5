"""The embedded default (the demo) run verbatim: its fixed loopback ports, held by one test at a time.

Its ports are fixed by gateway/default/gateway.yaml, so two test runs on one machine (several engineers
share it) would take them from each other: a file lock serialises the tests that run it, across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import PYTHON

ORIGIN = "http://127.0.0.1:8080"
#: The embedded default's listeners: gateway, metrics, demo portal, PSC stand-in, nginx card host.
DEMO_PORTS = {
    "gateway": 8080,
    "metrics": 9108,
    "demo portal": 8081,
    "PSC stand-in": 8082,
    "card host": 8443,
}
LOCK_FILE = Path("/tmp/cps-gateway-demo-ports.lock")
UP = "The demo is up"
LAST_BANNER_LINE = "Ctrl-C stops everything."
LOCK_WAIT = 600.0


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def demo_ports() -> Iterator[None]:
    """Hold the demo's ports for this block (waiting for another test run to release them)."""
    with LOCK_FILE.open("a") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{LOCK_FILE} held for {LOCK_WAIT} s by another test run") from None
                time.sleep(0.5)
        try:
            taken = [name for name, port in DEMO_PORTS.items() if listening(port)]
            assert not taken, f"the demo's ports are in use ({', '.join(taken)}): stop the running demo first"
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def wait_for_banner(demo: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if LAST_BANNER_LINE in text:
            return text
        assert demo.poll() is None, f"gateway demo exited with {demo.returncode}:\n{text}"
        time.sleep(0.2)
    raise AssertionError(f"no banner after {timeout} s:\n{log.read_text(errors='replace')}")


def stop_like_ctrl_c(demo: subprocess.Popen[bytes]) -> None:
    """A terminal's Ctrl-C: SIGINT to the foreground process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(demo.pid, signal.SIGINT)
    try:
        demo.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)
        demo.wait(10)
        raise


@contextlib.contextmanager
def running_demo(directory: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        demo = subprocess.Popen(
            [PYTHON, "-m", "gateway.cli", "demo"],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield demo
    finally:
        stop_like_ctrl_c(demo)
