"""``gateway serve`` as a real process: metrics on their own listener, hot reload without dropped requests."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.audit import audit_records
from tests.support.config import TEST_POLICIES, write_config
from tests.support.gateways import running_gateways, serve_argv
from tests.support.metrics import metric_value
from tests.support.processes import PYTHON, free_port, running, wait_until
from tests.support.redis import redis_server

HELLO_DENIED = TEST_POLICIES.replace("paths: [/hello, ", "paths: [") + (
    "  - name: hello-closed\n    match: { path: /hello }\n    action: deny\n"
)


@dataclass
class Served:
    base_url: str
    config: Path
    directory: Path
    metrics_url: str

    def audit_events(self, event: str) -> list[dict]:
        return audit_records(self.directory / "audit.log", event)

    def master_pid(self) -> int:
        return int((self.directory / "gateway.pid").read_text().strip())

    def gateway(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [PYTHON, "-m", "gateway.cli", *args, "--config", str(self.config)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def served(tmp_path: Path, upstream_url: str, assertion_key: Path) -> Iterator[Served]:
    port, metrics_port = free_port(), free_port()
    with redis_server() as redis:
        config = write_config(
            tmp_path,
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            listen=f"127.0.0.1:{port}",
            extra={
                "server": {"workers": 2, "threads": 8, "pid_file": "gateway.pid"},
                "sessions": {"store": redis.url},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            },
        )
        argv = serve_argv(config)
        with running(argv, port, log=tmp_path / "gateway.log"):
            served = Served(f"http://127.0.0.1:{port}", config, tmp_path, f"http://127.0.0.1:{metrics_port}")
            wait_until(lambda: _answers(served.metrics_url + "/metrics"))
            yield served


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_metrics_are_served_on_their_own_listener_aggregated_over_workers(served: Served) -> None:
    for _ in range(20):
        assert requests.get(served.base_url + "/hello", timeout=5).status_code == 200
    assert requests.get(served.base_url + "/echo/protected/x", timeout=5).status_code == 401
    text = requests.get(served.metrics_url + "/metrics", timeout=5).text
    assert metric_value(text, "gateway_requests_total", decision="allow", reason="public_route") == 20
    assert metric_value(text, "gateway_requests_total", decision="login", reason="unauthenticated") == 1
    assert metric_value(text, "gateway_upstream_latency_seconds_count") == 20
    # The portal's port never exposes metrics: /metrics there is just an unmatched (denied) request.
    assert requests.get(served.base_url + "/metrics", timeout=5).status_code == 403


def test_reload_adopts_new_policies_without_dropping_a_request(served: Served) -> None:
    failures: list[str] = []
    statuses: list[int] = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            try:
                # A new connection each time: keep-alive connections to an old worker are closed by design.
                answer = requests.get(served.base_url + "/hello", timeout=5, headers={"Connection": "close"})
                statuses.append(answer.status_code)
                if answer.status_code not in (200, 403):
                    failures.append(f"status {answer.status_code}")
            except requests.RequestException as exc:
                failures.append(type(exc).__name__)

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.3)
        (served.directory / "policies" / "test.yaml").write_text(HELLO_DENIED)
        result = served.gateway("reload")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: bool(statuses) and statuses[-1] == 403)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join(10)
    assert failures == []
    assert 200 in statuses and statuses[-1] == 403
    assert len(statuses) > 20
    assert requests.get(served.base_url + "/hello", timeout=5).status_code == 403
    assert served.audit_events("config_reload")[-1]["decision"] == "allow"


def test_broken_policy_is_refused_and_the_old_policy_stays_in_force(served: Served) -> None:
    (served.directory / "policies" / "test.yaml").write_text("rules:\n  - name: [unclosed\n")
    refused = served.gateway("reload")
    assert refused.returncode == 2 and "configuration refused" in refused.stderr
    # The master validates on its own too: signal it directly, as `kill -HUP` would.
    os.kill(served.master_pid(), signal.SIGHUP)
    wait_until(lambda: bool(served.audit_events("config_reload")))
    event = served.audit_events("config_reload")[-1]
    assert event["decision"] == "deny" and event["errors"]
    assert "test.yaml" in event["errors"][0]
    for _ in range(10):
        assert requests.get(served.base_url + "/hello", timeout=5).status_code == 200
    text = requests.get(served.metrics_url + "/metrics", timeout=5).text
    assert metric_value(text, "gateway_config_reloads_total", outcome="refused") == 1


def test_an_idle_kept_alive_connection_does_not_hold_the_only_thread(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    extra = {"server": {"workers": 1, "threads": 1}}
    with running_gateways(
        tmp_path, 1, upstream_url=upstream_url, assertion_key=assertion_key, extra=extra
    ) as (url,):
        host, port = url.removeprefix("http://").split(":")
        idle = http.client.HTTPConnection(host, int(port), timeout=5)
        for _ in range(20):  # requests that follow each other on one connection keep its thread
            idle.request("GET", "/hello")
            assert idle.getresponse().read().startswith(b"<!doctype html>")
        # The connection now sits idle, kept alive: another client must still be served by the one thread.
        started = time.monotonic()
        other = http.client.HTTPConnection(host, int(port), timeout=5)
        other.request("GET", "/hello")
        assert other.getresponse().status == 200
        assert time.monotonic() - started < 2
        idle.request("GET", "/hello")  # and the idle connection was kept, not dropped
        assert idle.getresponse().status == 200
        idle.close()
        other.close()
