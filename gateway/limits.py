"""Login throttling with failure bans, per-identity quotas ("bulk-access guard"), and flask-limiter wiring.

Everything is shared across gateway processes when the storage URI is ``redis://...`` and per process with
``memory://``. Decisions depend only on the clock the caller passes (``now``), so tests pin it; storage expiry
only collects what has left every window. A storage error raises :class:`LimitsUnavailable`: the caller
fails closed (503), never lets a login or a request through unchecked.

Quotas (:class:`QuotaGuard`) use sliding windows: no interval of the window's length ever holds more than the
limits. The login throttle counts attempts and failures in fixed windows whose bucket number comes from
``now`` (``floor(now / window)`` is part of the key): refused attempts still count (one atomic increment, no
read-then-write race between processes), which cannot prolong a refusal past the current window.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import flask
import limits
import limits.errors
import limits.storage
import redis
from flask_limiter import Limiter

from gateway.policy.decision import Reason
from gateway.redis_client import DEFAULT_TIMEOUT, MEMORY, limiter_storage, limits_storage, redis_client

#: What the limits storage raises when it cannot answer (flask-limiter lets them through: fail closed).
STORAGE_ERRORS: tuple[type[Exception], ...] = (limits.errors.StorageError, redis.RedisError)


class LimitsUnavailable(Exception):
    """The limits storage cannot be used: refuse with 503 (fail closed)."""

    code = "limits_unavailable"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    #: Reason.RATE_LIMITED or Reason.BANNED when refused.
    reason: Reason | None = None
    #: Whole seconds until trying again can succeed (for Retry-After); 0 when allowed.
    retry_after: int = 0


ALLOWED = Verdict(True)


@dataclass(frozen=True, slots=True)
class BanEvent:
    """A ban that has just started (to audit). Either or both subjects may be banned by one failure."""

    banned_ip: str | None
    banned_identity: str | None
    until: float
    failures: int


def _retry_after(now: float, window: float) -> int:
    """Seconds to the end of the current fixed window."""
    return max(1, math.ceil((math.floor(now / window) + 1) * window - now))


class LoginThrottle:
    """Attempt limits per client IP and per claimed identity (card serial or idNat), and failure bans
    (like Authelia's regulation): ``ban_after`` failures within a ``ban_window`` ban the IP and the identity
    for ``ban_duration`` seconds.

    Failures are counted per fixed ban window (so up to 2 * (ban_after - 1) failures can straddle a
    window boundary unbanned: the usual fixed-window trade for one atomic increment). The one failure that
    makes the count exactly ``ban_after`` (an atomic increment gives that value to one caller only, in any
    process) writes the ban, so a ban is recorded once and audited once.
    """

    def __init__(
        self,
        storage_uri: str,
        attempts_per_ip: str = "20/minute",
        attempts_per_identity: str = "10/minute",
        ban_after: int = 5,
        ban_window: float = 600,
        ban_duration: float = 900,
        key_prefix: str = "gw:login",
        socket_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if ban_after < 1 or ban_window <= 0 or ban_duration <= 0:
            raise ValueError("ban_after, ban_window and ban_duration must be positive")
        if ban_duration < ban_window:
            # A ban must outlast the window it was counted in; otherwise, once it ends, the rest of that
            # window's failures would never reach ban_after exactly again and could go on unbanned.
            raise ValueError("ban_duration must be >= ban_window")
        self._storage = limits_storage(storage_uri, timeout=socket_timeout)
        self._per_ip = limits.parse(attempts_per_ip)
        self._per_identity = limits.parse(attempts_per_identity)
        self.ban_after = ban_after
        self.ban_window = math.ceil(ban_window)
        self.ban_duration = float(ban_duration)
        self._prefix = key_prefix

    def check(self, ip: str | None, claimed_identity: str | None, now: float) -> Verdict:
        """Count one login attempt (per IP, per identity, or both) and say whether it may proceed. Call
        record_failure / record_success only for attempts that were allowed and then tried."""
        try:
            for subject, value in self._subjects(ip, claimed_identity):
                until = self._banned_until(subject, value, now)
                if until > now:
                    return Verdict(False, Reason.BANNED, max(1, math.ceil(until - now)))
            refusals = [
                self._hit(subject, value, self._per_ip if subject == "ip" else self._per_identity, now)
                for subject, value in self._subjects(ip, claimed_identity)
            ]
        except limits.errors.StorageError as exc:
            raise _unavailable(exc) from None
        worst = max((r for r in refusals if r), default=0)
        return Verdict(False, Reason.RATE_LIMITED, worst) if worst else ALLOWED

    def record_failure(self, ip: str, claimed_identity: str | None, now: float) -> BanEvent | None:
        bucket = math.floor(now / self.ban_window)
        until = now + self.ban_duration
        banned: dict[str, str] = {}
        failures = 0
        try:
            for subject, value in self._subjects(ip, claimed_identity):
                count = self._storage.incr(
                    f"{self._prefix}:fail:{subject}:{value}:{bucket}", expiry=2 * self.ban_window
                )
                failures = max(failures, count)
                if count == self.ban_after:
                    # Only this caller saw exactly ban_after: it alone writes this bucket's ban (from 0, so
                    # the stored value is exactly the end of the ban).
                    self._storage.incr(
                        self._ban_key(subject, value, bucket),
                        expiry=math.ceil(self.ban_duration) + 2 * self.ban_window,
                        amount=math.ceil(until),
                    )
                    banned[subject] = value
        except limits.errors.StorageError as exc:
            raise _unavailable(exc) from None
        if not banned:
            return None
        return BanEvent(banned.get("ip"), banned.get("id"), float(math.ceil(until)), failures)

    def record_success(self, ip: str, claimed_identity: str | None, now: float) -> None:
        """A successful login clears the identity's failure count (the person proved themselves), never the
        IP's (one valid account behind an IP must not reset guessing on others), and never a ban."""
        if not claimed_identity:
            return
        bucket = math.floor(now / self.ban_window)
        try:
            self._storage.clear(f"{self._prefix}:fail:id:{claimed_identity}:{bucket}")
        except limits.errors.StorageError as exc:
            raise _unavailable(exc) from None

    def ping(self) -> None:
        try:
            ok = self._storage.check()
        except limits.errors.StorageError as exc:
            raise _unavailable(exc) from None
        if not ok:
            raise LimitsUnavailable("limits storage unavailable")

    def _subjects(self, ip: str | None, claimed_identity: str | None) -> Iterable[tuple[str, str]]:
        if ip:
            yield ("ip", ip)
        if claimed_identity:
            yield ("id", claimed_identity)

    def _ban_key(self, subject: str, value: str, bucket: int) -> str:
        return f"{self._prefix}:ban:{subject}:{value}:{bucket}"

    def _banned_until(self, subject: str, value: str, now: float) -> float:
        # A ban written in bucket b lasts ban_duration from a time inside b: look back far enough.
        current = math.floor(now / self.ban_window)
        lookback = math.ceil(self.ban_duration / self.ban_window)
        return float(
            max(
                self._storage.get(self._ban_key(subject, value, b))
                for b in range(current - lookback, current + 1)
            )
        )

    def _hit(self, subject: str, value: str, limit: limits.RateLimitItem, now: float) -> int:
        """Count one attempt; return 0 if within the limit, else the seconds to wait."""
        window = limit.get_expiry()
        bucket = math.floor(now / window)
        count = self._storage.incr(
            f"{self._prefix}:try:{subject}:{value}:{window}:{bucket}", expiry=2 * window
        )
        return _retry_after(now, window) if count > limit.amount else 0


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    """What one identity may do on one rule within any interval of ``window_seconds``."""

    #: Requests allowed per window; None: unlimited.
    max_requests: int | None
    #: Distinct resources (e.g. patient records) allowed per window; None: unlimited.
    max_distinct: int | None
    window_seconds: int

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        for name in ("max_requests", "max_distinct"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    allowed: bool
    #: Reason.QUOTA_EXCEEDED when refused.
    reason: Reason | None
    retry_after: int
    #: Allowed requests and distinct resources in the window ending now, this request included (when
    #: refused: what it would have made); 0 for a limit the quota does not set (it is not tracked).
    requests: int
    distinct: int
    #: True for the request that first went over (to audit one quota_breach, not one per refusal).
    breach_started: bool = False


#: The marker a distinct-resource breach leaves: the whole rule is closed for a window from the breach.
_CLOSED = "distinct"
#: The marker a request-count breach leaves: only so that the breach is audited once per window.
_MARKED = "requests"

# One round trip decides and counts (issue 14: the decision path stays cheap).
# KEYS: allowed requests (sorted set, score = time), resources read (sorted set, score = last allowed read),
#       breach marker (string, expires a window after the breach).
# ARGV: now, "(" .. window start (exclusive bound of what has left the window), window in ms,
#       max_requests (-1: none), max_distinct (-1: none), resource, a unique member for this request,
#       now + window (until when a breach now marks the rule).
# Returns {allowed, requests, distinct, breach started, ms until trying again can succeed}.
# Only allowed requests are recorded: each sorted set holds at most max_requests / max_distinct members.
_QUOTA_SCRIPT = (
    """
local now, window_ms = tonumber(ARGV[1]), tonumber(ARGV[3])
local max_requests, max_distinct = tonumber(ARGV[4]), tonumber(ARGV[5])
local n, d, known, this = 0, 0, true, 0
if max_requests >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
  n = redis.call('ZCARD', KEYS[1])
  this = 1
end
if max_distinct >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
  d = redis.call('ZCARD', KEYS[2])
  known = redis.call('ZSCORE', KEYS[2], ARGV[6]) ~= false
end
local new = known and 0 or 1
-- The marker holds "<kind>|<until>" in the caller's clock; its Redis expiry only collects it.
local kind, marked_until = false, 0
local marker = redis.call('GET', KEYS[3])
if marker then
  local sep = string.find(marker, '|', 1, true)
  marked_until = tonumber(string.sub(marker, sep + 1))
  if marked_until > now then kind = string.sub(marker, 1, sep - 1) end
end
if kind == '"""
    + _CLOSED
    + """' then
  return {0, n + this, d + new, 0, math.ceil((marked_until - now) * 1000)}
end
if not known and d >= max_distinct then
  redis.call('SET', KEYS[3], '"""
    + _CLOSED
    + """|' .. ARGV[8], 'PX', 2 * window_ms)
  return {0, n + this, d + 1, 1, window_ms}
end
if max_requests >= 0 and n >= max_requests then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = window_ms
  if oldest[2] then wait = math.ceil((tonumber(oldest[2]) - now) * 1000 + window_ms) end
  local started = 0
  if not kind then
    redis.call('SET', KEYS[3], '"""
    + _MARKED
    + """|' .. ARGV[8], 'PX', 2 * window_ms)
    started = 1
  end
  return {0, n + this, d + new, started, wait}
end
if max_requests >= 0 then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[1], window_ms)
end
if max_distinct >= 0 then
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], window_ms)
end
return {1, n + this, d + new, 0, 0}
"""
)


class QuotaGuard:
    """Per-identity quotas on sensitive rules: requests and DISTINCT resources within a sliding window.

    Neither limit can be exceeded within ANY interval of the window's length (a fixed window would let
    ``max_distinct`` records through just before a boundary and as many again just after). Each identity and
    rule keeps the times of its allowed requests and, per resource, the time of its last allowed read; a
    request is allowed if the window ending now holds fewer than ``max_requests`` requests and the resource is
    among those read in it or fewer than ``max_distinct`` were. Only allowed requests are kept, so memory per
    identity is bounded by the limits and a refused client does not extend its own refusal.

    Once an identity goes over ``max_distinct``, every request on that rule is refused for a window from that
    moment, revisits included: pulling more records than allowed is what a bulk exfiltration looks like, and
    an alarm that a revisit clears would be too easy to game. Over ``max_requests``, requests are refused until
    the oldest one in the window leaves it.

    Decisions use the caller's ``now`` (tests pin it; gateway instances need synchronised clocks: NTP).
    """

    def __init__(
        self,
        storage_uri: str,
        key_prefix: str = "gw:quota",
        socket_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._prefix = key_prefix
        self._memory: _MemoryQuotas | None = None
        self._redis: redis.Redis | None = None
        self._ids = itertools.count()
        if storage_uri.startswith(MEMORY):
            self._memory = _MemoryQuotas()
        else:
            self._redis = redis_client(storage_uri, timeout=socket_timeout)
            self._script = self._redis.register_script(_QUOTA_SCRIPT)
            self._pool = self._redis.connection_pool

    def check_and_count(
        self,
        identity_key: str,
        rule_name: str,
        quota: QuotaSpec,
        resource_key: str | None,
        now: float,
        *,
        request_id: str | None = None,
    ) -> QuotaVerdict:
        """Decide on one request and count it when allowed. ``request_id`` names it (unique per request, e.g.
        nginx's $request_id): :meth:`count_served` counting the same request again then counts nothing."""
        window = quota.window_seconds
        base = self._base(identity_key, rule_name, window)
        max_requests = quota.max_requests if quota.max_requests is not None else -1
        max_distinct = quota.max_distinct if quota.max_distinct is not None and resource_key else -1
        # Times travel as Python's exact repr: Lua would print them with 14 digits only.
        member = request_id or f"{now!r}:{os.getpid()}:{next(self._ids)}"
        if self._memory is not None:
            allowed, requests, distinct, started, wait = self._memory.count(
                base, window, max_requests, max_distinct, resource_key or "", member, now
            )
        else:
            assert self._redis is not None
            try:
                result = self._evalsha(
                    f"{base}:log",
                    f"{base}:read",
                    f"{base}:breach",
                    repr(now),
                    f"({now - window!r}",
                    window * 1000,
                    max_requests,
                    max_distinct,
                    resource_key or "",
                    member,
                    repr(now + window),
                )
            except redis.RedisError as exc:
                raise _unavailable(exc) from None
            allowed_flag, requests, distinct, started_flag, wait_ms = (int(x) for x in result)
            allowed, started, wait = bool(allowed_flag), bool(started_flag), wait_ms / 1000
        if allowed:
            return QuotaVerdict(True, None, 0, requests, distinct)
        return QuotaVerdict(
            False, Reason.QUOTA_EXCEEDED, max(1, math.ceil(wait)), requests, distinct, started
        )

    def _evalsha(self, *keys_and_args: Any) -> Any:
        """The quota script on a pooled connection, its three keys first: what redis-py's Script call does
        (a reconnection if the connection died, the script loaded again if Redis forgot it) without its
        layers, a third of the decision's Redis cost. As the client's retry policy: one new attempt."""
        for attempt in (1, 2):
            connection = self._pool.get_connection()
            try:
                connection.send_command("EVALSHA", self._script.sha, 3, *keys_and_args)
                return connection.read_response()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                self._script.sha = self._script.registered_client.script_load(_QUOTA_SCRIPT)
            except (redis.ConnectionError, redis.TimeoutError):
                connection.disconnect()
                if attempt == 2:
                    raise
            finally:
                self._pool.release(connection)
        raise AssertionError("unreachable")

    def count_served(self, served: Iterable[tuple[ServedRequest, QuotaSpec]]) -> None:
        """Count requests that were served (forward-auth's access stream: nginx may serve a granted resource
        again from its decision cache, unasked): each is one of the window's requests, under its request id
        (a request its decision counted already counts once), and refreshes its resource's last read. Only
        the newest ``max_requests`` are kept: whether the window holds that many, and when the oldest of them
        leaves it, is all a decision needs. Idempotent: a batch counted twice counts once."""
        groups: dict[tuple[str, int], tuple[QuotaSpec, list[ServedRequest]]] = {}
        for request, quota in served:
            base = self._base(request.identity_key, request.rule_name, quota.window_seconds)
            groups.setdefault((base, quota.window_seconds), (quota, []))[1].append(request)
        if self._memory is not None:
            for (base, window), (quota, requests) in groups.items():
                self._memory.count_served(base, window, quota, requests)
            return
        assert self._redis is not None
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for (base, _window), (quota, requests) in groups.items():
                    _queue_served(pipe, base, quota, requests)
                pipe.execute()
        except redis.RedisError as exc:
            raise _unavailable(exc) from None

    def _base(self, identity_key: str, rule_name: str, window: int) -> str:
        return f"{self._prefix}:{rule_name}:{identity_key}:{window}"

    def ping(self) -> None:
        if self._redis is not None:
            try:
                self._redis.ping()
            except redis.RedisError as exc:
                raise _unavailable(exc) from None


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """A request on a quota rule that was let through, as forward-auth's access stream reports it."""

    identity_key: str
    rule_name: str
    #: Unique per request (nginx's $request_id): the request its decision counted is that same member.
    request_id: str
    #: When it was served.
    time: float
    resource_key: str | None


def _queue_served(pipe: Any, base: str, quota: QuotaSpec, requests: list[ServedRequest]) -> None:
    window_ms = quota.window_seconds * 1000
    if quota.max_requests is not None:
        times: dict[str, float] = {}
        for request in requests:
            times[request.request_id] = request.time
        pipe.zadd(f"{base}:log", times)
        pipe.zremrangebyrank(f"{base}:log", 0, -(quota.max_requests + 1))
        pipe.pexpire(f"{base}:log", window_ms)
    if quota.max_distinct is not None:
        reads: dict[str, float] = {}
        for request in requests:
            if request.resource_key:
                reads[request.resource_key] = max(request.time, reads.get(request.resource_key, request.time))
        if reads:
            pipe.zadd(f"{base}:read", reads, gt=True)  # a late line never moves a read back in time
            pipe.pexpire(f"{base}:read", window_ms)


@dataclass(slots=True)
class _Window:
    #: Allowed requests still in the window: request id -> time.
    requests: dict[str, float] = field(default_factory=dict)
    #: Resource -> time of its last allowed read.
    reads: dict[str, float] = field(default_factory=dict)
    #: The breach marker: _CLOSED or _MARKED, until ``marker_until``.
    marker: str = ""
    marker_until: float = -math.inf
    last_seen: float = -math.inf


class _MemoryQuotas:
    """The in-process twin of the Lua script (same decisions, same counts). Memory: one entry per identity and
    rule seen within a window, bounded by the limits; entries idle for a window are purged."""

    def __init__(self, purge_interval: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, _Window]] = {}
        self._purge_interval = purge_interval
        self._last_purge = -math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def count(
        self,
        base: str,
        window: int,
        max_requests: int,
        max_distinct: int,
        resource: str,
        member: str,
        now: float,
    ) -> tuple[bool, int, int, bool, float]:
        """(allowed, requests, distinct, breach started, seconds until trying again can succeed)"""
        with self._lock:
            if now - self._last_purge >= self._purge_interval:
                self._purge(now)
            entry = self._entries.setdefault(base, (window, _Window()))[1]
            entry.last_seen = now
            since = now - window
            entry.requests = {key: seen for key, seen in entry.requests.items() if seen >= since}
            entry.reads = {key: seen for key, seen in entry.reads.items() if seen >= since}
            n = len(entry.requests) if max_requests >= 0 else 0
            this = 1 if max_requests >= 0 else 0
            d = len(entry.reads) if max_distinct >= 0 else 0
            known = max_distinct < 0 or resource in entry.reads
            new = 0 if known else 1
            marker = entry.marker if entry.marker_until > now else ""
            if marker == _CLOSED:
                return False, n + this, d + new, False, entry.marker_until - now
            if not known and d >= max_distinct:
                entry.marker, entry.marker_until = _CLOSED, now + window
                return False, n + this, d + 1, True, window
            if max_requests >= 0 and n >= max_requests:
                wait = min(entry.requests.values()) + window - now if entry.requests else window
                started = not marker
                if started:
                    entry.marker, entry.marker_until = _MARKED, now + window
                return False, n + this, d + new, started, wait
            if max_requests >= 0:
                entry.requests[member] = now
            if max_distinct >= 0:
                entry.reads[resource] = now
            return True, n + this, d + new, False, 0.0

    def count_served(self, base: str, window: int, quota: QuotaSpec, requests: list[ServedRequest]) -> None:
        """The twin of :func:`_queue_served`."""
        with self._lock:
            entry = self._entries.setdefault(base, (window, _Window()))[1]
            for request in requests:
                entry.last_seen = max(entry.last_seen, request.time)
                if quota.max_requests is not None:
                    entry.requests[request.request_id] = request.time
                if quota.max_distinct is not None and request.resource_key:
                    seen = entry.reads.get(request.resource_key, request.time)
                    entry.reads[request.resource_key] = max(seen, request.time)
            if quota.max_requests is not None and len(entry.requests) > quota.max_requests:
                by_time = sorted(entry.requests.items(), key=lambda item: item[1])
                entry.requests = dict(by_time[len(by_time) - quota.max_requests :])

    def _purge(self, now: float) -> None:
        self._last_purge = now
        stale = [
            key
            for key, (window, entry) in self._entries.items()
            if entry.last_seen < now - window and entry.marker_until <= now
        ]
        for key in stale:
            del self._entries[key]


def build_limiter(
    app: flask.Flask | None,
    storage_uri: str,
    client_ip: Callable[[], str],
    *,
    default_limits: list[str] | None = None,
    key_prefix: str = "gw:rl",
    socket_timeout: float = DEFAULT_TIMEOUT,
) -> Limiter:
    """flask-limiter for the login endpoints (the lead decorates them with ``limiter.limit("20/minute")``).

    ``client_ip`` is the gateway's own resolution (trusted hops only), never ``request.remote_addr`` blindly
    behind a proxy nor a raw X-Forwarded-For. Strategy: moving window. Login limits are small (tens per
    minute), so keeping one timestamp per hit is cheap, and unlike a fixed window it never lets twice the
    limit through around a window boundary, which is what a guessing client would exploit.
    ``swallow_errors=False``: a storage outage surfaces as an error (the app renders 503), never as
    "no limit".
    """
    uri, options = limiter_storage(storage_uri, timeout=socket_timeout)
    return Limiter(
        client_ip,
        app=app,
        default_limits=list(default_limits or []),
        storage_uri=uri,
        storage_options=options,
        strategy="moving-window",
        headers_enabled=True,
        swallow_errors=False,
        in_memory_fallback_enabled=False,
        key_prefix=key_prefix,
    )


def _unavailable(exc: Exception) -> LimitsUnavailable:
    # Only the class name: storage messages may echo keys (identities, IPs).
    return LimitsUnavailable(f"limits storage unavailable ({type(exc).__name__})")
