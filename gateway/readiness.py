"""Readiness: named checks that must all pass before a load balancer sends traffic to this instance.

The registry lives on the Gateway object; login methods register their own checks at start-up (CRL
freshness, IdP state...). A check returns None when ready and raises :class:`NotReady` (or anything
else) when not. A check registered with ``required=False`` is only reported: the instance stays ready
without it (Pro Santé Connect down must not take away card logins and public pages). No Flask here:
``endpoints/operations.py`` turns the results into HTTP.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

ReadinessCheck = Callable[[], None]


class NotReady(Exception):
    """A readiness check failed; the message is shown to operators (never secrets)."""

    code = "not_ready"


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str = ""
    #: False: reported only, the instance is ready whatever the outcome.
    required: bool = True

    def as_json(self) -> dict[str, object]:
        result: dict[str, object] = {"ok": self.ok}
        if self.detail:
            result["detail"] = self.detail
        if not self.required:
            result["required"] = False
        return result

    @property
    def blocks_readiness(self) -> bool:
        return self.required and not self.ok


class ReadinessRegistry:
    """Named checks, run in registration order. Registration happens at start-up only."""

    def __init__(self) -> None:
        self._checks: dict[str, tuple[ReadinessCheck, bool]] = {}

    def register(self, name: str, check: ReadinessCheck, *, required: bool = True) -> None:
        if name in self._checks:
            raise ValueError(f"readiness check {name!r} is already registered")
        self._checks[name] = (check, required)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._checks)

    def run(self) -> dict[str, CheckResult]:
        results: dict[str, CheckResult] = {}
        for name, (check, required) in self._checks.items():
            try:
                check()
            except NotReady as exc:
                results[name] = CheckResult(False, str(exc), required)
            except Exception as exc:  # a broken check must say "not ready", never crash the probe
                results[name] = CheckResult(False, type(exc).__name__, required)
            else:
                results[name] = CheckResult(True, required=required)
        return results


class UpstreamProbe:
    """Can a TCP connection to the portal be opened? Cached for ``ttl`` seconds: probes arrive from every
    load balancer every few seconds and must not turn into load on the portal."""

    def __init__(self, url: str, *, timeout: float = 1.0, ttl: float = 1.0) -> None:
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        self._address = (parts.hostname or "127.0.0.1", parts.port or default_port)
        self._timeout = timeout
        self._ttl = ttl
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._error: str | None = None

    def __call__(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self._ttl:
                self._error = self._connect_error()
                self._checked_at = time.monotonic()
            error = self._error
        if error is not None:
            raise NotReady(error)

    def _connect_error(self) -> str | None:
        try:
            with socket.create_connection(self._address, timeout=self._timeout):
                return None
        except OSError as exc:
            return f"portal unreachable: {type(exc).__name__}"
