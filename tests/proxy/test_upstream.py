"""The portal client: the bound on concurrent requests per worker (a real gateway process in front of a slow
portal), and a connection pool that stays honest with a portal misbehaving byte for byte."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httptools
import pytest
import requests
from flask.testing import FlaskClient

from gateway.proxy.upstream import Upstream, UpstreamError
from tests.support.apps import gateway_app
from tests.support.audit import audit_records
from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.metrics import scraped_value
from tests.support.processes import PYTHON, free_port, running

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


# --- The portal client keeps its connection pool honest (a portal that misbehaves byte for byte) ----------


@pytest.fixture(scope="module")
def raw_portal() -> Iterator[str]:
    port = free_port()
    with running([PYTHON, "-m", "tests.support.raw_portal", "--port", str(port)], port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def client(tmp_path: Path, raw_portal: str, assertion_key: Path) -> Iterator[FlaskClient]:
    with gateway_app(tmp_path, upstream_url=raw_portal, assertion_key=assertion_key) as app:
        yield app.test_client()


def text(client: FlaskClient, case: str, method: str = "GET") -> tuple[int, str]:
    """Status and body; the answer closed, as a WSGI server closes it (its connection goes back to the pool)."""
    with client.open(f"/echo/public/{case}", method=method) as answer:
        return answer.status_code, answer.get_data(as_text=True)


def test_kept_alive_connections_are_reused(client: FlaskClient) -> None:
    first, second = text(client, "ok")[1], text(client, "ok")[1]
    assert first.endswith("request 1")
    assert second == first.replace("request 1", "request 2")


def test_a_body_that_ends_with_the_connection_arrives_whole_and_the_connection_is_not_reused(
    client: FlaskClient,
) -> None:
    assert text(client, "no-length") == (200, "until the end" * 100)
    assert text(client, "ok")[1].endswith("request 1")


def test_interim_answers_are_skipped_and_a_chunked_answer_arrives_whole(client: FlaskClient) -> None:
    assert text(client, "early-hints") == (200, "final")
    assert text(client, "chunked") == (200, "hello world")


def test_bytes_after_an_answer_never_reach_the_next_request(client: FlaskClient) -> None:
    assert text(client, "extra") == (200, "first")
    # The smuggled second answer stays with the discarded connection.
    status, body = text(client, "ok")
    assert status == 200 and body.endswith("request 1")


def test_an_answer_to_head_has_no_body_whatever_its_length(client: FlaskClient) -> None:
    with client.head("/echo/public/head") as answer:
        assert answer.status_code == 200 and answer.headers["Content-Length"] == "1000"
        assert answer.get_data() == b""  # at once: not waiting for 1000 bytes that never come
    assert text(client, "ok")[1].endswith("request 1")  # that connection was not reused


def test_a_truncated_body_is_not_passed_off_as_whole(client: FlaskClient) -> None:
    with client.get("/echo/public/truncated") as answer, pytest.raises(httptools.HttpParserError):
        answer.get_data()  # the client's connection is cut: the answer was promised 100000 bytes
    assert text(client, "ok")[0] == 200


def test_a_connection_the_portal_closed_while_idle_is_not_used(client: FlaskClient) -> None:
    assert text(client, "idle-close")[0] == 200
    time.sleep(0.2)  # the portal's close reaches the pooled connection
    # A POST is never sent twice: it succeeds only because the closed connection was not used at all.
    with client.post("/echo/public/ok", data=b"x" * 10) as answer:
        assert answer.status_code == 200 and answer.get_data(as_text=True).endswith("request 1")


def test_a_reused_connection_closed_before_answering_is_retried_for_idempotent_requests_only(
    client: FlaskClient,
) -> None:
    assert text(client, "close-next")[0] == 200
    assert text(client, "ok")[1].endswith("request 1")  # sent again on a new connection
    assert text(client, "close-next")[0] == 200
    with client.post("/echo/public/ok", data=b"x" * 10, headers={"Accept": "text/html"}) as answer:
        assert answer.status_code == 502  # not sent twice: the portal may have acted on it


def test_a_header_value_that_would_end_its_line_is_never_sent(raw_portal: str) -> None:
    upstream = Upstream(raw_portal, connect_timeout=1, read_timeout=2, pool_size=1, max_concurrent=1)
    try:
        for value in ("a\r\nX-Injected: 1", "a\nX-Injected: 1", "a\rb", "a\0b"):
            with pytest.raises(UpstreamError):
                upstream.send("GET", "/echo/public/ok", [("Host", "portal"), ("X-Test", value)])
        answer = upstream.send("GET", "/echo/public/ok", [("Host", "portal")])  # the slot was given back
        assert b"".join(answer).startswith(b"connection")
        answer.close()
    finally:
        upstream.close()
