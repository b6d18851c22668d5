"""gateway/ended_sessions.py: the marks nginx checks before serving a cached allow (the end-to-end case is in
tests/deploy/test_parity.py, test_a_cached_decision_is_never_served_after_the_session_ended)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gateway.ended_sessions import EndedSessionMarks
from gateway.identity import Identity, LoginMethod
from gateway.sessions import MemorySessionStore


def identity() -> Identity:
    return Identity("810001234567", LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")


def test_a_deleted_or_rotated_session_id_is_marked(tmp_path: Path) -> None:
    marks = EndedSessionMarks(MemorySessionStore(), tmp_path / "ended", keep_seconds=60)
    first = marks.create(identity(), time.time())
    second = marks.rotate(first.id, identity(), time.time())
    marks.delete(second.id)
    assert sorted(p.name for p in (tmp_path / "ended").iterdir()) == sorted([first.id, second.id])
    assert marks.get(second.id, time.time()) is None


def test_only_what_could_be_a_session_id_names_a_mark(tmp_path: Path) -> None:
    marks = EndedSessionMarks(MemorySessionStore(), tmp_path / "ended", keep_seconds=60)
    for session_id in ("../../escape-attempt-x", "short", "a/b" * 10, "x" * 200):
        marks.delete(session_id)
    assert not (tmp_path / "ended").exists() and not (tmp_path / "escape-attempt-x").exists()


def test_old_marks_are_swept_and_a_mark_that_cannot_be_written_ends_the_session_anyway(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ended"
    marks = EndedSessionMarks(MemorySessionStore(), directory, keep_seconds=60)
    session = marks.create(identity(), time.time())
    marks.delete(session.id)
    old = time.time() - 120
    os.utime(directory / session.id, (old, old))
    assert marks.sweep(time.time()) == 1 and list(directory.iterdir()) == []
    blocked = EndedSessionMarks(MemorySessionStore(), tmp_path / "a-file", keep_seconds=60)
    (tmp_path / "a-file").write_text("")
    live = blocked.create(identity(), time.time())
    blocked.delete(live.id)
    assert blocked.get(live.id, time.time()) is None
