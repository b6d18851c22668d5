"""The gateway's worker (gateway/worker.py) in real `gateway serve` processes, with real sockets: clients that
never finish a request head, idle connections, bodies that stop coming, clients that stop reading, and the
same slow clients behind nginx."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.worker import _plain_fields, _raw_answer
from tests.support.audit import audit_records
from tests.support.clients import UNFINISHED_HEAD, read_answer, stalled_connections
from tests.support.config import write_config
from tests.support.gateways import serve_argv, serving, status_of_get
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, running_nginx
from tests.support.processes import free_port, running, wait_until

# --- No client holds a thread without sending work (issue 12, item 4) -----------------------------------


def test_unfinished_heads_and_idle_connections_hold_no_thread(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with serving(tmp_path, upstream_url, assertion_key, threads=4, header_timeout="60s") as (port, _):
        alone = _p99_of_gets(port)
        with stalled_connections(port, unfinished_heads=300, idle=300):
            # Four threads, 600 connections that asked for nothing yet: new clients are still served, as fast.
            among_stalled = _p99_of_gets(port)
            print(
                f"\np99 of a new client's GET: {alone * 1000:.1f} ms alone, {among_stalled * 1000:.1f} ms among 600"
            )
            # 100 ms (issue 12's bound), unless the machine's load alone already makes the client that slow.
            assert among_stalled < max(0.1, 3 * alone)
            kept_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            for _ in range(20):
                kept_alive.request("GET", "/hello")
                assert kept_alive.getresponse().read().startswith(b"<!doctype html>")
            kept_alive.close()


def _p99_of_gets(port: int, count: int = 100) -> float:
    """The 99th percentile of ``count`` GETs, each on a new connection (seconds); every one must answer 200."""
    durations = []
    for _ in range(count):
        started = time.monotonic()
        assert status_of_get(port) == 200
        durations.append(time.monotonic() - started)
    return sorted(durations)[int(count * 0.99) - 1]


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


# --- Decisions answered from the request head, without WSGI (raw routes, issue 14 goal 3) ---------------

#: What nginx's auth_request sub-request looks like (deploy/nginx/forward-auth.conf), up to the original URI.
DECISION_HEAD = (
    "GET /.gateway/auth HTTP/1.1\r\nHost: cps_gateway\r\nX-Original-Method: GET\r\n"
    "X-Original-URI: {uri}\r\nX-Forwarded-Host: portal.test\r\nX-Forwarded-For: 192.0.2.7\r\n"
    "X-Gateway-Session: \r\nX-Request-Id: 0123456789abcdef0123456789abcdef\r\n{more}\r\n"
)


def decision_head(uri: str, more: str = "") -> bytes:
    return DECISION_HEAD.format(uri=uri, more=more).encode("latin-1")


def answers(connection: socket.socket, count: int) -> list[dict[str, str]]:
    """``count`` body-less answers from a kept-alive connection: the status line as ":status", then the
    header fields (lower-case names)."""
    received = b""
    while received.count(b"\r\n\r\n") < count:
        chunk = connection.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    parsed = []
    for head in received.split(b"\r\n\r\n")[:count]:
        status, *lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines)
        parsed.append({":status": status, **{name.lower(): value for name, value in fields.items()}})
    return parsed


@pytest.fixture
def decision_port(tmp_path: Path, upstream_url: str, assertion_key: Path) -> Iterator[int]:
    """A `gateway serve` process that trusts this test as its nginx."""
    port = free_port()
    config = write_config(
        tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, listen=f"127.0.0.1:{port}",
        extra={"server": {"threads": 2}, "forward_auth": {"trusted_nginx": ["127.0.0.1/32"]}},
    )  # fmt: skip
    with running(serve_argv(config), port, log=tmp_path / "gateway.log"):
        yield port


def test_decisions_in_nginx_shape_are_answered_from_the_head_and_like_the_usual_way(
    decision_port: int,
) -> None:
    cases = ["/hello", "/echo/protected/1", "/echo/forbidden/1", "/echo/./protected/1", "/nowhere"]
    with socket.create_connection(("127.0.0.1", decision_port), timeout=5) as connection:
        for uri in cases:
            # One connection, each decision asked in nginx's shape, then with a field that sends it through
            # gunicorn and the app (Connection): both ways give the same decision.
            connection.sendall(decision_head(uri) + decision_head(uri, "Connection: keep-alive\r\n"))
            raw, usual = answers(connection, 2)
            assert "server" not in raw and usual["server"] == "gunicorn"  # the head alone, vs WSGI
            assert raw[":status"].split()[1] == usual[":status"].split()[1], uri
            for name in ("x-gateway-reason", "x-gateway-rule", "x-gateway-cacheable", "x-accel-expires"):
                assert raw.get(name) == usual.get(name), (uri, name)
            assert raw["x-gateway-decision"].split(" id=")[0] == usual["x-gateway-decision"].split(" id=")[0]
    statuses = [raw[":status"] for raw in map(lambda uri: _one(decision_port, decision_head(uri)), cases)]
    assert statuses == [
        "HTTP/1.1 200 OK",
        "HTTP/1.1 401 Unauthorized",
        "HTTP/1.1 403 Forbidden",
        "HTTP/1.1 400 Bad Request",  # not in normal form: nginx would forward it as received
        "HTTP/1.1 403 Forbidden",  # no rule
    ]


def test_a_cookie_header_that_is_not_utf8_is_refused_both_ways(decision_port: int) -> None:
    head = decision_head("/hello", "Cookie: a=\xff\xfe\r\n")
    usual_head = decision_head("/hello", "Cookie: a=\xff\xfe\r\nConnection: keep-alive\r\n")
    with socket.create_connection(("127.0.0.1", decision_port), timeout=5) as connection:
        connection.sendall(head + usual_head)
        raw, usual = answers(connection, 2)
    assert "server" not in raw and usual["server"] == "gunicorn"
    assert raw[":status"].split()[1] == usual[":status"].split()[1] == "400"
    assert raw["x-gateway-reason"] == usual["x-gateway-reason"] == "bad_request_header"


def _one(port: int, head: bytes) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(head)
        return answers(connection, 1)[0]


def test_pipelined_decisions_are_answered_in_order(decision_port: int) -> None:
    heads = [decision_head(uri) for uri in ("/echo/protected/1", "/hello", "/echo/forbidden/2")] * 3
    with socket.create_connection(("127.0.0.1", decision_port), timeout=5) as connection:
        connection.sendall(b"".join(heads[:4]) + heads[4][:30])  # and the start of the fifth
        time.sleep(0.1)
        connection.sendall(heads[4][30:] + b"".join(heads[5:]))
        statuses = [answer[":status"].split()[1] for answer in answers(connection, len(heads))]
    assert statuses == ["401", "200", "403"] * 3


@pytest.mark.parametrize(
    "head",
    [
        # Repeated: gunicorn joins the values ("/hello, /echo/forbidden/1"), which is not a path in normal form.
        decision_head("/hello", "X-Original-URI: /echo/forbidden/1\r\n"),
        # gunicorn drops a field whose name holds "_" (it could pass for X-Original-URI): nothing to judge.
        decision_head("/hello").replace(b"X-Original-URI", b"X-Original_URI"),
        # A body announced: the usual way reads (and here refuses) it.
        decision_head("/hello", "Content-Length: 5\r\n") + b"hello",
        decision_head("/hello", "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
    ],
    ids=["repeated field", "underscore", "content-length", "chunked"],
)
def test_decisions_in_any_other_shape_are_judged_the_usual_way(decision_port: int, head: bytes) -> None:
    answer = _one(decision_port, head)
    assert answer.get("server") == "gunicorn", answer


def test_a_head_only_gunicorn_refuses_is_refused(decision_port: int) -> None:
    for odd in (b"X-Original-URI: /hello\n", b"X-Odd: a\x00b\r\n", b"X-Original-URI : /hello\r\n"):
        head = decision_head("/hello").replace(b"X-Original-URI: /hello\r\n", odd)
        with socket.create_connection(("127.0.0.1", decision_port), timeout=5) as connection:
            connection.sendall(head)
            answer = read_answer(connection)
        assert answer.startswith(b"HTTP/1.1 400 "), (odd, answer[:200])


def test_plain_fields_of_a_head() -> None:
    head = decision_head("/a", "X-Empty:\r\nX-Tab:\tb \r\n")
    fields = _plain_fields(head)
    assert fields is not None
    assert fields["HTTP_X_ORIGINAL_URI"] == "/a"
    assert fields["HTTP_X_EMPTY"] == "" and fields["HTTP_X_TAB"] == "b"
    assert _plain_fields(head.replace(b"Host: cps_gateway\r\n", b"")) is None  # gunicorn's to judge
    assert _plain_fields(decision_head("/a", "X-Many: 1\r\n" * 2)) is None


def test_a_raw_answer_cannot_be_split() -> None:
    assert _raw_answer(200, [("X-A", "b")]) == b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 0\r\n\r\n"
    for value in ("a\r\nSet-Cookie: x=1", "a\nb", "a\rb", "a\0b"):
        with pytest.raises(ValueError):
            _raw_answer(200, [("X-A", value)])


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"GET /patients/180017512345678?q=\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "bad_request_path"),
        (b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Odd: a\x00b\r\n\r\n", "bad_request_header"),
    ],
)
def test_a_request_the_http_parser_refuses_gets_the_gateway_page_and_is_audited(
    tmp_path: Path, decision_port: int, head: bytes, reason: str
) -> None:
    """Was gunicorn's bare English page, echoing the request line, and no audit record."""
    with socket.create_connection(("127.0.0.1", decision_port), timeout=5) as connection:
        connection.sendall(head)
        answer = read_answer(connection)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert f"X-Gateway-Reason: {reason}".encode() in rest
    assert b'lang="fr"' in answer and b"Invalid" not in answer and b"\xff" not in answer  # French page
    wait_until(lambda: bool(audit_records(tmp_path / "audit.log", "bad_request")), timeout=5, what="audited")
    [record] = audit_records(tmp_path / "audit.log", "bad_request")
    assert record["reasons"] == [reason] and "HTTP parser refused" in record["detail"]
