"""Ended-session marks: how the end of a session reaches the requests nginx serves from its decision cache.

In forward-auth mode nginx keeps an allow for a few seconds, keyed on the session id, and serves it without
asking the gateway. Ending a session in the store alone would leave that allow in use until it expires. So
every session this store wrapper ends first gets an empty file in ``forward_auth.ended_sessions`` named
after its mark (the first ``MARK_LENGTH`` characters of its id); the shipped template checks that directory
before its cache (``if (-f .../ended-sessions/$cps_session_mark)``) and then asks the gateway, which
refuses. Sessions ended by id (``delete``: logout, a quota breach with revoke_session, a card found revoked
at use; ``rotate``: the id a login replaces) are marked directly. Sessions ended by tag (``delete_tagged``:
back-channel logout, a CRL listing a card) are found in a tag index of marks kept beside the store (Redis
with a redis:// store), since the store keeps only hashes of ids: a mark is a prefix, so the index never
holds a usable session id (the rest of it, 126 bits, stays secret).

A mark is only needed while a cached allow made before it could live: it is removed after ``keep_seconds``.
Marking never fails the session's end: a mark that cannot be written is logged, and the cache then ends the
session within ``forward_auth.cache_seconds``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import redis

from gateway.identity import Identity
from gateway.redis_client import redis_client
from gateway.sessions import Session, SessionStore

log = logging.getLogger("gateway.ended_sessions")

#: What nginx's map accepts as a session id (the template's $cps_gateway_session) and is long enough to have a
#: mark: nothing else is marked, and no mark's name can leave the directory.
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
#: A mark is this many first characters of the session id (132 bits): the template's $cps_session_mark.
MARK_LENGTH = 22
_MARK = re.compile(rf"^[A-Za-z0-9_-]{{{MARK_LENGTH}}}$")
#: How often old marks are swept (at most; only when a mark is written).
_SWEEP_INTERVAL = 10.0


def mark_of(session_id: str) -> str | None:
    return session_id[:MARK_LENGTH] if SESSION_ID.match(session_id) else None


class MemoryTagIndex:
    """The marks of this process's sessions by tag (with a memory:// store, which one process holds)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._marks: dict[str, dict[str, float]] = {}
        self._clock = clock

    def add(self, tags: Iterable[str], mark: str, ttl: float) -> None:
        now = self._clock()
        for tag in tags:
            marks = self._marks.setdefault(tag, {})
            for old in [m for m, until in marks.items() if until < now]:
                del marks[old]
            marks[mark] = now + ttl

    def take(self, tag: str) -> list[str]:
        return list(self._marks.pop(tag, {}))


class RedisTagIndex:
    """The marks by tag in Redis (``<prefix><tag>`` sets), shared by every gateway instance."""

    def __init__(self, url: str, prefix: str = "gw:ended-marks:") -> None:
        self._url = url
        self._prefix = prefix

    def add(self, tags: Iterable[str], mark: str, ttl: float) -> None:
        try:
            with redis_client(self._url).pipeline(transaction=False) as pipe:
                for tag in tags:
                    pipe.sadd(self._prefix + tag, mark)
                    pipe.expire(self._prefix + tag, max(1, int(ttl)))
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot index a session's mark: %s", exc)

    def take(self, tag: str) -> list[str]:
        key = self._prefix + tag
        try:
            client = redis_client(self._url)
            marks = [m.decode() if isinstance(m, bytes) else str(m) for m in client.smembers(key)]
            if marks:
                client.srem(key, *marks)
        except redis.RedisError as exc:
            log.warning("cannot read the marks of ended sessions: %s", exc)
            return []
        return marks


class TagIndex(Protocol):
    def add(self, tags: Iterable[str], mark: str, ttl: float) -> None: ...

    def take(self, tag: str) -> list[str]: ...


class EndedSessionMarks:
    """A SessionStore that marks, in ``directory``, every session id it ends, before ending it."""

    def __init__(
        self,
        store: SessionStore,
        directory: Path,
        *,
        keep_seconds: float,
        tags: TagIndex,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._tags = tags
        self.idle_timeout = store.idle_timeout
        self.absolute_timeout = store.absolute_timeout
        self.directory = directory
        self.keep_seconds = keep_seconds
        self._clock = clock
        self._last_sweep = 0.0

    def create(
        self, identity: Identity, now: float, data: Mapping[str, str] | None = None, tags: Iterable[str] = ()
    ) -> Session:
        return self._indexed(self._store.create(identity, now, data, tags))

    def get(self, session_id: str, now: float) -> Session | None:
        return self._store.get(session_id, now)

    def rotate(
        self,
        session_id: str,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] | None = None,
    ) -> Session:
        self.mark(session_id)
        return self._indexed(self._store.rotate(session_id, identity, now, data, tags))

    def delete(self, session_id: str) -> None:
        self.mark(session_id)
        self._store.delete(session_id)

    def delete_tagged(self, tag: str) -> int:
        for mark in self._tags.take(tag):
            self._write(mark)
        return self._store.delete_tagged(tag)

    def ping(self) -> None:
        self._store.ping()

    def __getattr__(self, name: str) -> Any:
        # The stores' other helpers (expired, remaining, purge...): nothing they do ends a live session early.
        return getattr(self._store, name)

    def _indexed(self, session: Session) -> Session:
        mark = mark_of(session.id)
        if mark is not None and session.tags:
            # As long as the session can live: a tagged end finds its mark until then.
            self._tags.add(session.tags, mark, self._store.absolute_timeout)
        return session

    def mark(self, session_id: str) -> None:
        """Nginx no longer serves the cached allows of ``session_id``."""
        mark = mark_of(session_id)
        if mark is not None:  # otherwise not an id nginx would key its cache on
            self._write(mark)

    def _write(self, mark: str) -> None:
        if not _MARK.match(mark):
            return  # an index entry that is no mark (never written by this module)
        now = self._clock()
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            (self.directory / mark).touch(mode=0o644)
        except OSError as exc:
            log.warning("cannot mark an ended session in %s: %s", self.directory, exc.strerror)
            return
        if now - self._last_sweep >= _SWEEP_INTERVAL:
            self._last_sweep = now
            self.sweep(now)

    def sweep(self, now: float) -> int:
        """Remove the marks older than ``keep_seconds``; how many."""
        removed = 0
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.is_file() and entry.stat().st_mtime < now - self.keep_seconds:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue  # removed meanwhile by another process
        return removed
