"""The one place Redis clients are made: sessions, login limits and bans, quotas, card and e-CPS nonces, and
flask-limiter all get theirs here, from the URL in the settings.

URLs:

- ``redis://[[user]:password@]host:port[/db]``, ``rediss://…`` (TLS), ``unix:///path/redis.sock?db=0``:
  one Redis server, as redis-py reads them;
- ``redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db]``: the master of ``service`` as
  the listed Redis Sentinels name it, spelled as the ``limits`` library spells it (plus an optional ``/db``).
  The password (and user) go to the Redis servers and to the sentinels, as ``limits`` does. Every new
  connection asks a sentinel where the master is, so after a failover the next request reaches the promoted
  replica: nothing to restart.

Redis Cluster (``redis+cluster://``) is refused: sessions are written in MULTI/EXEC transactions spanning
keys of different hash slots (the session and its tag indexes) and the quota script reads and writes three
keys; Cluster refuses both (CROSSSLOT). Use Sentinel for high availability.

Each process keeps one client (one connection pool) per URL and timeout, shared by every consumer. Short
socket timeouts and a single immediate retry: a pooled connection that died with its server is replaced at
once, and a Redis that is really down becomes a quick 503, not hung workers.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # imported when a client is made: the settings validate URLs without loading them
    import limits.storage
    import redis

#: Seconds to connect to and to wait for Redis (and each sentinel).
DEFAULT_TIMEOUT = 0.5
MEMORY = "memory://"
SENTINEL_SCHEME = "redis+sentinel"
_SERVER_SCHEMES = ("redis", "rediss", "unix")
_clients: dict[tuple[str, float, int], redis.Redis] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Raises ValueError saying what is wrong (no secret in the message)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for location in hosts.split(","):
        host, _, port = location.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{SENTINEL_SCHEME}:// needs host:port[,host:port...] of the sentinels")
        sentinels.append((host.strip("[]"), int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{SENTINEL_SCHEME}://… needs the master's service name: /mymaster or /mymaster/0")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    return SentinelUrl(
        tuple(sentinels),
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        unquote(username) or None,
        unquote(password) or None,
    )


def check_store_url(url: str) -> str:
    """``url`` if it names a store the gateway can use (memory:// or a Redis URL), else ValueError: for the
    settings, so every such error is reported at start-up with its file, key and line."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if url.startswith(MEMORY):
        return url
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
        return url
    if scheme in ("redis+cluster", "valkey+cluster"):
        raise ValueError(
            "Redis Cluster is not supported (sessions and quotas use multi-key transactions that Cluster "
            f"refuses); use {SENTINEL_SCHEME}:// for high availability"
        )
    if scheme not in _SERVER_SCHEMES:
        raise ValueError(
            f"use memory://, redis://host:port/db, rediss://, unix:// or {SENTINEL_SCHEME}://host:port/service"
        )
    return url


def redis_client(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> redis.Redis:
    """The process's client for ``url`` (made on first use; one connection pool, thread-safe)."""
    key = (url, timeout, os.getpid())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _new_client(url, timeout)
        return client


def _connection_options(timeout: float) -> dict[str, Any]:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One immediate retry reconnects a pooled connection that died with a Redis restart (or failover);
        # redis-py's default (several, with backoff) would only delay the 503 when Redis is really down.
        "retry": Retry(NoBackoff(), 1),
    }


def _new_client(url: str, timeout: float) -> redis.Redis:
    import redis
    import redis.sentinel

    check_store_url(url)
    if url.startswith(MEMORY):
        raise ValueError("memory:// is no Redis: the caller keeps its state in the process")
    options = _connection_options(timeout)
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    auth = {"username": parsed.username, "password": parsed.password}
    sentinel = redis.sentinel.Sentinel(
        list(parsed.sentinels),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, **auth},
    )
    return sentinel.master_for(parsed.service, db=parsed.db, **auth, **options)


def limits_storage(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> limits.storage.Storage:
    """A ``limits`` storage on the process's client for ``url`` (memory:// stays in the process). Storage
    errors are wrapped in ``limits.errors.StorageError``."""
    import limits.storage

    if url.startswith(MEMORY):
        return limits.storage.MemoryStorage(url, wrap_exceptions=True)
    pool = redis_client(url, timeout=timeout).connection_pool
    # "redis://" only picks limits' Redis storage class; the connection pool says where Redis is.
    return limits.storage.RedisStorage("redis://", connection_pool=pool, wrap_exceptions=True)


def limiter_storage(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> tuple[str, dict[str, Any]]:
    """flask-limiter's ``storage_uri`` and ``storage_options`` for ``url``, on the process's client."""
    if url.startswith(MEMORY):
        return url, {}
    return "redis://", {"connection_pool": redis_client(url, timeout=timeout).connection_pool}
