"""Two gateway processes sharing one real Redis: sessions, quotas, Redis failure and recovery, breach replay."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.sessions import RedisSessionStore, idnat_tag
from tests.support.audit import audit_records
from tests.support.config import TEST_POLICIES
from tests.support.gateways import running_gateways, sharing_store
from tests.support.processes import REPO_ROOT
from tests.support.redis import RedisServer, new_session

COOKIE = "__Host-gateway-session"
BREACH_IDENTITIES = 19
RECORDS_TRIED = 30_000
GIVE_UP_AFTER = 100  # consecutive refusals before the replayed attacker moves on


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateways")


@pytest.fixture(scope="module")
def gateways(
    directory: Path, redis: RedisServer, upstream_url: str, assertion_key: Path
) -> Iterator[list[str]]:
    """Two gateway processes (two workers each) with the example portal policies and one Redis."""
    extra = {
        "server": {"workers": 2, "threads": 8},
        # Revocations made from the test must be seen at once (no per-process session cache).
        "sessions": {"store": redis.url, "local_cache_seconds": 0},
        "policies": [str(REPO_ROOT / "policies")],
        "audit": {"file": str(directory / "audit.log")},
    }
    with running_gateways(
        directory, 2, upstream_url=upstream_url, assertion_key=assertion_key, extra=extra
    ) as urls:
        yield urls


def stolen_session(redis: RedisServer, idnat: str) -> str:
    return new_session(redis.url, idnat)


def get(url: str, session_id: str | None = None, **headers: str) -> requests.Response:
    if session_id:
        headers["Cookie"] = f"{COOKIE}={session_id}"
    return requests.get(url, headers=headers, timeout=5, allow_redirects=False)


def test_a_session_is_valid_on_every_instance_and_logout_everywhere_ends_it(
    gateways: list[str], redis: RedisServer
) -> None:
    session_id = stolen_session(redis, "810000000100")
    for url in gateways:
        answer = get(f"{url}/patients/180017512345678", session_id)
        assert answer.status_code == 200, answer.text
    assert RedisSessionStore(redis.url).delete_tagged(idnat_tag("810000000100")) == 1
    for url in gateways:
        assert get(f"{url}/patients/180017512345678", session_id).status_code == 401


def test_quota_is_one_budget_across_instances(gateways: list[str], redis: RedisServer) -> None:
    session_id = stolen_session(redis, "810000000200")
    statuses = [
        get(f"{gateways[n % 2]}/patients/{180017500000000 + n}", session_id).status_code for n in range(31)
    ]
    assert statuses == [200] * 30 + [429]


def test_redis_down_fails_closed_then_recovers(gateways: list[str], redis: RedisServer) -> None:
    session_id = stolen_session(redis, "810000000300")
    redis.stop()
    try:
        refused = get(f"{gateways[0]}/patients/180017512345678", session_id, Accept="text/html")
        assert refused.status_code == 503
        assert refused.headers["X-Gateway-Reason"] == "session_store_unavailable"
        assert "Votre session ne peut pas être vérifiée" in refused.text
        assert get(f"{gateways[1]}/").status_code == 200  # public routes keep working
    finally:
        redis.start()
    # No persistence: the old session is gone, but the gateway works again without a restart.
    assert get(f"{gateways[0]}/patients/180017512345678", session_id).status_code == 401
    fresh = stolen_session(redis, "810000000301")
    assert get(f"{gateways[1]}/patients/180017512345678", fresh).status_code == 200


def attack(base_urls: list[str], session_id: str | None, identity_index: int) -> tuple[int, int]:
    """Try RECORDS_TRIED distinct NIRs; stop after GIVE_UP_AFTER refusals in a row. -> (records read, tries)."""
    read = refused_in_a_row = tries = 0
    with requests.Session() as http:
        for n in range(RECORDS_TRIED):
            nir = 100_000_000_000_00 + identity_index * RECORDS_TRIED + n
            headers = {"Cookie": f"{COOKIE}={session_id}"} if session_id else {}
            answer = http.get(f"{base_urls[n % 2]}/patients/{nir}", headers=headers, timeout=5)
            tries += 1
            if answer.status_code == 200:
                read += 1
                refused_in_a_row = 0
            else:
                refused_in_a_row += 1
                if refused_in_a_row >= GIVE_UP_AFTER:
                    break
    return read, tries


@pytest.mark.timeout(300)  # about 1,300 requests through two gateways: generous for a loaded CI machine
def test_breach_replay(gateways: list[str], redis: RedisServer, directory: Path) -> None:
    """The 2024 breach: 19 accounts read 510,000 records. Replayed against the example policies."""
    without_session = [attack(gateways, None, i) for i in range(BREACH_IDENTITIES)]
    stolen = [stolen_session(redis, f"8100000{i:05d}") for i in range(BREACH_IDENTITIES)]
    with_stolen_sessions = [attack(gateways, stolen[i], i) for i in range(BREACH_IDENTITIES)]
    read_without = sum(read for read, _ in without_session)
    read_with = sum(read for read, _ in with_stolen_sessions)
    print(
        f"\nbreach replay: {BREACH_IDENTITIES} identities x {RECORDS_TRIED} records tried"
        f"\n  without a card/e-CPS session: {read_without} records read"
        f"\n  with stolen sessions:          {read_with} records read "
        f"({read_with // BREACH_IDENTITIES} each; sessions revoked at the quota)"
    )
    assert read_without == 0
    assert [read for read, _ in with_stolen_sessions] == [30] * BREACH_IDENTITIES
    audit_log = directory / "audit.log"
    breaches = [json.loads(line) for line in audit_log.read_text().splitlines() if '"quota_breach"' in line]
    assert {b["idnat"] for b in breaches} >= {f"8100000{i:05d}" for i in range(BREACH_IDENTITIES)}


def test_an_instance_that_cached_a_session_sees_its_revocation_within_the_cache_time(
    tmp_path: Path, redis: RedisServer, upstream_url: str, assertion_key: Path
) -> None:
    extra = {
        "server": {"workers": 1},
        "sessions": {"store": redis.url, "local_cache_seconds": 1},
        "policies": [str(REPO_ROOT / "policies")],
    }
    with running_gateways(
        tmp_path, 1, upstream_url=upstream_url, assertion_key=assertion_key, extra=extra
    ) as (url,):
        record = f"{url}/patients/180017512345678"
        session_id = stolen_session(redis, "810000000150")
        assert get(record, session_id).status_code == 200  # the process now holds the session for 1 s
        assert RedisSessionStore(redis.url).delete_tagged(idnat_tag("810000000150")) == 1
        revoked = time.monotonic()
        while get(record, session_id).status_code == 200:
            assert time.monotonic() - revoked < 5, "the revocation never reached the instance"
            time.sleep(0.05)
        assert time.monotonic() - revoked < 1 + 0.75  # local_cache_seconds, plus a request's time


QUOTA_WINDOW = 6
QUOTA_POLICIES = f"""\
rules:
  - name: distinct-records
    match: {{ path: /echo/records/*, methods: [GET] }}
    action: authenticate
    quota: {{ window: {QUOTA_WINDOW}s, max_distinct: 5, resource: {{ path_segment: 3 }}, on_exceed: block }}
  - name: request-count
    match: {{ path: /echo/exports/*, methods: [GET] }}
    action: authenticate
    quota: {{ window: {QUOTA_WINDOW}s, max_requests: 5, on_exceed: block }}
""" + TEST_POLICIES.removeprefix("rules:\n")


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def test_quotas_hold_across_a_window_boundary_and_two_gateway_processes(
    tmp_path: Path, redis: RedisServer, upstream_url: str, assertion_key: Path
) -> None:
    """A fixed window let 5 records be read just before a clock boundary and 5 more just after it."""
    with sharing_store(
        tmp_path,
        redis.url,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        workers=1,
        policies=QUOTA_POLICIES,
    ) as urls:
        reader, exporter = new_session(redis.url, "810000000410"), new_session(redis.url, "810000000411")

        def batch(first: int) -> list[int]:
            statuses = []
            for n in range(first, first + 5):
                gateway = urls[n % 2]
                statuses.append(get(f"{gateway}/echo/records/{n}", reader).status_code)
                statuses.append(get(f"{gateway}/echo/exports/{n}", exporter).status_code)
            return statuses

        boundary = math.ceil(time.time() / QUOTA_WINDOW) * QUOTA_WINDOW  # where a fixed window would restart
        if boundary - time.time() < 1.5:
            boundary += QUOTA_WINDOW
        sleep_until(boundary - 1.0)
        before = batch(0)
        sleep_until(boundary + 0.05)
        after = batch(5)
    assert before == [200] * 10
    assert after == [429] * 10
    breaches = audit_records(tmp_path / "gw0" / "audit.log", "quota_breach") + audit_records(
        tmp_path / "gw1" / "audit.log", "quota_breach"
    )
    assert sorted(b["rule"] for b in breaches) == ["distinct-records", "request-count"]
