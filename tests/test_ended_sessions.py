"""gateway/ended_sessions.py: the marks nginx checks before serving a cached allow (end to end in
tests/deploy/test_parity.py: test_a_cached_decision_is_never_served_after_the_session_ended and
test_a_backchannel_logout_ends_cached_access_at_once)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ended_sessions import EndedSessionMarks, MemoryTagIndex, RedisTagIndex, TagIndex, mark_of
from gateway.identity import Identity, LoginMethod
from gateway.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from tests.support.redis import redis_server


def identity(idnat: str = "810001234567") -> Identity:
    return Identity(idnat, LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[SessionStore, TagIndex]:
    if request.param == "memory":
        return MemorySessionStore(), MemoryTagIndex()
    url = request.getfixturevalue("redis_url")
    return RedisSessionStore(url), RedisTagIndex(url, prefix=f"test:{tmp_path.name}:")


def marked(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_a_deleted_or_rotated_session_is_marked(
    stores: tuple[SessionStore, TagIndex], tmp_path: Path
) -> None:
    store, tags = stores
    marks = EndedSessionMarks(store, tmp_path / "ended", keep_seconds=60, tags=tags)
    first = marks.create(identity(), time.time())
    second = marks.rotate(first.id, identity(), time.time())
    marks.delete(second.id)
    assert marked(tmp_path / "ended") == sorted([first.id[:22], second.id[:22]])
    assert marks.get(second.id, time.time()) is None


def test_sessions_ended_by_tag_are_marked_and_no_others(
    stores: tuple[SessionStore, TagIndex], tmp_path: Path
) -> None:
    store, tags = stores
    marks = EndedSessionMarks(store, tmp_path / "ended", keep_seconds=60, tags=tags)
    ended = [marks.create(identity(), time.time(), tags=["sid:a"]) for _ in range(2)]
    rotated = marks.rotate(marks.create(identity(), time.time(), tags=["sid:a"]).id, identity(), time.time())
    kept = marks.create(identity(), time.time(), tags=["sid:b"])
    assert marks.delete_tagged("sid:a") == 3
    expected = {mark_of(s.id) for s in (*ended, rotated)}
    assert expected <= set(marked(tmp_path / "ended")) and kept.id[:22] not in marked(tmp_path / "ended")
    assert marks.get(kept.id, time.time()) is not None


def test_only_what_could_be_a_session_id_names_a_mark(tmp_path: Path) -> None:
    marks = EndedSessionMarks(
        MemorySessionStore(), tmp_path / "ended", keep_seconds=60, tags=MemoryTagIndex()
    )
    for session_id in ("../../escape-attempt-x", "short", "a/b" * 10, "x" * 200):
        marks.delete(session_id)
    assert not (tmp_path / "ended").exists() and not (tmp_path / "escape-attempt-x").exists()


def test_old_marks_are_swept_and_a_mark_that_cannot_be_written_ends_the_session_anyway(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ended"
    marks = EndedSessionMarks(MemorySessionStore(), directory, keep_seconds=60, tags=MemoryTagIndex())
    session = marks.create(identity(), time.time())
    marks.delete(session.id)
    old = time.time() - 120
    os.utime(directory / session.id[:22], (old, old))
    assert marks.sweep(time.time()) == 1 and list(directory.iterdir()) == []
    (tmp_path / "a-file").write_text("")
    blocked = EndedSessionMarks(
        MemorySessionStore(), tmp_path / "a-file", keep_seconds=60, tags=MemoryTagIndex()
    )
    live = blocked.create(identity(), time.time())
    blocked.delete(live.id)
    assert blocked.get(live.id, time.time()) is None
