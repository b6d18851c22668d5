"""The bound on concurrent portal requests per worker, with a real gateway process in front of a slow portal."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.support.audit import audit_records
from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.metrics import scraped_value
from tests.support.processes import free_port, running

SLOW = 3  # seconds the portal takes on /slow/3


def test_beyond_the_bound_portal_requests_get_a_fast_503_and_the_gateway_pages_still_answer(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, listen=f"127.0.0.1:{port}",
        extra={
            "server": {"threads": 4},
            "upstream": {"max_concurrent": 2, "read_timeout": "10s"},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        },
    )  # fmt: skip
    base, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    with (
        running(serve_argv(config), port, log=tmp_path / "gateway.log"),
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        # Twice as many requests to the slow portal as the worker has threads.
        slow = [pool.submit(requests.get, f"{base}/slow/{SLOW}", timeout=10) for _ in range(8)]
        deadline = time.monotonic() + 5
        while scraped_value(metrics_url, "gateway_upstream_in_flight") < 2:
            assert time.monotonic() < deadline, "the slow requests never reached the portal"
            time.sleep(0.05)
        # While the portal is slow, the gateway's own pages answer, and the next portal request is refused
        # at once (well before the portal would answer it).
        assert requests.get(f"{base}/.gateway/healthz", timeout=SLOW - 1).status_code == 200
        login = requests.get(f"{base}/.gateway/login", timeout=SLOW - 1, headers={"Accept": "text/html"})
        assert login.status_code == 200
        refused = requests.get(f"{base}/hello", timeout=SLOW - 1, headers={"Accept": "text/html"})
        assert refused.status_code == 503
        assert refused.headers["X-Gateway-Reason"] == "upstream_busy"
        assert "surchargé" in refused.text
        statuses = sorted(answer.result().status_code for answer in slow)
        assert statuses == [200, 200] + [503] * 6
        # Slots come back when the answers are done.
        assert requests.get(f"{base}/hello", timeout=5).status_code == 200
        assert scraped_value(metrics_url, "gateway_upstream_concurrency_limit") == 2
        assert scraped_value(metrics_url, "gateway_upstream_busy_total") == 7
    refusals = audit_records(tmp_path / "audit.log", "upstream_error")
    assert len(refusals) == 7 and all(record["reasons"] == ["upstream_busy"] for record in refusals)
