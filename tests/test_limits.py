"""Login throttle, failure bans, per-identity quotas and flask-limiter wiring, on memory and real Redis."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import flask
import pytest
import redis

from gateway.limits import (
    LimitsUnavailable,
    LoginThrottle,
    QuotaGuard,
    QuotaSpec,
    ServedRequest,
    build_limiter,
)
from gateway.policy.decision import Reason
from tests.support.processes import REPO_ROOT, free_port
from tests.support.redis import RedisServer, redis_server

# Aligned on every window used below, so retry_after values are round numbers.
T0 = 1_700_006_400.0
IP, OTHER_IP = "192.0.2.10", "192.0.2.99"
ALICE, BOB = "810000000001", "810000000002"
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def storage_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return request.getfixturevalue("redis_srv").url


@pytest.fixture
def prefix() -> str:
    return f"t{next(_prefixes)}"


def throttle(uri: str, prefix: str, **kwargs: object) -> LoginThrottle:
    return LoginThrottle(uri, key_prefix=prefix, **kwargs)  # type: ignore[arg-type]


# --- login throttle and bans ---------------------------------------------------------------------------


def test_ban_after_n_failures_with_retry_after(storage_uri: str, prefix: str) -> None:
    t = throttle(storage_uri, prefix, ban_after=5, ban_window=600, ban_duration=900)
    for i in range(4):
        assert t.check(IP, ALICE, T0 + i).allowed
        assert t.record_failure(IP, ALICE, T0 + i) is None
    assert t.check(IP, ALICE, T0 + 4).allowed
    ban = t.record_failure(IP, ALICE, T0 + 4)
    assert ban is not None
    assert (ban.banned_ip, ban.banned_identity, ban.until, ban.failures) == (IP, ALICE, T0 + 904, 5)
    verdict = t.check(IP, ALICE, T0 + 10)
    assert (verdict.allowed, verdict.reason, verdict.retry_after) == (False, Reason.BANNED, 894)
    # Still banned across the failure window's boundary, free once the ban ends.
    assert t.check(IP, ALICE, T0 + 700).reason is Reason.BANNED
    assert t.check(IP, ALICE, T0 + 904).allowed


def test_more_failures_while_banned_record_no_second_ban(storage_uri: str, prefix: str) -> None:
    t = throttle(storage_uri, prefix, ban_after=2)
    assert t.record_failure(IP, ALICE, T0) is None
    assert t.record_failure(IP, ALICE, T0) is not None
    assert t.record_failure(IP, ALICE, T0) is None


def test_identity_ban_is_independent_of_ip(storage_uri: str, prefix: str) -> None:
    t = throttle(storage_uri, prefix, ban_after=3)
    # A distributed guess on one identity: each IP fails once, the identity is banned.
    bans = [t.record_failure(f"198.51.100.{i}", ALICE, T0) for i in range(3)]
    assert bans[:2] == [None, None]
    assert bans[2] is not None and bans[2].banned_identity == ALICE and bans[2].banned_ip is None
    assert t.check("198.51.100.200", ALICE, T0 + 1).reason is Reason.BANNED
    assert t.check("198.51.100.0", BOB, T0 + 1).allowed


def test_ip_ban_covers_every_identity(storage_uri: str, prefix: str) -> None:
    t = throttle(storage_uri, prefix, ban_after=3)
    bans = [t.record_failure(IP, f"81000000010{i}", T0) for i in range(3)]
    assert bans[2] is not None and bans[2].banned_ip == IP and bans[2].banned_identity is None
    assert t.check(IP, BOB, T0 + 1).reason is Reason.BANNED
    assert t.check(OTHER_IP, BOB, T0 + 1).allowed


def test_success_clears_the_identity_count_not_the_ip_count(storage_uri: str, prefix: str) -> None:
    t = throttle(storage_uri, prefix, ban_after=3)
    t.record_failure(IP, ALICE, T0)
    t.record_failure(IP, ALICE, T0)
    t.record_success(IP, ALICE, T0)
    ban = t.record_failure(IP, ALICE, T0)
    assert ban is not None and ban.banned_ip == IP and ban.banned_identity is None


def test_attempt_rate_limits_per_ip_and_per_identity(storage_uri: str, prefix: str) -> None:
    t = throttle(storage_uri, prefix, attempts_per_ip="3/minute", attempts_per_identity="2/minute")
    assert t.check(IP, None, T0).allowed
    assert t.check(IP, ALICE, T0 + 1).allowed
    assert t.check(OTHER_IP, ALICE, T0 + 10).allowed
    refused = t.check(OTHER_IP, ALICE, T0 + 15)  # ALICE's third attempt this minute
    assert (refused.reason, refused.retry_after) == (Reason.RATE_LIMITED, 45)
    assert t.check(IP, BOB, T0 + 20).allowed  # IP's third
    assert t.check(IP, BOB, T0 + 30).reason is Reason.RATE_LIMITED  # IP's fourth
    assert t.check(IP, BOB, T0 + 60).allowed  # next minute


def test_two_throttles_on_one_redis_share_one_budget(redis_srv: RedisServer, prefix: str) -> None:
    """Two instances stand in for two gateway processes."""
    first, second = throttle(redis_srv.url, prefix, ban_after=4), throttle(redis_srv.url, prefix, ban_after=4)
    bans = [(first if i % 2 else second).record_failure(IP, ALICE, T0 + i) for i in range(6)]
    assert [b is not None for b in bans] == [False, False, False, True, False, False]
    assert first.check(IP, ALICE, T0 + 7).reason is Reason.BANNED
    assert second.check(IP, ALICE, T0 + 7).reason is Reason.BANNED


def test_ban_duration_shorter_than_window_is_refused() -> None:
    with pytest.raises(ValueError):
        LoginThrottle("memory://", ban_window=600, ban_duration=60)


def test_storage_down_raises_limits_unavailable() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    t = LoginThrottle(dead)
    for call in (
        lambda: t.check(IP, ALICE, T0),
        lambda: t.record_failure(IP, ALICE, T0),
        lambda: t.record_success(IP, ALICE, T0),
        t.ping,
    ):
        with pytest.raises(LimitsUnavailable):
            call()
    with pytest.raises(LimitsUnavailable):
        QuotaGuard(dead).check_and_count(ALICE, "r", QuotaSpec(10, 10, 60), "p1", T0)


# --- quotas --------------------------------------------------------------------------------------------


def quota_guard(uri: str, prefix: str) -> QuotaGuard:
    return QuotaGuard(uri, key_prefix=prefix)


def test_distinct_resources_are_counted_exactly(storage_uri: str, prefix: str) -> None:
    guard, spec = (
        quota_guard(storage_uri, prefix),
        QuotaSpec(max_requests=None, max_distinct=3, window_seconds=3600),
    )
    for i, patient in enumerate(["A", "B", "A", "C", "B", "C", "A"]):
        verdict = guard.check_and_count(ALICE, "patient_record", spec, patient, T0 + i)
        assert verdict.allowed, patient
    assert verdict.distinct == 3 and verdict.requests == 0  # no max_requests: requests are not tracked
    breach = guard.check_and_count(ALICE, "patient_record", spec, "D", T0 + 100)
    assert (breach.allowed, breach.reason, breach.retry_after, breach.breach_started, breach.distinct) == (
        False,
        Reason.QUOTA_EXCEEDED,
        3600,
        True,
        4,
    )
    # After the breach the whole rule is closed for a window, revisits included; one breach, one event.
    for patient in ("E", "A"):
        later = guard.check_and_count(ALICE, "patient_record", spec, patient, T0 + 200)
        assert not later.allowed and not later.breach_started and later.retry_after == 3500
    # Other people and other rules are untouched; the rule opens again a window after the breach.
    assert guard.check_and_count(BOB, "patient_record", spec, "D", T0 + 200).allowed
    assert guard.check_and_count(ALICE, "other_rule", spec, "D", T0 + 200).allowed
    assert not guard.check_and_count(ALICE, "patient_record", spec, "D", T0 + 3699).allowed
    assert guard.check_and_count(ALICE, "patient_record", spec, "D", T0 + 3700).allowed


def test_request_quota(storage_uri: str, prefix: str) -> None:
    guard, spec = (
        quota_guard(storage_uri, prefix),
        QuotaSpec(max_requests=3, max_distinct=None, window_seconds=60),
    )
    verdicts = [guard.check_and_count(ALICE, "export", spec, None, T0 + i) for i in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert [v.breach_started for v in verdicts] == [False, False, False, True, False]
    assert verdicts[3].retry_after == 57  # when the oldest request leaves the window
    # Refused requests are not recorded: the client may go on as soon as the oldest one has left.
    assert not guard.check_and_count(ALICE, "export", spec, None, T0 + 60).allowed  # [now - 60, now] holds it
    assert guard.check_and_count(ALICE, "export", spec, None, T0 + 60.001).allowed


@pytest.mark.parametrize("limit", ["max_distinct", "max_requests"])
def test_a_window_boundary_lets_nothing_more_through(storage_uri: str, prefix: str, limit: str) -> None:
    """Fixed windows let the limit through just before a boundary and again just after: 2x in 2 seconds."""
    spec = QuotaSpec(
        max_requests=3 if limit == "max_requests" else None,
        max_distinct=3 if limit == "max_distinct" else None,
        window_seconds=60,
    )
    guard = quota_guard(storage_uri, prefix)
    before = [guard.check_and_count(ALICE, "r", spec, f"p{i}", T0 + 59 + i / 10) for i in range(3)]
    after = [guard.check_and_count(ALICE, "r", spec, f"p{i + 3}", T0 + 61 + i / 10) for i in range(3)]
    assert [v.allowed for v in before] == [True] * 3
    assert [v.allowed for v in after] == [False] * 3
    assert after[0].breach_started and not any(v.breach_started for v in after[1:])


@pytest.mark.parametrize("limit", ["max_distinct", "max_requests"])
def test_no_interval_of_the_window_length_ever_holds_more_than_the_limit(
    storage_uri: str, prefix: str, limit: str
) -> None:
    rng = random.Random(1234)
    window, maximum = 10, 4
    spec = QuotaSpec(
        max_requests=maximum if limit == "max_requests" else None,
        max_distinct=maximum if limit == "max_distinct" else None,
        window_seconds=window,
    )
    guard = quota_guard(storage_uri, prefix)
    now, allowed = T0, []
    for _ in range(600):
        now += rng.choice([0.001, 0.3, 1.7, 4.2, 9.999, 10.0, 10.001])
        resource = f"p{rng.randrange(8)}"
        if guard.check_and_count(ALICE, "r", spec, resource, now).allowed:
            allowed.append((now, resource))
    # Every interval [t, t + window] starting at an allowed request (the worst ones start there).
    for start, _ in allowed:
        inside = [resource for at, resource in allowed if start <= at <= start + window]
        assert len(set(inside) if limit == "max_distinct" else inside) <= maximum
    assert len(allowed) > 100  # the guard let a real load through meanwhile


def served(request_id: str, at: float, resource: str | None = None) -> ServedRequest:
    return ServedRequest(ALICE, "r", request_id, at, resource)


def test_requests_served_from_a_cache_count_once_with_their_decision(storage_uri: str, prefix: str) -> None:
    guard, spec = (
        quota_guard(storage_uri, prefix),
        QuotaSpec(max_requests=5, max_distinct=None, window_seconds=60),
    )
    assert guard.check_and_count(ALICE, "r", spec, None, T0, request_id="req-1").allowed
    # nginx served req-1 (its decision's request) and three more from its cache: four requests in all...
    stream = [(served(f"req-{i}", T0 + i), spec) for i in range(1, 5)]
    guard.count_served(stream)
    guard.count_served(stream)  # ...also when a restarted reader counts them again
    assert guard.check_and_count(ALICE, "r", spec, None, T0 + 5, request_id="req-5").allowed
    refused = guard.check_and_count(ALICE, "r", spec, None, T0 + 6, request_id="req-6")
    assert (refused.allowed, refused.breach_started, refused.retry_after) == (False, True, 55)


def test_the_stream_keeps_only_the_newest_requests_and_decides_the_same(
    storage_uri: str, prefix: str
) -> None:
    guard, spec = (
        quota_guard(storage_uri, prefix),
        QuotaSpec(max_requests=3, max_distinct=None, window_seconds=60),
    )
    guard.count_served([(served(f"r{i}", T0 + i / 100), spec) for i in range(100)])
    if storage_uri.startswith("redis"):
        client = redis.Redis.from_url(storage_uri)
        (log,) = client.keys(f"{prefix}:r:{ALICE}:*:log")
        assert client.zcard(log) == 3  # memory stays bounded by the limit
        client.close()
    refused = guard.check_and_count(ALICE, "r", spec, None, T0 + 1)
    # The third newest (T0 + 0.97) leaves the window at T0 + 60.97: until then the window holds three.
    assert not refused.allowed and refused.retry_after == 60
    assert not guard.check_and_count(ALICE, "r", spec, None, T0 + 60.9).allowed
    assert guard.check_and_count(ALICE, "r", spec, None, T0 + 61).allowed


def test_a_resource_read_again_from_a_cache_is_still_a_read_of_the_window(
    storage_uri: str, prefix: str
) -> None:
    guard, spec = (
        quota_guard(storage_uri, prefix),
        QuotaSpec(max_requests=None, max_distinct=1, window_seconds=60),
    )
    assert guard.check_and_count(ALICE, "r", spec, "A", T0, request_id="1").allowed
    # Re-read at T0 + 50 from nginx's cache, then a late line from T0 + 20 (it never moves the read back).
    guard.count_served([(served("2", T0 + 50, "A"), spec)])
    guard.count_served([(served("3", T0 + 20, "A"), spec)])
    # At T0 + 70, A was read within the window (as in proxy mode, where every re-read is a decision): B is a
    # second distinct resource.
    assert not guard.check_and_count(ALICE, "r", spec, "B", T0 + 70).allowed
    assert guard.check_and_count(BOB, "r", spec, "B", T0 + 70).allowed


def test_quota_memory_stays_bounded(redis_srv: RedisServer, prefix: str) -> None:
    spec = QuotaSpec(max_requests=None, max_distinct=5, window_seconds=3600)
    guard = quota_guard(redis_srv.url, prefix)
    for i in range(500):
        guard.check_and_count(ALICE, "r", spec, f"patient-{i}", T0)
    client = redis.Redis.from_url(redis_srv.url)
    (reads,) = client.keys(f"{prefix}:r:{ALICE}:*:read")
    assert client.zcard(reads) == 5  # only allowed reads are kept
    assert 0 < client.ttl(reads) <= 3600
    client.close()

    memory = QuotaGuard("memory://")
    for i in range(500):
        verdict = memory.check_and_count(ALICE, "r", spec, f"patient-{i}", T0)
    assert verdict.distinct == 6
    store = memory._memory
    assert store is not None
    for i in range(50):
        memory.check_and_count(f"8200000{i:05d}", "r", spec, "p", T0)
    assert len(store) == 51
    # Entries idle for a window (and no longer closed) are purged: memory follows the identities active now.
    memory.check_and_count(BOB, "r", spec, "p", T0 + 3600 + 61)
    assert len(store) == 1


def test_two_guards_on_one_redis_share_one_quota(redis_srv: RedisServer, prefix: str) -> None:
    spec = QuotaSpec(max_requests=None, max_distinct=4, window_seconds=600)
    first, second = quota_guard(redis_srv.url, prefix), quota_guard(redis_srv.url, prefix)
    verdicts = [(first if i % 2 else second).check_and_count(ALICE, "r", spec, f"p{i}", T0) for i in range(6)]
    assert [v.allowed for v in verdicts] == [True, True, True, True, False, False]


def test_two_processes_count_distinct_resources_exactly(redis_srv: RedisServer, prefix: str) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from gateway.limits import QuotaGuard, QuotaSpec
        guard = QuotaGuard({redis_srv.url!r}, key_prefix={prefix!r})
        spec = QuotaSpec(max_requests=None, max_distinct=60, window_seconds=600)
        allowed = sum(
            guard.check_and_count("{ALICE}", "r", spec, f"p{{i}}-{{sys.argv[1]}}", {T0}).allowed
            for i in range(100)
        )
        print(allowed)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, name], cwd=REPO_ROOT, stdout=subprocess.PIPE)
        for name in ("a", "b")
    ]
    allowed = [int(p.communicate(timeout=20)[0]) for p in procs]
    assert sum(allowed) == 60


# --- flask-limiter -------------------------------------------------------------------------------------


def tiny_app(storage_uri: str, prefix: str) -> flask.Flask:
    app = flask.Flask(__name__)
    app.testing = True
    # Stand-in for the gateway's client-IP resolution (trusted hops only).
    client_ip: Callable[[], str] = lambda: flask.request.headers.get("X-Test-Client-IP", "0.0.0.0")  # noqa: E731
    limiter = build_limiter(app, storage_uri, client_ip, key_prefix=prefix)

    @app.post("/.gateway/login/card")
    @limiter.limit("2/minute")
    def login() -> str:
        return "ok"

    return app


def test_flask_limiter_decorator_limits_per_resolved_client_ip(storage_uri: str, prefix: str) -> None:
    client = tiny_app(storage_uri, prefix).test_client()
    alice = {"X-Test-Client-IP": IP}
    assert [client.post("/.gateway/login/card", headers=alice).status_code for _ in range(2)] == [200, 200]
    refused = client.post("/.gateway/login/card", headers=alice)
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Limit"] == "2"
    assert int(refused.headers["Retry-After"]) > 0
    assert client.post("/.gateway/login/card", headers={"X-Test-Client-IP": OTHER_IP}).status_code == 200


def test_flask_limiter_does_not_swallow_storage_errors(prefix: str) -> None:
    client = tiny_app(f"redis://127.0.0.1:{free_port()}/0", prefix).test_client()
    with pytest.raises(Exception):
        client.post("/.gateway/login/card")


def test_limits_recover_when_redis_comes_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        t, guard = LoginThrottle(server.url), QuotaGuard(server.url)
        spec = QuotaSpec(max_requests=10, max_distinct=None, window_seconds=60)
        assert t.check(IP, ALICE, T0).allowed and guard.check_and_count(ALICE, "r", spec, None, T0).allowed
        server.stop()
        with pytest.raises(LimitsUnavailable):
            t.check(IP, ALICE, T0)
        with pytest.raises(LimitsUnavailable):
            guard.check_and_count(ALICE, "r", spec, None, T0)
        server.start()  # same port, empty
        assert t.check(IP, ALICE, T0).allowed and guard.check_and_count(ALICE, "r", spec, None, T0).allowed
        server.restart()  # pooled connections die silently: the next call must still work
        assert t.check(IP, ALICE, T0).allowed and guard.check_and_count(ALICE, "r", spec, None, T0).allowed
    finally:
        server.stop()
