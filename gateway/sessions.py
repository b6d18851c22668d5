"""Server-side sessions: the cookie carries only an opaque id; everything else stays in the store.

Two stores share one contract (``tests/test_sessions.py`` runs the same suite on both):
:class:`MemorySessionStore` for one process, :class:`RedisSessionStore` for several. No Flask here: the
app reads the cookie and passes ``now``; this module only keeps, expires and rotates sessions.

Session ids are secrets. They are never logged and never stored as such: the store key is the SHA-256 of
the id, so a copy of the store (Redis dump, debugger) does not hand out live sessions.

A session carries tags, and both stores index them so :meth:`SessionStore.delete_tagged` ends every live
session with a tag at once: ``idnat:<idNat>`` (every session has it: log out everywhere), ``card:<...>`` (the
card that opened it: revocation), ``psc-sid:<sid>`` and ``psc-sub:<sub>`` (PSC back-channel logout).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

import redis

from gateway.identity import Identity
from gateway.redis_client import DEFAULT_TIMEOUT, redis_client

DEFAULT_IDLE_TIMEOUT = 30 * 60.0
DEFAULT_ABSOLUTE_TIMEOUT = 4 * 3600.0
#: ``get`` rewrites ``last_seen`` at most this often: the hot path calls it on every request, and a write per
#: request would double the store traffic. Sessions may thus expire up to this much earlier than idle_timeout.
DEFAULT_TOUCH_INTERVAL = 5.0

IDNAT_TAG_PREFIX = "idnat:"
PSC_SID_TAG_PREFIX = "psc-sid:"
PSC_SUB_TAG_PREFIX = "psc-sub:"


def idnat_tag(idnat: str) -> str:
    """The tag every session of this professional carries (log out everywhere)."""
    return IDNAT_TAG_PREFIX + idnat


def psc_sid_tag(sid: str) -> str:
    """The tag of the e-CPS sessions opened within one PSC session (back-channel logout by ``sid``)."""
    return PSC_SID_TAG_PREFIX + sid


def psc_sub_tag(sub: str) -> str:
    """The tag of the e-CPS sessions of one PSC subject (back-channel logout without ``sid``)."""
    return PSC_SUB_TAG_PREFIX + sub


class SessionStoreUnavailable(Exception):
    """The store cannot be reached or answered wrongly: callers fail closed (503, reason
    ``session_store_unavailable``). The message never contains a session id."""

    code = "session_store_unavailable"


@dataclass(frozen=True, slots=True)
class Session:
    #: Opaque secret sent in the cookie; compared only through the store key.
    id: str = field(repr=False)
    identity: Identity
    #: POSIX times: creation (for the absolute lifetime) and last use (for the idle timeout).
    created_at: float
    last_seen: float
    #: Synchroniser token for state-changing forms (logout...).
    csrf_token: str = field(repr=False)
    #: Small string data the login flows need later, e.g. the PSC id_token (logout hint) and sid.
    data: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Index entries for :meth:`SessionStore.delete_tagged`; always holds the identity's ``idnat:`` tag.
    tags: frozenset[str] = frozenset()

    def to_json(self) -> str:
        """The stored form (no id: the key stands for it). JSON only, never pickle."""
        return json.dumps(
            {
                "identity": self.identity.to_dict(),
                "created_at": self.created_at,
                "last_seen": self.last_seen,
                "csrf_token": self.csrf_token,
                "data": dict(self.data),
                "tags": sorted(self.tags),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, session_id: str, raw: str | bytes) -> Session:
        doc = json.loads(raw)
        return cls(
            id=session_id,
            identity=Identity.from_dict(doc["identity"]),
            created_at=float(doc["created_at"]),
            last_seen=float(doc["last_seen"]),
            csrf_token=str(doc["csrf_token"]),
            data=MappingProxyType({str(k): str(v) for k, v in dict(doc.get("data", {})).items()}),
            tags=frozenset(str(tag) for tag in doc.get("tags", ())),
        )


class SessionStore(Protocol):
    idle_timeout: float
    absolute_timeout: float

    def create(
        self,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] = (),
    ) -> Session:
        """A new session with ``tags`` plus the identity's ``idnat:`` tag."""
        ...

    def get(self, session_id: str, now: float) -> Session | None:
        """The live session, or None if unknown or expired (an expired one is deleted)."""
        ...

    def rotate(
        self,
        session_id: str,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] | None = None,
    ) -> Session:
        """A fresh session (new id, new csrf token, new lifetime) replacing ``session_id`` (at each login and
        step-up, against session fixation). ``data=None`` and ``tags=None`` carry the old session's data and
        tags over (the ``idnat:`` tag always follows ``identity``); an unknown or expired old id is fine
        (first login)."""
        ...

    def delete(self, session_id: str) -> None: ...

    def delete_tagged(self, tag: str) -> int:
        """End every live session carrying ``tag`` (``delete_tagged(idnat_tag(idnat))`` logs a professional
        out everywhere); returns how many were deleted."""
        ...

    def ping(self) -> None:
        """Raise :class:`SessionStoreUnavailable` if the store is unusable (health checks)."""
        ...


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def _key_of(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class _Timeouts:
    """Timeout rules, and session making, shared by both stores."""

    def __init__(self, idle_timeout: float, absolute_timeout: float, touch_interval: float) -> None:
        if idle_timeout <= 0 or absolute_timeout <= 0:
            raise ValueError("idle_timeout and absolute_timeout must be > 0")
        if touch_interval < 0:
            raise ValueError("touch_interval must be >= 0")
        self.idle_timeout = float(idle_timeout)
        self.absolute_timeout = float(absolute_timeout)
        # Touching less often than the idle timeout would expire active sessions.
        self.touch_interval = min(float(touch_interval), self.idle_timeout / 2)

    def expired(self, session: Session, now: float) -> bool:
        return (
            now - session.last_seen >= self.idle_timeout or now - session.created_at >= self.absolute_timeout
        )

    def remaining(self, session: Session, now: float) -> float:
        """Seconds the session may live if unused from ``now`` (the store TTL)."""
        return min(
            session.last_seen + self.idle_timeout - now,
            session.created_at + self.absolute_timeout - now,
        )

    def needs_touch(self, session: Session, now: float) -> bool:
        return now - session.last_seen >= self.touch_interval

    def create(
        self,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] = (),
    ) -> Session:
        session = self.new_session(identity, now, data, tags)
        self._insert(session, now)
        return session

    def _insert(self, session: Session, now: float) -> None:
        raise NotImplementedError

    def new_session(
        self, identity: Identity, now: float, data: Mapping[str, str] | None, tags: Iterable[str]
    ) -> Session:
        return Session(
            id=new_session_id(),
            identity=identity,
            created_at=now,
            last_seen=now,
            csrf_token=secrets.token_urlsafe(32),
            # Read-only view of a private copy: a frozen Session must not change under the caller's feet.
            data=MappingProxyType({str(k): str(v) for k, v in (data or {}).items()}),
            tags=_tags_for(identity, tags),
        )

    def successor(
        self,
        old: Session | None,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None,
        tags: Iterable[str] | None,
    ) -> Session:
        """The session replacing ``old`` (None: unknown or expired) at a rotation."""
        if old is not None and self.expired(old, now):
            old = None
        if data is None:
            data = old.data if old is not None else {}
        if tags is None:
            tags = old.tags if old is not None else ()
        return self.new_session(identity, now, data, tags)


def _tags_for(identity: Identity, tags: Iterable[str]) -> frozenset[str]:
    # Another identity's idnat tag must not ride along a rotation: log-out-everywhere would end this session.
    kept = {str(tag) for tag in tags if not str(tag).startswith(IDNAT_TAG_PREFIX)}
    return frozenset({*kept, idnat_tag(identity.idnat)})


class MemorySessionStore(_Timeouts):
    """One process only (tests, single-worker deployments). Thread-safe; expired entries are purged at least
    every ``purge_interval`` seconds of the callers' clock, so memory follows the number of live sessions."""

    def __init__(
        self,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        absolute_timeout: float = DEFAULT_ABSOLUTE_TIMEOUT,
        touch_interval: float = DEFAULT_TOUCH_INTERVAL,
        purge_interval: float = 60.0,
    ) -> None:
        super().__init__(idle_timeout, absolute_timeout, touch_interval)
        self._purge_interval = purge_interval
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._by_tag: dict[str, set[str]] = {}
        self._last_purge = -math.inf

    def __len__(self) -> int:
        return len(self._sessions)

    def _insert(self, session: Session, now: float) -> None:
        with self._lock:
            self._purge_if_due(now)
            self._put(session)

    def get(self, session_id: str, now: float) -> Session | None:
        key = _key_of(session_id)
        with self._lock:
            self._purge_if_due(now)
            session = self._sessions.get(key)
            if session is None:
                return None
            if self.expired(session, now):
                self._remove(key)
                return None
            if self.needs_touch(session, now):
                session = replace(session, last_seen=now)
                self._sessions[key] = session
        # The caller gets the id it asked with; only the key was compared.
        return replace(session, id=session_id)

    def rotate(
        self,
        session_id: str,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] | None = None,
    ) -> Session:
        with self._lock:
            old = self._remove(_key_of(session_id))
            session = self.successor(old, identity, now, data, tags)
            self._put(session)
        return session

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._remove(_key_of(session_id))

    def delete_tagged(self, tag: str) -> int:
        with self._lock:
            keys = list(self._by_tag.get(tag, ()))
            return sum(1 for key in keys if self._remove(key) is not None)

    def ping(self) -> None:
        return None

    def purge(self, now: float) -> int:
        """Drop expired sessions now; returns how many."""
        with self._lock:
            return self._purge(now)

    # Callers hold the lock.
    def _put(self, session: Session) -> None:
        key = _key_of(session.id)
        # Keep only the key: the store never holds usable ids.
        self._sessions[key] = replace(session, id="")
        for tag in session.tags:
            self._by_tag.setdefault(tag, set()).add(key)

    def _remove(self, key: str) -> Session | None:
        session = self._sessions.pop(key, None)
        for tag in session.tags if session is not None else ():
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]
        return session

    def _purge_if_due(self, now: float) -> None:
        if now - self._last_purge >= self._purge_interval:
            self._purge(now)

    def _purge(self, now: float) -> int:
        self._last_purge = now
        expired = [key for key, session in self._sessions.items() if self.expired(session, now)]
        for key in expired:
            self._remove(key)
        return len(expired)


class RedisSessionStore(_Timeouts):
    """Sessions shared by every gateway process. Layout under ``key_prefix``:

    - ``s:<sha256(id)>``: the session as JSON, TTL = time left (min of idle and absolute limits);
    - ``t:<tag>``: set of the session keys carrying the tag, TTL = absolute timeout, refreshed at each login;
      members whose session expired or was deleted are harmless (a session key is never reused).

    Any Redis error raises :class:`SessionStoreUnavailable`; the connection pool reconnects by itself on a
    later call once Redis is back.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        key_prefix: str = "gw:session:",
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        absolute_timeout: float = DEFAULT_ABSOLUTE_TIMEOUT,
        touch_interval: float = DEFAULT_TOUCH_INTERVAL,
        socket_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(idle_timeout, absolute_timeout, touch_interval)
        self._redis = (
            redis_client(url_or_client, timeout=socket_timeout)
            if isinstance(url_or_client, str)
            else url_or_client
        )
        self._prefix = key_prefix

    def _session_key(self, key: str) -> str:
        return f"{self._prefix}s:{key}"

    def _tag_key(self, tag: str) -> str:
        return f"{self._prefix}t:{tag}"

    def _ttl_ms(self, session: Session, now: float) -> int:
        return max(1, math.ceil(self.remaining(session, now) * 1000))

    def _insert(self, session: Session, now: float) -> None:
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                self._queue_put(pipe, session, now)
                pipe.execute()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None

    def get(self, session_id: str, now: float) -> Session | None:
        key = self._session_key(_key_of(session_id))
        try:
            raw = self._redis.get(key)
            if raw is None:
                return None
            try:
                session = Session.from_json(session_id, raw)
            except (ValueError, KeyError, TypeError):
                # Unreadable entry (older format, tampering): treat as no session.
                self._redis.delete(key)
                return None
            if self.expired(session, now):
                self._redis.delete(key)
                return None
            if self.needs_touch(session, now):
                session = replace(session, last_seen=now)
                # XX: never resurrect a session deleted (logout) since our GET.
                self._redis.set(key, session.to_json(), px=self._ttl_ms(session, now), xx=True)
            return session
        except redis.RedisError as exc:
            raise _unavailable(exc) from None

    def rotate(
        self,
        session_id: str,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] | None = None,
    ) -> Session:
        old_key = _key_of(session_id)
        try:
            old = self.get(session_id, now)
            session = self.successor(old, identity, now, data, tags)
            # One MULTI/EXEC: other processes never see both ids live or neither.
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._session_key(old_key))
                for tag in old.tags if old is not None else ():
                    pipe.srem(self._tag_key(tag), old_key)
                self._queue_put(pipe, session, now)
                pipe.execute()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None
        return session

    def delete(self, session_id: str) -> None:
        key = _key_of(session_id)
        try:
            raw = self._redis.get(self._session_key(key))
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._session_key(key))
                for tag in _tags_of(raw):
                    pipe.srem(self._tag_key(tag), key)
                pipe.execute()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None

    def delete_tagged(self, tag: str) -> int:
        index = self._tag_key(tag)
        try:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in self._redis.smembers(index)]
            if not keys:
                return 0
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*[self._session_key(k) for k in keys])
                # SREM what was read, not DEL: a session tagged since the SMEMBERS keeps its index entry.
                pipe.srem(index, *keys)
                results = pipe.execute()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None
        return int(results[0])

    def ping(self) -> None:
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None

    def _queue_put(self, pipe: Any, session: Session, now: float) -> None:
        key = _key_of(session.id)
        pipe.set(self._session_key(key), session.to_json(), px=self._ttl_ms(session, now))
        for tag in session.tags:
            index = self._tag_key(tag)
            pipe.sadd(index, key)
            # The index outlives every session it lists (each lives at most absolute_timeout from now).
            pipe.pexpire(index, math.ceil(self.absolute_timeout * 1000))


def _tags_of(raw: Any) -> list[str]:
    try:
        return [str(tag) for tag in json.loads(raw).get("tags", ())]
    except (TypeError, ValueError, AttributeError):
        return []


def _unavailable(exc: Exception) -> SessionStoreUnavailable:
    # Only the error class: redis messages may echo commands, hence keys.
    return SessionStoreUnavailable(f"session store unavailable ({type(exc).__name__})")


class CachedSessionStore:
    """A per-process cache in front of a shared store: a session read less than ``ttl`` seconds ago is served
    without asking the store again (one Redis round trip saved on almost every request of a busy page).

    What this process deletes or rotates takes effect here at once; what another instance (or ``gateway
    session revoke``) does takes effect here within ``ttl``. Expiry is still checked on every read.
    """

    def __init__(
        self, inner: MemorySessionStore | RedisSessionStore, ttl: float = 1.0, max_entries: int = 10_000
    ):
        if ttl <= 0:
            raise ValueError("ttl must be > 0 (use the inner store directly for no cache)")
        self._inner = inner
        self.idle_timeout = inner.idle_timeout
        self.absolute_timeout = inner.absolute_timeout
        self._ttl = float(ttl)
        self._max_entries = max_entries
        self._entries: dict[str, tuple[Session, float]] = {}
        self._lock = threading.Lock()

    def create(
        self,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] = (),
    ) -> Session:
        return self._inner.create(identity, now, data, tags)

    def get(self, session_id: str, now: float) -> Session | None:
        entry = self._entries.get(session_id)
        fresh = entry is not None and 0 <= now - entry[1] < self._ttl
        if fresh and entry is not None and not self._inner.expired(entry[0], now):
            return entry[0]
        session = self._inner.get(session_id, now)
        with self._lock:
            if session is None:
                self._entries.pop(session_id, None)
            else:
                if len(self._entries) >= self._max_entries:
                    self._entries.clear()  # rare; cheaper than LRU bookkeeping on every hit
                self._entries[session_id] = (session, now)
        return session

    def rotate(
        self,
        session_id: str,
        identity: Identity,
        now: float,
        data: Mapping[str, str] | None = None,
        tags: Iterable[str] | None = None,
    ) -> Session:
        self._forget(session_id)
        return self._inner.rotate(session_id, identity, now, data, tags)

    def delete(self, session_id: str) -> None:
        self._forget(session_id)
        self._inner.delete(session_id)

    def delete_tagged(self, tag: str) -> int:
        with self._lock:
            for key in [k for k, (s, _) in self._entries.items() if tag in s.tags]:
                del self._entries[key]
        return self._inner.delete_tagged(tag)

    def ping(self) -> None:
        self._inner.ping()

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)
