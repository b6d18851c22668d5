"""The access stream (gateway/access_stream.py): every access nginx serves in forward-auth mode is one audit
record. First the reader on real files (rotation, restarts, torn lines), then a real nginx from the shipped
template in front of a real gateway (`gateway serve`) reading its access log."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import requests

from gateway.access_stream import (
    ACCESS_EVENT,
    LINE_FIELDS,
    NGINX_REFUSED_EVENT,
    UNREADABLE_EVENT,
    AccessStream,
    DecisionToken,
    Position,
    StreamHealth,
    access_event,
    position_file,
)
from gateway.audit import AuditLog, verify_audit_file
from gateway.identity import Identity, LoginMethod
from gateway.sessions import RedisSessionStore
from tests.support.audit import audit_records
from tests.support.config import TEST_POLICIES, write_config
from tests.support.flood import flood
from tests.support.gateways import serve_argv
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, Nginx, running_fast_portal, running_nginx
from tests.support.processes import free_port, running, wait_until
from tests.support.raw_http import RawResponse, raw_request
from tests.support.redis import redis_server

COOKIE = "__Host-gateway-session"


def nginx_line(
    request_id: str, *, uri: str = "/patients/1", decision: str = "", cache: str = "MISS"
) -> bytes:
    """One line as the template's cps_gateway_access format writes it."""
    token = (
        decision
        or DecisionToken(
            "allow",
            request_id,
            rule="records",
            reasons=("authenticated",),
            idnat="810001234567",
            method="card",
        ).encode()
    )
    line = {
        "time": f"{time.time():.3f}",
        "request_id": request_id,
        "client_ip": "192.0.2.7",
        "http_method": "GET",
        "uri": uri,
        "status": "200",
        "decision": token,
        "cache": cache,
        "reason": "",
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def append(path: Path, *lines: bytes) -> None:
    with path.open("ab") as file:
        for line in lines:
            file.write(line)


def recorded_ids(audit_file: Path) -> list[str]:
    return [record["request_id"] for record in audit_records(audit_file, ACCESS_EVENT)]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "nginx" / "access.log", tmp_path / "gateway" / "audit.log"


def reader(files: tuple[Path, Path], **options: Any) -> AccessStream:
    access_log, audit_file = files
    stream = AccessStream(access_log, audit_file, AuditLog(audit_file), **options)
    assert stream.try_lead()
    return stream


# --- The decision token ------------------------------------------------------------------------------------


def test_the_decision_token_survives_any_value() -> None:
    token = DecisionToken(
        "allow",
        "0123456789abcdef",
        rule="patient-records",
        reasons=("authenticated",),
        idnat="810001234567",
        method="ecps",
        auth_mode='MOBILE "app" é;\n x=1',
        resource="1 80 01",
    )
    encoded = token.encode()
    assert len(encoded.split(" ")) == 8  # one space between fields, none inside them
    assert '"' not in encoded and "\n" not in encoded and "\\" not in encoded
    assert DecisionToken.decode(encoded) == token
    assert DecisionToken.decode("") is None and DecisionToken.decode("allow id") is None


# --- The reader on real files ------------------------------------------------------------------------------


def test_every_line_becomes_one_chained_record_with_the_access_facts(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    ids = [uuid4().hex for _ in range(5)]
    append(access_log, *(nginx_line(i, cache="HIT" if n else "MISS") for n, i in enumerate(ids)))
    stream = reader(files)
    assert stream.step() == 5
    records = audit_records(audit_file, ACCESS_EVENT)
    assert [r["request_id"] for r in records] == ids
    first = records[0]
    assert (first["idnat"], first["method"], first["rule"], first["decision"]) == (
        "810001234567",
        "card",
        "records",
        "allow",
    )
    assert (first["path"], first["status"], first["client_ip"], first["cached"]) == (
        "/patients/1",
        200,
        "192.0.2.7",
        False,
    )
    assert [r["cached"] for r in records[1:]] == [True] * 4
    assert first["decision_id"] == ids[0]
    assert verify_audit_file(audit_file).ok
    assert stream.step() == 0  # nothing new


def undecided_line(request_id: str, status: str, reason: str = "") -> bytes:
    """One line as the template writes it for a request answered without a decision."""
    line = json.loads(nginx_line(request_id)) | {
        "status": status,
        "decision": "",
        "cache": "",
        "reason": reason,
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def test_consecutive_requests_nginx_refused_itself_are_one_record_listing_each(
    files: tuple[Path, Path],
) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    first, refused, last = uuid4().hex, [uuid4().hex for _ in range(1003)], uuid4().hex
    unreachable, malformed = uuid4().hex, uuid4().hex
    append(
        access_log,
        nginx_line(first),
        *(undecided_line(i, "429", "rate_limited") for i in refused),
        nginx_line(last),
        undecided_line(unreachable, "503"),  # the gateway could not be asked: an access record, as before
        undecided_line(malformed, "400"),
    )
    stream = reader(files)
    assert stream.step() == 1007
    records = [r for r in audit_records(audit_file) if r["event"] in (ACCESS_EVENT, NGINX_REFUSED_EVENT)]
    assert [(r["event"], r.get("count")) for r in records] == [
        (ACCESS_EVENT, None),
        (NGINX_REFUSED_EVENT, 1000),  # at most 1,000 a record
        (NGINX_REFUSED_EVENT, 3),
        (ACCESS_EVENT, None),
        (ACCESS_EVENT, None),
        (NGINX_REFUSED_EVENT, 1),
    ]
    listed = [access for r in records[1:3] for access in r["accesses"]]
    assert [access[1] for access in listed] == refused
    assert listed[0][2:] == ["192.0.2.7", "GET", "/patients/1", 429, "rate_limited"]
    assert [r["request_id"] for r in records[3:5]] == [last, unreachable] and records[4]["status"] == 503
    assert records[5]["accesses"][0][1:2] + records[5]["accesses"][0][5:] == [malformed, 400, ""]
    # Each record's log_position is where its last line ends: a restarted reader records nothing twice.
    positions = [int(r["log_position"].rpartition(":")[2]) for r in records]
    assert positions == sorted(positions) and positions[-1] == access_log.stat().st_size
    assert verify_audit_file(audit_file).ok


def test_a_line_being_written_waits_and_a_torn_one_is_recorded_as_unreadable(
    files: tuple[Path, Path],
) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    whole = nginx_line("a" * 32)
    append(access_log, whole, whole[:40])  # the second is still being written
    stream = reader(files)
    assert stream.step() == 1
    append(access_log, b"garbage\n")  # the rest never came (a crash): the torn line merges with the next
    append(access_log, nginx_line("b" * 32))
    assert stream.step() == 2
    events = [r["event"] for r in audit_records(audit_file)]
    assert events == [ACCESS_EVENT, "access_unreadable", ACCESS_EVENT]


def test_a_new_reader_starts_where_the_last_stopped(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    append(access_log, nginx_line("1" * 32), nginx_line("2" * 32))
    first = reader(files)
    first.step()
    first.release()
    append(access_log, nginx_line("3" * 32))
    second = reader(files)
    assert second.step() == 1
    assert recorded_ids(audit_file) == ["1" * 32, "2" * 32, "3" * 32]


def test_a_reader_that_died_before_saving_its_position_records_nothing_twice(
    files: tuple[Path, Path],
) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    append(access_log, nginx_line("1" * 32))
    first = reader(files)
    first.step()
    stale = position_file(audit_file).read_bytes()
    append(access_log, nginx_line("2" * 32), nginx_line("3" * 32))
    first.step()
    first.release()
    position_file(audit_file).write_bytes(stale)  # as if it died between its records and its position
    second = reader(files)
    assert second.step() == 0
    assert recorded_ids(audit_file) == ["1" * 32, "2" * 32, "3" * 32]


def test_rotation_finishes_the_renamed_file_before_the_new_one(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    append(access_log, nginx_line("1" * 32))
    stream = reader(files, rotation_grace=0.0)
    stream.step()
    rotated = access_log.with_name("access.log.1")
    access_log.rename(rotated)
    append(rotated, nginx_line("2" * 32))  # nginx writes to the old file until it reopens its logs
    append(access_log, nginx_line("3" * 32))  # ...then to the new one
    while stream.step() > 0 or stream._fd < 0 or os.fstat(stream._fd).st_ino != access_log.stat().st_ino:
        pass
    stream.step()
    assert recorded_ids(audit_file) == ["1" * 32, "2" * 32, "3" * 32]


def test_a_restart_after_rotation_finds_the_renamed_file_by_inode(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    append(access_log, nginx_line("1" * 32))
    first = reader(files)
    first.step()
    first.release()
    rotated = access_log.with_name("access.log.1")
    access_log.rename(rotated)
    append(rotated, nginx_line("2" * 32))
    append(access_log, nginx_line("3" * 32))
    second = reader(files, rotation_grace=0.0)
    for _ in range(4):
        second.step()
    assert recorded_ids(audit_file) == ["1" * 32, "2" * 32, "3" * 32]


def test_a_file_truncated_in_place_is_read_again_and_the_gap_recorded(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    append(access_log, nginx_line("1" * 32), nginx_line("2" * 32))
    stream = reader(files)
    stream.step()
    access_log.write_bytes(nginx_line("3" * 32))  # copytruncate, then a new line
    stream.step()
    stream.step()
    events = [(r["event"], r["request_id"]) for r in audit_records(audit_file)]
    assert events == [
        (ACCESS_EVENT, "1" * 32),
        (ACCESS_EVENT, "2" * 32),
        ("access_log_truncated", ""),
        (ACCESS_EVENT, "3" * 32),
    ]


def test_one_reader_at_a_time(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    first = reader(files)
    second = AccessStream(access_log, audit_file, AuditLog(audit_file))
    assert not second.try_lead()
    first.release()
    assert second.try_lead()


def test_records_that_cannot_be_written_are_tried_again_and_health_says_why(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    append(access_log, nginx_line("1" * 32))
    stream = reader(files)
    health = StreamHealth(access_log, audit_file, max_lag=10, check_interval=0)
    blocker = audit_file.parent / "not-a-directory"
    blocker.write_text("")
    stream._audit = AuditLog(blocker / "audit.log")  # ENOTDIR: like a disk that is gone
    assert stream.step() == -1
    assert "cannot be recorded" in (health.problem() or "")
    stream._audit = AuditLog(audit_file)
    assert stream.step() == 1
    assert health.problem() is None
    assert recorded_ids(audit_file) == ["1" * 32]


def test_a_reader_keeping_up_with_lines_that_never_stop_is_not_lagging(
    files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a steady stream nginx writes new lines while each batch is read, so the reader never finds the
    file's end; the trail still only lags by the time since the batch began (was: since the file's end was
    last seen, and every decision was refused after max_lag although the reader kept up)."""
    access_log, audit_file = files
    access_log.parent.mkdir()
    append(access_log, *(nginx_line(uuid4().hex) for _ in range(3)))
    stream = reader(files)
    health = StreamHealth(access_log, audit_file, max_lag=10, check_interval=0)
    read = os.pread

    def read_while_nginx_writes(fd: int, length: int, offset: int) -> bytes:
        data = read(fd, length, offset)
        append(access_log, nginx_line(uuid4().hex))  # a line written meanwhile: the end is never reached
        return data

    monkeypatch.setattr(os, "pread", read_while_nginx_writes)
    start = time.time()
    for second in range(1, 31):
        assert stream.step(now=start + second) >= 1
        assert health.problem(start + second + 0.5) is None, second
    # A reader that falls behind by more than a batch is still seen lagging.
    monkeypatch.setattr(os, "pread", read)
    append(access_log, *(nginx_line(uuid4().hex) for _ in range(200)))
    stream.release()
    behind = reader(files, max_batch_bytes=4096)
    assert behind.step(now=start + 31) >= 1
    assert "lags" in (health.problem(start + 40) or "")


def test_health_fails_when_the_trail_lags_or_no_reader_runs(files: tuple[Path, Path]) -> None:
    access_log, audit_file = files
    access_log.parent.mkdir()
    audit_file.parent.mkdir()
    health = StreamHealth(access_log, audit_file, max_lag=10, check_interval=0)
    now = time.time()
    assert health.problem(now) is None  # just started: the reader has a moment to appear
    assert "no reader" in (health.problem(now + 11) or "")
    append(access_log, nginx_line("1" * 32))
    inode = access_log.stat().st_ino
    position_file(audit_file).write_bytes(Position(inode, 0, now, now - 11).encode())
    assert "lags" in (health.problem(now) or "")
    position_file(audit_file).write_bytes(Position(inode, access_log.stat().st_size, now, now - 11).encode())
    assert health.problem(now) is None  # nothing unread: no lag, whatever the last catch-up
    position_file(audit_file).write_bytes(Position(inode, 0, now - 11, now - 11).encode())
    assert "no reader" in (health.problem(now) or "")


# --- A real nginx (shipped template) and a real gateway ---------------------------------------------------

STREAM_POLICIES = TEST_POLICIES + (
    "  - name: counted\n    match: { path: /echo/counted/* }\n    action: authenticate\n"
    "    quota: { window: 1h, max_requests: 100000, max_distinct: 1000, resource: { path_segment: 3 } }\n"
    "  - name: few\n    match: { path: /echo/few/* }\n    action: authenticate\n"
    "    quota: { window: 1h, max_requests: 5, resource: { path_segment: 3 } }\n"
)


class Stack:
    """nginx (the shipped template) -> gateway (2 workers) -> portal, the gateway reading nginx's access log."""

    def __init__(
        self, directory: Path, redis_url: str, upstream_url: str, assertion_key: Path, max_lag: float = 10
    ) -> None:
        self.directory = directory
        self.gateway_port = free_port()
        self.access_log = directory / "nginx" / "access.log"
        self.config = write_config(
            directory / "gateway",
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            policies=STREAM_POLICIES,
            listen=f"127.0.0.1:{self.gateway_port}",
            extra={
                "server": {"workers": 2, "threads": 4},
                "sessions": {"store": redis_url, "local_cache_seconds": 0},
                "forward_auth": {
                    "trusted_nginx": ["127.0.0.1/32"],
                    "access_log": str(self.access_log),
                    "cache_seconds": 1,
                    "max_lag": max_lag,
                },
            },
        )
        self.audit_file = directory / "gateway" / "audit.log"
        self.store = RedisSessionStore(redis_url)
        self.values = {
            "GATEWAY": f"127.0.0.1:{self.gateway_port}",
            "PORTAL": upstream_url.removeprefix("http://"),
            "ACCESS_LOG": str(self.access_log),
        }

    def gateway(self) -> Any:
        return running(serve_argv(self.config), self.gateway_port, log=self.directory / "gateway.log")

    def login(self, idnat: str) -> dict[str, str]:
        identity = Identity(idnat, LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")
        return {"Cookie": f"{COOKIE}={self.store.create(identity, time.time()).id}"}

    def recorded(self, marker: str) -> list[dict[str, Any]]:
        """The access records of one test: its identity's, or on its paths."""
        return [
            r
            for r in audit_records(self.audit_file, ACCESS_EVENT)
            if marker in (r["idnat"], *r["path"].split("/"))
        ]


@contextlib.contextmanager
def stack_in(
    directory: Path, upstream_url: str, assertion_key: Path, max_lag: float = 10
) -> Iterator[tuple[Stack, Nginx]]:
    with redis_server() as redis:
        built = Stack(directory, redis.url, upstream_url, assertion_key, max_lag)
        with running_nginx(directory / "nginx", FORWARD_AUTH_TEMPLATE, built.values) as nginx:
            yield built, nginx


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path
) -> Iterator[tuple[Stack, Nginx]]:
    directory = tmp_path_factory.mktemp("stream")
    with stack_in(directory, upstream_url, assertion_key) as (built, nginx), built.gateway():
        yield built, nginx


def send(nginx: Nginx, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(nginx.base_url + path, headers=headers, timeout=5, allow_redirects=False)


def unique_idnat() -> str:
    return "8" + str(uuid4().int)[:11]


def test_n_requests_through_forward_auth_are_n_audit_records(shared: tuple[Stack, Nginx]) -> None:
    built, nginx = shared
    idnat, cookie = (idnat := unique_idnat()), built.login(idnat)
    statuses = [send(nginx, "/echo/protected/same", cookie).status_code for _ in range(20)]  # mostly cached
    statuses += [send(nginx, f"/echo/counted/{n}", cookie).status_code for n in range(10)]  # new resources
    statuses += [send(nginx, "/echo/counted/0", cookie).status_code for _ in range(10)]  # a granted one again
    statuses += [send(nginx, f"/echo/protected/{idnat}").status_code for _ in range(5)]  # no session: login
    statuses += [send(nginx, f"/echo/forbidden/{idnat}", cookie).status_code for _ in range(5)]  # denied
    statuses += [send(nginx, f"/echo/public/{idnat}").status_code for _ in range(5)]  # public: not audited
    assert statuses.count(200) == 45 and statuses.count(401) == 5 and statuses.count(403) == 5
    wait_until(lambda: len(built.recorded(idnat)) >= 50, timeout=10, what="50 access records")
    time.sleep(0.5)  # what came more would be a duplicate
    records = built.recorded(idnat)
    assert len(records) == 50 and len({r["request_id"] for r in records}) == 50
    assert any(r["cached"] for r in records)  # nginx served some from its decision cache...
    allowed = [r for r in records if r["decision"] == "allow"]
    assert len(allowed) == 40 and {r["idnat"] for r in allowed} == {idnat}  # ...all of them audited
    logins = [r for r in records if r["decision"] == "login"]
    assert len(logins) == 5 and {r["status"] for r in logins} == {401}
    assert [r["reasons"] for r in records if r["decision"] == "deny"] == [["denied_by_rule"]] * 5
    assert not any(r["path"].startswith("/echo/public/") for r in records)
    assert verify_audit_file(built.audit_file).ok


def test_an_access_with_bytes_that_are_not_utf8_in_its_query_is_an_access_record(
    shared: tuple[Stack, Nginx],
) -> None:
    """nginx logs the URI's bytes as they came (escape=json escapes no byte above 0x7f): a professional's
    request with such a byte in its query (refused: no target may hold one) is still an access record of the
    decision, never an unreadable line."""
    built, nginx = shared
    idnat = unique_idnat()
    cookie = built.login(idnat)["Cookie"]
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=5) as connection:
        head = f'GET /echo/protected/{idnat}?q=\xff\xfe"x HTTP/1.1\r\nHost: 127.0.0.1:{nginx.port}\r\n'
        connection.sendall(head.encode("latin-1") + f"Cookie: {cookie}\r\nConnection: close\r\n\r\n".encode())
        assert connection.recv(64).startswith(b"HTTP/1.1 400 ")
    wait_until(lambda: len(built.recorded(idnat)) == 1, timeout=10, what="the access record")
    (record,) = built.recorded(idnat)
    assert (record["decision"], record["reasons"], record["status"]) == ("deny", ["bad_request_path"], 400)
    assert not audit_records(built.audit_file, "access_unreadable")


def test_a_logout_ends_cached_access_within_the_stated_bound(shared: tuple[Stack, Nginx]) -> None:
    built, nginx = shared
    cookie = built.login(unique_idnat())
    for path in ("/echo/protected/page", "/echo/counted/7"):
        assert send(nginx, path, cookie).status_code == 200
        assert send(nginx, path, cookie).status_code == 200
    built.store.delete(cookie["Cookie"].partition("=")[2])
    logged_out = time.monotonic()
    # forward_auth.cache_seconds is 1 here (no per-process session cache): refused within that.
    for path in ("/echo/protected/page", "/echo/counted/7"):
        wait_until(lambda p=path: send(nginx, p, cookie).status_code == 401, timeout=5, what="logout")
    assert time.monotonic() - logged_out < 1 + 1.5


def test_a_cached_decision_on_a_quota_route_is_never_served_to_another_session(
    shared: tuple[Stack, Nginx],
) -> None:
    built, nginx = shared
    owner, other = unique_idnat(), unique_idnat()
    assert send(nginx, f"/echo/counted/{owner}", built.login(owner)).status_code == 200
    assert send(nginx, f"/echo/counted/{owner}", built.login(other)).status_code == 200
    wait_until(lambda: len(built.recorded(owner)) >= 2, timeout=10, what="two records")
    records = built.recorded(owner)
    # The other session got a decision of its own, for its own identity, not the owner's cached one.
    assert [(r["idnat"], r["cached"]) for r in records] == [(owner, False), (other, False)]


def test_max_requests_counts_the_reads_nginx_served_from_its_cache(shared: tuple[Stack, Nginx]) -> None:
    built, nginx = shared
    idnat = unique_idnat()
    cookie = built.login(idnat)
    statuses = [send(nginx, "/echo/few/1", cookie).status_code for _ in range(10)]
    assert statuses.count(200) >= 5  # one decision, then (mostly) nginx's cache
    wait_until(lambda: len(built.recorded(idnat)) >= 10, timeout=10, what="the reads recorded")
    # Every read counted, cached or not: the quota (5 requests) is spent, a new resource is refused.
    refused = send(nginx, "/echo/few/2", cookie)
    assert (refused.status_code, refused.headers["X-Gateway-Reason"]) == (429, "quota_exceeded")
    assert int(refused.headers["Retry-After"]) > 0
    breaches = [r for r in audit_records(built.audit_file, "quota_breach") if r["idnat"] == idnat]
    assert len(breaches) == 1 and breaches[0]["requests"] >= 6


def test_nothing_is_lost_or_recorded_twice_across_a_gateway_restart(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with stack_in(tmp_path, upstream_url, assertion_key) as (built, nginx):
        idnat = unique_idnat()
        sent = 0
        with built.gateway() as gateway:
            cookie = built.login(idnat)
            for n in range(10):
                assert send(nginx, f"/echo/counted/{n}", cookie).status_code == 200
                sent += 1
            assert send(nginx, "/echo/protected/kept", cookie).status_code == 200
            sent += 1
            os.killpg(gateway.pid, signal.SIGKILL)  # no goodbye: records may be written, positions not saved
            gateway.wait()
        # The gateway is down: nginx serves from its cache what it still holds, refuses the rest (503, its
        # static page), and logs both.
        assert send(nginx, f"/echo/counted/{idnat}", cookie).status_code == 503
        sent += 1
        with built.gateway():
            for n in range(5):
                assert send(nginx, f"/echo/counted/{100 + n}", cookie).status_code == 200
                sent += 1
            wait_until(lambda: len(built.recorded(idnat)) >= sent, timeout=15, what=f"{sent} records")
            time.sleep(0.5)
            records = built.recorded(idnat)
        assert len(records) == sent and len({r["request_id"] for r in records}) == sent
        assert [r["status"] for r in records if r["decision"] == ""] == [503]
        assert verify_audit_file(built.audit_file).ok


def refused_by_nginx(built: Stack, path: str, status: int = 429) -> list[list[Any]]:
    """The requests on ``path`` nginx refused itself with ``status``, as the trail lists them."""
    records = audit_records(built.audit_file, NGINX_REFUSED_EVENT)
    return [access for r in records for access in r["accesses"] if access[4] == path and access[5] == status]


def test_one_session_flooding_cached_reads_is_limited_and_never_stops_another_sessions_decisions(
    tmp_path: Path, assertion_key: Path
) -> None:
    """One client sending cached reads as fast as nginx serves them (a fast portal) used to make the audit
    trail lag past max_lag, and every user's new decisions were refused 503 until it caught up."""
    with (
        running_fast_portal(tmp_path / "portal") as portal,
        stack_in(tmp_path, portal.base_url, assertion_key, max_lag=2) as (built, nginx),
        built.gateway(),
    ):
        flooder, other = unique_idnat(), unique_idnat()
        flood_cookie, other_cookie = built.login(flooder), built.login(other)
        path = f"/echo/protected/{flooder}"
        assert send(nginx, path, flood_cookie).status_code == 200  # the decision nginx then keeps
        others: list[int] = []
        with ThreadPoolExecutor(1) as pool:
            flooding = pool.submit(
                flood, nginx.base_url + path, flood_cookie, seconds=4, connections=8, work_dir=tmp_path
            )
            # Meanwhile, and while the reader catches up after, another professional opens new records: each
            # one a new decision, which the gateway refuses (503) when the trail lags past max_lag.
            after_the_flood = float("inf")
            while time.monotonic() < after_the_flood:
                others.append(send(nginx, f"/echo/counted/{other}-{len(others)}", other_cookie).status_code)
                if flooding.done() and after_the_flood == float("inf"):
                    after_the_flood = time.monotonic() + 1.5
                time.sleep(0.05)
            statuses = flooding.result()
        assert set(others) == {200}, others
        assert statuses[429] > statuses[200] > 0 and set(statuses) == {200, 429}  # over its share: 429s
        # Every request nginx answered the flooder is in the trail with the status it was served: an access
        # record each when let in, listed in access_refused_by_nginx records (a few a batch) when refused.
        logged = [json.loads(line) for line in built.access_log.read_text().splitlines()]
        served = collections.Counter(line["status"] for line in logged if line["uri"] == path)
        # nginx may have answered a request or so per connection that wrk stopped waiting for.
        assert statuses[429] <= served["429"] <= statuses[429] + 8 and served["200"] == statuses[200] + 1
        wait_until(
            lambda: len(refused_by_nginx(built, path)) >= served["429"],
            timeout=15,
            what="the refused requests recorded",
        )
        wait_until(lambda: len(built.recorded(flooder)) >= served["200"], timeout=5, what="the accesses")
        time.sleep(0.5)
        assert (
            len(refused_by_nginx(built, path)) == served["429"]
            and len({access[1] for access in refused_by_nginx(built, path)}) == served["429"]
        )
        records = built.recorded(flooder)
        assert [r["status"] for r in records] == [200] * served["200"]
        assert {r["idnat"] for r in records} == {flooder}
        assert verify_audit_file(built.audit_file).ok


def test_a_client_over_its_limit_gets_the_gateway_page_with_retry_after(shared: tuple[Stack, Nginx]) -> None:
    built, nginx = shared
    path = f"/echo/protected/{unique_idnat()}"

    def ask(*headers: tuple[str, str]) -> RawResponse:  # from an address of its own: a limit of its own
        return raw_request(nginx.port, path, headers, source="127.0.0.21")

    answers = [ask(("Accept-Language", "en-GB,en;q=0.8")) for _ in range(150)]  # no session: 20/s, burst 100
    limited = [answer for answer in answers if answer.status == 429]
    assert answers[0].status == 401 and {answer.status for answer in answers} == {401, 429}
    page = limited[-1]
    assert page.header("Retry-After") == "1" and page.header("X-Gateway-Reason") == "rate_limited"
    assert b"Too many requests" in page.body and (page.header("Content-Type") or "").startswith("text/html")
    assert page.header("Set-Cookie") is None and page.header("Cache-Control") == "no-store"
    french = ask(("Accept-Language", "fr"))
    assert french.status == 429 and "Trop de demandes" in french.body.decode()
    api = ask(("Accept", "application/json"))
    assert (api.status, json.loads(api.body)["error"]) == (429, "rate_limited")
    made_up = ask(("Host", f"{uuid4().hex}.example"))  # the same page, whatever Host the client makes up
    assert (made_up.status, made_up.header("X-Gateway-Reason")) == (429, "rate_limited")
    # Each refused request is in the trail: listed in an access_refused_by_nginx record, no decision asked.
    wait_until(
        lambda: len(refused_by_nginx(built, path)) == len(limited) + 3,
        timeout=10,
        what="the refused requests recorded",
    )


def test_the_rate_limited_page_nginx_shares_names_no_client_request(shared: tuple[Stack, Nginx]) -> None:
    """nginx keeps the rate_limited page a second for every client over its limit: were it to name the request
    that rendered it, other clients would be shown that client's reference."""
    _, nginx = shared
    path = f"/echo/protected/{unique_idnat()}"

    def pages(source: str, accept: str) -> list[RawResponse]:
        answers = [raw_request(nginx.port, path, [("Accept", accept)], source=source) for _ in range(130)]
        return [answer for answer in answers if answer.status == 429]

    for accept in ("text/html", "application/json"):
        first, second = pages("127.0.0.23", accept), pages("127.0.0.24", accept)
        assert first and second
        for page in first + second:
            assert page.header("X-Gateway-Reason") == "rate_limited"
            if accept == "text/html":
                assert b'class="reference"' not in page.body
            else:
                assert json.loads(page.body)["error"] == "rate_limited"
                assert json.loads(page.body)["request_id"] == ""


def test_a_crafted_cookie_header_is_refused_within_the_same_limits(shared: tuple[Stack, Nginx]) -> None:
    built, nginx = shared
    idnat = unique_idnat()
    path = f"/echo/protected/{idnat}"
    crafted = ("Cookie", "; ".join(["__Host-gateway-login=a"] * 5))  # one left after four removals
    statuses = [raw_request(nginx.port, path, [crafted], source="127.0.0.22").status for _ in range(150)]
    assert statuses[0] == 400 and set(statuses) == {400, 429}  # no session: 20 a second, bursts of 100
    wait_until(
        lambda: len(refused_by_nginx(built, path)) == statuses.count(429),
        timeout=10,
        what="the refused requests recorded",
    )
    assert len(refused_by_nginx(built, path, 400)) == statuses.count(400) and not built.recorded(idnat)


def test_a_request_nginx_cannot_take_is_listed_among_its_refusals(shared: tuple[Stack, Nginx]) -> None:
    """nginx answers 400 to a malformed request before any location (no limit applies): logged, and recorded
    as cheaply as the requests refused over a limit."""
    built, nginx = shared
    path = f"/echo/protected/{unique_idnat()}"
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=5) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".encode())
        assert connection.recv(64).startswith(b"HTTP/1.1 400 ")
    wait_until(lambda: len(refused_by_nginx(built, path, 400)) == 1, timeout=10, what="the 400 recorded")


def test_a_gateway_that_cannot_be_reached_is_a_static_page_with_retry_after(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with stack_in(tmp_path, upstream_url, assertion_key) as (built, nginx):  # no gateway running
        idnat = unique_idnat()
        answer = send(nginx, f"/echo/protected/{idnat}", {"Accept-Language": "en"})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "30"
        assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "Service momentanément indisponible" in answer.text
        assert "Service temporarily unavailable" in answer.text
        assert answer.headers["Cache-Control"] == "no-store"
        with built.gateway():  # what nginx logged meanwhile is recorded once the gateway is back
            wait_until(lambda: len(built.recorded(idnat)) >= 1, timeout=10, what="the refusal recorded")
            assert [r["status"] for r in built.recorded(idnat)] == [503]


def test_only_a_line_with_every_field_a_string_is_an_access() -> None:
    line = {field: "" for field in LINE_FIELDS} | {"time": "1700000000.5", "status": "200"}
    (event, _, fields), _ = access_event(json.dumps(line).encode(), "1:1")
    assert event == ACCESS_EVENT and fields["status"] == 200
    for odd in (
        {**line, "status": 200},
        {**line, "uri": None},
        {k: v for k, v in line.items() if k != "cache"},
    ):
        (event, _, fields), served = access_event(json.dumps(odd).encode(), "1:1")
        assert (event, served) == (UNREADABLE_EVENT, None)
    for odd_json in (b"[1]", b'"x"', b"{"):
        assert access_event(odd_json, "1:1")[0][0] == UNREADABLE_EVENT
