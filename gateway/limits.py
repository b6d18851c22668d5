"""Login throttling with failure bans, per-identity quotas ("bulk-access guard"), and flask-limiter wiring.

Everything is shared across gateway processes when the storage URI is ``redis://...`` and per process with
``memory://``. Counting uses fixed windows whose bucket number comes from the caller's ``now``
(``floor(now / window)`` is part of the key): decisions depend only on the clock passed in, so tests pin it;
storage expiry only collects old buckets. A storage error raises :class:`LimitsUnavailable`: the caller
fails closed (503), never lets a login or a request through unchecked.

Refused requests still count (one atomic increment, no read-then-write race between processes). With fixed
windows this cannot prolong a refusal past the current window, so a client hammering while refused only
stays refused until the window ends.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import flask
import limits
import limits.errors
import limits.storage
import redis
from flask_limiter import Limiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.policy.decision import Reason

#: Short socket timeouts: a stuck Redis becomes a quick 503, not hung workers.
DEFAULT_STORAGE_TIMEOUT = 0.5


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


def _storage(storage_uri: str, socket_timeout: float) -> limits.storage.Storage:
    options: dict[str, Any] = {}
    if not storage_uri.startswith("memory://"):
        options = _redis_options(socket_timeout)
    try:
        storage = limits.storage.storage_from_string(storage_uri, wrap_exceptions=True, **options)
    except limits.errors.ConfigurationError as exc:
        raise ValueError(f"unusable limits storage URI scheme: {storage_uri.split(':', 1)[0]}") from exc
    if not isinstance(storage, limits.storage.Storage):
        raise ValueError("the login throttle needs a synchronous storage (not async+...)")
    return storage


def _redis_options(socket_timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        # One immediate retry reconnects a pooled connection that died with a Redis restart; redis-py's
        # default (several, with backoff) would only delay the 503 when Redis is really down.
        "retry": Retry(NoBackoff(), 1),
    }


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
        socket_timeout: float = DEFAULT_STORAGE_TIMEOUT,
    ) -> None:
        if ban_after < 1 or ban_window <= 0 or ban_duration <= 0:
            raise ValueError("ban_after, ban_window and ban_duration must be positive")
        if ban_duration < ban_window:
            # A ban must outlast the window it was counted in; otherwise, once it ends, the rest of that
            # window's failures would never reach ban_after exactly again and could go on unbanned.
            raise ValueError("ban_duration must be >= ban_window")
        self._storage = _storage(storage_uri, socket_timeout)
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
    """What one identity may do on one rule within a fixed window."""

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
    #: Counts in the current window, this request included (distinct: capped at max_distinct + 1).
    requests: int
    distinct: int
    #: True for the request that first went over (to audit one quota_breach, not one per refusal).
    breach_started: bool = False


# KEYS: request counter, distinct set. ARGV: ttl, max_distinct (-1: not counted), resource.
# The set stops growing at max_distinct + 1 members: the extra one marks the breach, memory stays bounded.
_QUOTA_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local max_distinct = tonumber(ARGV[2])
local d = 0
local added = 0
if max_distinct >= 0 then
  d = redis.call('SCARD', KEYS[2])
  if d <= max_distinct and redis.call('SADD', KEYS[2], ARGV[3]) == 1 then
    d = d + 1
    added = 1
    if d == 1 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
  end
end
return {n, d, added}
"""


class QuotaGuard:
    """Per-identity quotas on sensitive rules: requests and DISTINCT resources per fixed window, counted
    exactly (a Redis set per identity, rule and window; a dict of sets in memory).

    Once an identity goes over ``max_distinct`` in a window, every request on that rule is refused until the
    window ends, revisits included: pulling more records than allowed is what a bulk exfiltration looks like,
    and an alarm that a revisit clears would be too easy to game.
    """

    def __init__(
        self,
        storage_uri: str,
        key_prefix: str = "gw:quota",
        socket_timeout: float = DEFAULT_STORAGE_TIMEOUT,
    ) -> None:
        self._prefix = key_prefix
        self._memory: _MemoryQuotas | None = None
        self._redis: redis.Redis | None = None
        if storage_uri.startswith("memory://"):
            self._memory = _MemoryQuotas()
        elif storage_uri.startswith(("redis://", "rediss://", "unix://")):
            self._redis = redis.Redis.from_url(storage_uri, **_redis_options(socket_timeout))
            self._script = self._redis.register_script(_QUOTA_SCRIPT)
        else:
            raise ValueError(f"unusable quota storage URI scheme: {storage_uri.split(':', 1)[0]}")

    def check_and_count(
        self, identity_key: str, rule_name: str, quota: QuotaSpec, resource_key: str | None, now: float
    ) -> QuotaVerdict:
        bucket = math.floor(now / quota.window_seconds)
        base = f"{self._prefix}:{rule_name}:{identity_key}:{quota.window_seconds}:{bucket}"
        max_distinct = quota.max_distinct if quota.max_distinct is not None and resource_key else -1
        if self._memory is not None:
            requests, distinct, added = self._memory.count(
                base, bucket, max_distinct, resource_key or "", now
            )
        else:
            assert self._redis is not None
            try:
                result = self._script(
                    keys=[f"{base}:n", f"{base}:d"],
                    args=[2 * quota.window_seconds, max_distinct, resource_key or ""],
                )
            except redis.RedisError as exc:
                raise _unavailable(exc) from None
            requests, distinct, added = (int(x) for x in result)
        over_requests = quota.max_requests is not None and requests > quota.max_requests
        over_distinct = max_distinct >= 0 and distinct > max_distinct
        if not (over_requests or over_distinct):
            return QuotaVerdict(True, None, 0, requests, distinct)
        breach_started = (over_requests and requests == (quota.max_requests or 0) + 1) or (
            over_distinct and bool(added)
        )
        return QuotaVerdict(
            False,
            Reason.QUOTA_EXCEEDED,
            _retry_after(now, quota.window_seconds),
            requests,
            distinct,
            breach_started,
        )

    def ping(self) -> None:
        if self._redis is not None:
            try:
                self._redis.ping()
            except redis.RedisError as exc:
                raise _unavailable(exc) from None


class _MemoryQuotas:
    """The in-process twin of the Lua script. Memory: one entry per (identity, rule) live in the current
    window, each set capped at max_distinct + 1; entries of past windows are purged."""

    def __init__(self, purge_interval: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, list[int], set[str]]] = {}
        self._purge_interval = purge_interval
        self._last_purge = -math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def count(
        self, base: str, bucket: int, max_distinct: int, resource: str, now: float
    ) -> tuple[int, int, int]:
        # The bucket is part of ``base``; keep it separately to purge by age.
        with self._lock:
            if now - self._last_purge >= self._purge_interval:
                self._purge(now)
            _, counter, members = self._entries.setdefault(base, (bucket, [0], set()))
            counter[0] += 1
            added = 0
            if max_distinct >= 0 and len(members) <= max_distinct and resource not in members:
                members.add(resource)
                added = 1
            return counter[0], len(members) if max_distinct >= 0 else 0, added

    def _purge(self, now: float) -> None:
        self._last_purge = now
        # Keys end with ":<window>:<bucket>"; a bucket is stale once its window has ended.
        stale = [key for key in self._entries if _bucket_end(key) <= now]
        for key in stale:
            del self._entries[key]


def _bucket_end(base: str) -> float:
    window, bucket = base.rsplit(":", 2)[1:]
    return (int(bucket) + 1) * int(window)


def build_limiter(
    app: flask.Flask | None,
    storage_uri: str,
    client_ip: Callable[[], str],
    *,
    default_limits: list[str] | None = None,
    key_prefix: str = "gw:rl",
    socket_timeout: float = DEFAULT_STORAGE_TIMEOUT,
) -> Limiter:
    """flask-limiter for the login endpoints (the lead decorates them with ``limiter.limit("20/minute")``).

    ``client_ip`` is the gateway's own resolution (trusted hops only), never ``request.remote_addr`` blindly
    behind a proxy nor a raw X-Forwarded-For. Strategy: moving window. Login limits are small (tens per
    minute), so keeping one timestamp per hit is cheap, and unlike a fixed window it never lets twice the
    limit through around a window boundary, which is what a guessing client would exploit.
    ``swallow_errors=False``: a storage outage surfaces as an error (the app renders 503), never as
    "no limit".
    """
    options: dict[str, Any] = {}
    if not storage_uri.startswith("memory://"):
        options = _redis_options(socket_timeout)
    return Limiter(
        client_ip,
        app=app,
        default_limits=list(default_limits or []),
        storage_uri=storage_uri,
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
