"""Ended-session marks: how a logout reaches the requests nginx serves from its decision cache at once.

In forward-auth mode nginx keeps an allow for a few seconds, keyed on the session id, and serves it without
asking the gateway. Ending a session in the store alone would leave that allow in use until it expires. So
every session id this store wrapper ends (``delete``: logout, a quota breach with revoke_session, a card
found revoked at use; ``rotate``: the id a login replaces) first gets an empty file named after it in
``forward_auth.ended_sessions``; the shipped template checks that directory before its cache
(``if (-f .../ended-sessions/$cps_gateway_session)``) and then asks the gateway, which refuses. A mark is only
needed while a cached allow made before it could live: it is removed after ``keep_seconds``.

``delete_tagged`` (back-channel logout, a CRL listing a card) ends sessions by tag, whose ids the store does
not keep (only their hashes): those reach cached requests within ``forward_auth.cache_seconds`` as before.
Writing a mark never fails the session's end: a logout that cannot write its mark is logged and still ends
the session (the cache then ends it within ``forward_auth.cache_seconds``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from gateway.identity import Identity
from gateway.sessions import Session, SessionStore

log = logging.getLogger("gateway.ended_sessions")

#: What nginx's map accepts as a session id (the template's $cps_gateway_session): nothing else is marked,
#: and no mark's name can leave the directory.
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
#: How often old marks are swept (at most; only when a mark is written).
_SWEEP_INTERVAL = 10.0


class EndedSessionMarks:
    """A SessionStore that marks, in ``directory``, every session id it ends, before ending it."""

    def __init__(
        self,
        store: SessionStore,
        directory: Path,
        *,
        keep_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.idle_timeout = store.idle_timeout
        self.absolute_timeout = store.absolute_timeout
        self.directory = directory
        self.keep_seconds = keep_seconds
        self._clock = clock
        self._last_sweep = 0.0

    def create(
        self, identity: Identity, now: float, data: Mapping[str, str] | None = None, tags: Iterable[str] = ()
    ) -> Session:
        return self._store.create(identity, now, data, tags)

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
        return self._store.rotate(session_id, identity, now, data, tags)

    def delete(self, session_id: str) -> None:
        self.mark(session_id)
        self._store.delete(session_id)

    def delete_tagged(self, tag: str) -> int:
        return self._store.delete_tagged(tag)

    def ping(self) -> None:
        self._store.ping()

    def __getattr__(self, name: str) -> Any:
        # The stores' other helpers (expired, remaining, purge...): nothing they do ends a live session early.
        return getattr(self._store, name)

    def mark(self, session_id: str) -> None:
        """An empty file named ``session_id``: nginx no longer serves its cached allows."""
        if not SESSION_ID.match(session_id):
            return  # not an id nginx would key its cache on
        now = self._clock()
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            (self.directory / session_id).touch(mode=0o644)
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
