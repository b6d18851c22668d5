"""One contract suite for every SessionStore (memory, real Redis), plus Redis outage and recovery."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from gateway.identity import Identity, LoginMethod
from gateway.sessions import (
    CachedSessionStore,
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    SessionStoreUnavailable,
    idnat_tag,
    psc_sid_tag,
    psc_sub_tag,
)
from tests.support.redis import RedisServer, redis_server

T0 = 1_700_000_000.0
IDLE = 1800.0
ABSOLUTE = 4 * 3600.0
_prefixes = itertools.count()


def identity(idnat: str = "810002813839", auth_time: float = T0) -> Identity:
    return Identity(
        idnat=idnat,
        method=LoginMethod.ECPS,
        auth_time=auth_time,
        surname="DUPONT",
        given_name="JEAN",
        professions=("10",),
        auth_mode="MOBILE",
        acr="eidas1",
    )


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


StoreFactory = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "redis", "redis+local-cache"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param == "memory":
        return MemorySessionStore
    server: RedisServer = request.getfixturevalue("redis_srv")

    def factory(**kwargs: float) -> SessionStore:
        # A fresh prefix per test: tests share the server, never their keys.
        store = RedisSessionStore(server.url, key_prefix=f"t{next(_prefixes)}:", **kwargs)
        return CachedSessionStore(store, ttl=0.5) if request.param.endswith("cache") else store

    return factory


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    return make_store(idle_timeout=IDLE, absolute_timeout=ABSOLUTE)


def test_create_then_get_round_trips_everything(store: SessionStore) -> None:
    created = store.create(identity(), T0, data={"id_token": "eyJ.x.y", "sid": "abc"})
    got = store.get(created.id, T0 + 1)
    assert got is not None
    assert got.id == created.id
    assert got.identity == identity()
    assert got.identity.professions == ("10",)
    assert got.created_at == T0
    assert got.csrf_token == created.csrf_token
    assert dict(got.data) == {"id_token": "eyJ.x.y", "sid": "abc"}


def test_ids_and_csrf_tokens_are_random_and_long(store: SessionStore) -> None:
    a, b = store.create(identity(), T0), store.create(identity(), T0)
    assert a.id != b.id and a.csrf_token != b.csrf_token
    assert len(a.id) >= 43 and a.id not in repr(a) and a.csrf_token not in repr(a)


def test_unknown_id_is_none(store: SessionStore) -> None:
    assert store.get("nope", T0) is None


def test_idle_timeout(store: SessionStore) -> None:
    session = store.create(identity(), T0)
    assert store.get(session.id, T0 + IDLE - 1) is not None
    # Used just now: the idle clock restarted.
    assert store.get(session.id, T0 + 2 * IDLE - 2) is not None
    assert store.get(session.id, T0 + 3 * IDLE) is None
    # Expired means gone, even if asked again at an earlier time.
    assert store.get(session.id, T0 + 2 * IDLE - 1) is None


def test_last_seen_is_touched_at_most_every_few_seconds(make_store: StoreFactory) -> None:
    store = make_store(idle_timeout=IDLE, absolute_timeout=ABSOLUTE, touch_interval=5.0)
    session = store.create(identity(), T0)
    got = store.get(session.id, T0 + 1)
    assert got is not None and got.last_seen == T0
    got = store.get(session.id, T0 + 6)
    assert got is not None and got.last_seen == T0 + 6


def test_absolute_timeout_even_when_active(store: SessionStore) -> None:
    session = store.create(identity(), T0)
    now = T0
    while now < T0 + ABSOLUTE - IDLE:
        now += IDLE / 2
        assert store.get(session.id, now) is not None
    assert store.get(session.id, T0 + ABSOLUTE) is None


@pytest.mark.parametrize("idle, absolute", [(0, 10), (10, 0), (-1, 10)])
def test_timeouts_must_be_positive(make_store: StoreFactory, idle: float, absolute: float) -> None:
    with pytest.raises(ValueError):
        make_store(idle_timeout=idle, absolute_timeout=absolute)


def test_rotate_gives_a_new_id_and_kills_the_old_one(store: SessionStore) -> None:
    old = store.create(identity(), T0, data={"sid": "s1"})
    stepped_up = identity(auth_time=T0 + 100)
    new = store.rotate(old.id, stepped_up, T0 + 100)
    assert new.id != old.id and new.csrf_token != old.csrf_token
    assert store.get(old.id, T0 + 101) is None
    got = store.get(new.id, T0 + 101)
    assert got is not None and got.identity.auth_time == T0 + 100
    assert dict(got.data) == {"sid": "s1"}, "data=None carries the data over"
    assert got.created_at == T0 + 100


def test_rotate_with_new_data_and_from_unknown_id(store: SessionStore) -> None:
    new = store.rotate("never-existed", identity(), T0, data={"sid": "s2"})
    got = store.get(new.id, T0)
    assert got is not None and dict(got.data) == {"sid": "s2"}
    newer = store.rotate(new.id, identity(), T0 + 1, data={})
    got = store.get(newer.id, T0 + 1)
    assert got is not None and dict(got.data) == {}


def test_delete(store: SessionStore) -> None:
    session = store.create(identity(), T0)
    store.delete(session.id)
    assert store.get(session.id, T0) is None
    store.delete(session.id)  # idempotent


def test_the_idnat_tag_logs_out_everywhere_and_only_that_person(store: SessionStore) -> None:
    mine = [store.create(identity("810000000001"), T0) for _ in range(3)]
    rotated = store.rotate(mine[0].id, identity("810000000001"), T0 + 1)
    other = store.create(identity("810000000002"), T0)
    assert store.delete_tagged(idnat_tag("810000000001")) == 3
    assert all(store.get(s.id, T0 + 2) is None for s in [*mine, rotated])
    assert store.get(other.id, T0 + 2) is not None
    assert store.delete_tagged(idnat_tag("810000000001")) == 0


def test_every_session_carries_its_idnat_tag_and_the_tags_it_was_given(store: SessionStore) -> None:
    session = store.create(identity("810000000001"), T0, tags=[psc_sid_tag("s1"), psc_sub_tag("f:1")])
    expected = {idnat_tag("810000000001"), psc_sid_tag("s1"), psc_sub_tag("f:1")}
    assert session.tags == expected
    got = store.get(session.id, T0 + 1)
    assert got is not None and got.tags == expected


def test_delete_tagged_ends_only_the_sessions_with_that_tag(store: SessionStore) -> None:
    psc_a = [store.create(identity("810000000001"), T0, tags=[psc_sid_tag("a")]) for _ in range(2)]
    psc_b = store.create(identity("810000000001"), T0, tags=[psc_sid_tag("b")])
    card = store.create(identity("810000000001"), T0, tags=["card:00ff"])
    assert store.delete_tagged(psc_sid_tag("a")) == 2
    assert all(store.get(s.id, T0 + 1) is None for s in psc_a)
    assert store.get(psc_b.id, T0 + 1) is not None
    assert store.get(card.id, T0 + 1) is not None
    assert store.delete_tagged(psc_sid_tag("a")) == 0
    assert store.delete_tagged("card:00ff") == 1
    assert store.delete_tagged(idnat_tag("810000000001")) == 1, "only psc_b is left"


def test_rotation_carries_tags_over_or_replaces_them(store: SessionStore) -> None:
    old = store.create(identity("810000000001"), T0, tags=["card:00ff"])
    carried = store.rotate(old.id, identity("810000000001"), T0 + 1)
    assert carried.tags == {idnat_tag("810000000001"), "card:00ff"}
    assert store.delete_tagged("card:00ff") == 1
    assert store.get(carried.id, T0 + 2) is None
    again = store.create(identity("810000000001"), T0, tags=["card:00ff"])
    replaced = store.rotate(again.id, identity("810000000001"), T0 + 1, data={}, tags=[psc_sid_tag("x")])
    assert replaced.tags == {idnat_tag("810000000001"), psc_sid_tag("x")}
    assert store.delete_tagged("card:00ff") == 0, "the rotated-away session left the card's index"
    assert store.get(replaced.id, T0 + 2) is not None


def test_a_rotation_to_another_identity_drops_the_old_idnat_tag(store: SessionStore) -> None:
    old = store.create(identity("810000000001"), T0)
    new = store.rotate(old.id, identity("810000000002"), T0 + 1)
    assert new.tags == {idnat_tag("810000000002")}
    assert store.delete_tagged(idnat_tag("810000000001")) == 0
    assert store.get(new.id, T0 + 2) is not None


def test_a_deleted_session_leaves_its_tags_indexes(store: SessionStore) -> None:
    session = store.create(identity("810000000001"), T0, tags=["card:00ff"])
    store.delete(session.id)
    assert store.delete_tagged("card:00ff") == 0
    assert store.delete_tagged(idnat_tag("810000000001")) == 0


def test_ping(store: SessionStore) -> None:
    store.ping()


def test_memory_store_purges_expired_entries() -> None:
    store = MemorySessionStore(idle_timeout=60, absolute_timeout=3600, purge_interval=60)
    for i in range(100):
        store.create(identity(f"8100000{i:05d}"), T0)
    assert len(store) == 100
    store.create(identity(), T0 + 120)
    assert len(store) == 1
    assert store.delete_tagged(idnat_tag("810000000000")) == 0


def test_redis_keys_hold_no_session_id_and_json_only(redis_srv: RedisServer) -> None:
    store = RedisSessionStore(redis_srv.url, key_prefix="shape:")
    session = store.create(identity(), T0, data={"sid": "x"})
    client = redis.Redis.from_url(redis_srv.url)
    keys = [k.decode() for k in client.keys("shape:*")]
    assert len(keys) == 2 and not any(session.id in k for k in keys)
    session_key = next(k for k in keys if k.startswith("shape:s:"))
    raw = client.get(session_key)
    assert raw is not None and session.id.encode() not in raw and raw.startswith(b"{")
    # TTL follows the idle timeout (the real Redis clock expires what the gateway's clock would).
    assert 0 < client.pttl(session_key) <= IDLE * 1000
    client.close()


def test_redis_down_fails_closed_then_recovers_without_restart() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            store = RedisSessionStore(server.url, key_prefix="outage:", socket_timeout=0.5)
            session = store.create(identity(), T0)
            server.stop()
            for call in (
                lambda: store.get(session.id, T0),
                lambda: store.create(identity(), T0),
                lambda: store.rotate(session.id, identity(), T0),
                lambda: store.delete(session.id),
                lambda: store.delete_tagged(idnat_tag("810002813839")),
                store.ping,
            ):
                with pytest.raises(SessionStoreUnavailable) as err:
                    call()
                assert session.id not in str(err.value)
            server.start()  # same port; no persistence, so old sessions are gone
            store.ping()
            assert store.get(session.id, T0) is None
            fresh = store.create(identity(), T0)
            assert store.get(fresh.id, T0) is not None
        finally:
            server.stop()


def test_redis_restart_between_calls_is_invisible_to_callers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            store = RedisSessionStore(server.url, key_prefix="restart:")
            store.create(identity(), T0)
            server.restart()  # the pooled connection is now dead
            fresh = store.create(identity(), T0)
            assert store.get(fresh.id, T0) is not None
        finally:
            server.stop()


def test_session_data_is_a_read_only_copy(store: SessionStore) -> None:
    data = {"sid": "s1"}
    session = store.create(identity(), T0, data=data)
    data["sid"] = "changed"
    assert session.data["sid"] == "s1"
    with pytest.raises(TypeError):
        session.data["sid"] = "x"  # type: ignore[index]
    got = store.get(session.id, T0)
    assert got is not None and got.data["sid"] == "s1"


def test_memory_store_is_thread_safe() -> None:
    import threading

    store = MemorySessionStore(idle_timeout=IDLE, absolute_timeout=ABSOLUTE, touch_interval=0)
    ids: list[str] = []

    def work(n: int) -> None:
        for i in range(200):
            session = store.create(identity(f"81000000{n:04d}"), T0 + i)
            ids.append(session.id)
            assert store.get(session.id, T0 + i + 1) is not None
            if i % 2:
                store.rotate(session.id, identity(f"81000000{n:04d}"), T0 + i + 2)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) == 800
    assert sum(store.delete_tagged(idnat_tag(f"81000000{n:04d}")) for n in range(4)) == 800
    assert len(store) == 0


def test_local_cache_sees_other_instances_revocations_within_its_ttl(redis_srv: RedisServer) -> None:
    prefix = f"t{next(_prefixes)}:"
    here = CachedSessionStore(RedisSessionStore(redis_srv.url, key_prefix=prefix), ttl=1.0)
    elsewhere = RedisSessionStore(redis_srv.url, key_prefix=prefix)
    session = here.create(identity(), T0)
    assert here.get(session.id, T0 + 1) is not None  # read once: now cached
    elsewhere.delete_tagged(idnat_tag(session.identity.idnat))
    assert here.get(session.id, T0 + 1.5) is not None  # within the cache's second
    assert here.get(session.id, T0 + 2.1) is None  # past it: the revocation is seen


def test_local_cache_forgets_at_once_what_this_process_deletes(redis_srv: RedisServer) -> None:
    here = CachedSessionStore(RedisSessionStore(redis_srv.url, key_prefix=f"t{next(_prefixes)}:"), ttl=10.0)
    session = here.create(identity(), T0)
    assert here.get(session.id, T0) is not None
    here.delete(session.id)
    assert here.get(session.id, T0 + 0.1) is None
    again = here.create(identity(), T0)
    assert here.get(again.id, T0) is not None
    here.delete_tagged(idnat_tag(again.identity.idnat))
    assert here.get(again.id, T0 + 0.1) is None
