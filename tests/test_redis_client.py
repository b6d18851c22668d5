"""The one Redis client factory: URLs (Sentinel as the limits library spells it, Cluster refused), one pool
per process, and a failover with real Debian redis-server and redis-sentinel processes: the master killed
with kill -9, first under the stores themselves, then under load through two-worker gateway processes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import flask
import pytest
import redis
import requests

from gateway.authn.card.challenge import NonceKind
from gateway.authn.card.setup import nonce_store
from gateway.config_source import ConfigErrors
from gateway.identity import Identity, LoginMethod
from gateway.limits import LimitsUnavailable, LoginThrottle, QuotaGuard, QuotaSpec, build_limiter
from gateway.redis_client import check_store_url, limits_storage, parse_sentinel_url, redis_client
from gateway.sessions import RedisSessionStore, SessionStoreUnavailable
from gateway.settings import load_settings
from tests.support.config import TEST_POLICIES, write_config
from tests.support.gateways import sharing_store
from tests.support.processes import wait_until
from tests.support.redis import new_session, redis_server
from tests.support.sentinel import sentinel_set

COOKIE = "__Host-gateway-session"


def test_sentinel_urls_are_spelled_as_the_limits_library_spells_them() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/gateway/2")
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (parsed.service, parsed.db, parsed.password) == ("gateway", 2, "s3cret")
    assert "s3cret" not in repr(parsed)
    assert parse_sentinel_url("redis+sentinel://h:26379/gateway").db == 0


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+sentinel://h/gateway", "host:port"),
        ("redis+sentinel://h:26379", "service name"),
        ("redis+sentinel://h:26379/a/b", "service name"),
        ("redis+cluster://h:7000", "Redis Cluster is not supported"),
        ("memcached://h:11211", "use memory://"),
    ],
)
def test_unusable_store_urls_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        check_store_url(url)


def test_the_settings_refuse_redis_cluster_naming_the_key(tmp_path: Path, assertion_key: Path) -> None:
    config = write_config(
        tmp_path,
        upstream_url="http://127.0.0.1:9",
        assertion_key=assertion_key,
        extra={
            "sessions": {"store": "redis://127.0.0.1:6379/0"},
            "limits": {"storage": "redis+cluster://h:7000"},
        },
    )
    with pytest.raises(ConfigErrors) as refused:
        load_settings(config)
    assert any(e.key == "limits.storage" and "Cluster" in e.message for e in refused.value.errors)


def test_every_store_of_a_process_shares_one_connection_pool() -> None:
    with redis_server() as server:
        client = redis_client(server.url)
        assert redis_client(server.url) is client
        assert limits_storage(server.url).storage.connection_pool is client.connection_pool  # type: ignore[attr-defined]


def tiny_app(url: str) -> flask.Flask:
    app = flask.Flask(__name__)
    limiter = build_limiter(app, url, lambda: "192.0.2.10", key_prefix="t-rl")

    @app.post("/login")
    @limiter.limit("1000/minute")
    def login() -> str:
        return "ok"

    return app


#: What each store raises when Redis cannot answer: the callers turn these into 503s (fail closed).
FAIL_CLOSED = (SessionStoreUnavailable, LimitsUnavailable, redis.RedisError)


@pytest.mark.timeout(120)
def test_every_store_follows_a_failover_by_itself(tmp_path: Path) -> None:
    with sentinel_set() as servers:
        url = servers.url
        sessions = RedisSessionStore(url)
        throttle, quotas, nonces = LoginThrottle(url), QuotaGuard(url), nonce_store(url)
        limited = tiny_app(url).test_client()
        spec = QuotaSpec(max_requests=1000, max_distinct=1000, window_seconds=600)
        identity = Identity("810000000900", LoginMethod.CARD, time.time())
        before = sessions.create(identity, time.time())
        nonce_count = iter(range(10**6))

        uses: dict[str, Callable[[], object]] = {
            "sessions": lambda: sessions.get(before.id, time.time()),
            "login throttle": lambda: throttle.check("192.0.2.10", "810000000900", time.time()),
            "quotas": lambda: quotas.check_and_count("810000000900", "r", spec, "p1", time.time()),
            "nonces": lambda: nonces.add(NonceKind.CHALLENGE, f"n{next(nonce_count)}", "v", 60, time.time()),
            "flask-limiter": lambda: limited.post("/login").status_code,
        }
        for use in uses.values():
            use()
        servers.wait_until_replicated()
        old_master = servers.master.port
        killed = servers.kill_master()
        refusals: Counter[str] = Counter()
        recovered: dict[str, float] = {}
        while len(recovered) < len(uses):
            assert time.monotonic() - killed < 60, f"not recovered: {set(uses) - set(recovered)}"
            for name, use in uses.items():
                if name in recovered:
                    continue
                try:
                    result = use()
                except FAIL_CLOSED as exc:
                    refusals[type(exc).__name__] += 1
                    continue
                if name == "flask-limiter" and result != 200:
                    continue
                recovered[name] = time.monotonic() - killed
            time.sleep(0.05)
        print(
            f"\nfailover: each store answered again after (s): { {k: round(v, 2) for k, v in recovered.items()} }"
        )
        print(f"refusals meanwhile (all fail-closed): {dict(refusals)}")
        assert servers.master_port() == servers.replica.port != old_master
        session = sessions.get(before.id, time.time())  # it had reached the replica: it survived
        assert session is not None and session.identity.idnat == "810000000900"
        # And writes go to the promoted replica.
        assert sessions.get(sessions.create(identity, time.time()).id, time.time()) is not None


QUOTA_POLICIES = """\
rules:
  - name: counted-records
    match: { path: /echo/records/*, methods: [GET] }
    action: authenticate
    quota: { window: 1h, max_requests: 100000, max_distinct: 1000, resource: { path_segment: 3 } }
""" + TEST_POLICIES.removeprefix("rules:\n")


class Load:
    """Client threads reading records with sessions made before the failover, noting every answer."""

    def __init__(self, urls: list[str], sessions: list[str], threads: int = 4) -> None:
        self.urls, self.sessions = urls, sessions
        self.answers: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, number: int) -> None:
        with requests.Session() as http:
            n = number
            while not self._stop.is_set():
                n += len(self._threads)
                url = f"{self.urls[n % len(self.urls)]}/echo/records/{n % 50}"
                cookies = {COOKIE: self.sessions[n % len(self.sessions)]}
                try:
                    answer = http.get(url, cookies=cookies, timeout=10)
                except requests.RequestException as exc:
                    self.errors.append(type(exc).__name__)
                    continue
                self.answers.append(
                    (time.monotonic(), answer.status_code, answer.headers.get("X-Gateway-Reason", ""))
                )

    def ok_since(self, moment: float) -> int:
        return sum(1 for at, status, _ in self.answers if at > moment and status == 200)


@pytest.mark.timeout(180)
def test_the_gateway_rides_out_a_sentinel_failover_under_load(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with sentinel_set() as servers:
        with sharing_store(
            tmp_path,
            servers.url,
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            workers=2,
            policies=QUOTA_POLICIES,
        ) as urls:
            sessions = [new_session(servers.url, f"81000000095{n}") for n in range(6)]
            servers.wait_until_replicated()
            with Load(urls, sessions) as load:
                wait_until(lambda: load.ok_since(0) >= 50, what="load running")
                killed = servers.kill_master()
                wait_until(
                    lambda: _served_again(load, killed) is not None, timeout=90, what="load served again"
                )
            promoted = servers.master_port()
        recovered = _served_again(load, killed)
        assert recovered is not None
        statuses = Counter(status for _, status, _ in load.answers)
        reasons = Counter(reason for _, status, reason in load.answers if status != 200)
        print(
            f"\nsentinel failover under load: {dict(statuses)}, refusal reasons {dict(reasons)}; "
            f"served again {recovered - killed:.2f} s after kill -9 of the master"
        )
        assert promoted == servers.replica.port
        # Within seconds, by itself (docs/operations.md, "Measured limits": 2.3-2.7 s with these sentinels).
        assert recovered - killed < 10
        assert load.errors == []
        # Nothing in between answered 500, and no session was lost (a lost one would answer 401): every
        # session was made, and had reached the replica, before the failover.
        assert set(statuses) == {200, 503}, statuses
        assert set(reasons) <= {"session_store_unavailable", "limits_unavailable"}


def _served_again(load: Load, killed: float, run: int = 50) -> float | None:
    """When the gateway answered 200 again for good: the first of ``run`` 200s in a row after the last
    refusal that followed the kill (None until then)."""
    answers = sorted(answer for answer in load.answers if answer[0] > killed)
    failures = [index for index, (_, status, _) in enumerate(answers) if status != 200]
    if not failures or len(answers) - failures[-1] - 1 < run:
        return None
    return answers[failures[-1] + 1][0]
