"""``gateway demo`` (what ``make demo`` runs) as a new user meets it: the demo portal answers through the
gateway, protected pages answer the login page, and Ctrl-C stops every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.support.demo import DEMO_PORTS, ORIGIN, demo_ports, listening
from tests.support.processes import PYTHON, REPO_ROOT


def wait_until_ready(demo: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.poll() is None, f"gateway demo exited with {demo.returncode}:\n{log.read_text()}"
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{ORIGIN}/.gateway/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"gateway demo not ready after {timeout} s:\n{log.read_text()}")


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


def test_demo_serves_the_portal_behind_the_gateway_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    with demo_ports():
        run_demo_and_stop_it(tmp_path)


def run_demo_and_stop_it(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with log.open("wb") as output:
        demo = subprocess.Popen(
            [PYTHON, "-m", "gateway.cli", "demo"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_ready(demo, log)
        home = requests.get(f"{ORIGIN}/", timeout=5)
        assert home.status_code == 200 and "Portail démo" in home.text
        record = requests.get(
            f"{ORIGIN}/patients/180017512345678", headers={"Accept": "text/html"}, timeout=5
        )
        assert record.status_code == 401
        assert "/.gateway/login/ecps" in record.text and "Portail démo" not in record.text
        assert all(listening(port) for port in DEMO_PORTS.values()), log.read_text()
        assert f"{ORIGIN}/" in log.read_text()  # it told the user where to go
        # ... and when a revocation takes effect (the demo's card.crl_refresh).
        assert "gateway dev revoke --label demo-doctor" in log.read_text()
        assert "at its next CRL refresh: within 30 s" in log.read_text()
    finally:
        stop_like_ctrl_c(demo)
    assert demo.returncode == 0, log.read_text()
    still = [name for name, port in DEMO_PORTS.items() if listening(port)]
    assert not still, f"still listening after Ctrl-C: {still}\n{log.read_text()}"
