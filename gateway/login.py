"""Turning a verified login into a gateway session, and ending sessions — shared by every login method."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flask import Response, request

from gateway import metrics
from gateway.identity import Identity
from gateway.limits import LimitsUnavailable
from gateway.policy.decision import Reason
from gateway.runtime import Gateway, audit_event, client_ip, see_other
from gateway.sessions import Session


def open_session(
    gateway: Gateway,
    identity: Identity,
    next_path: str,
    *,
    data: Mapping[str, str] | None = None,
    tags: Iterable[str] = (),
    audit_fields: Mapping[str, Any] | None = None,
) -> tuple[Response, Session]:
    """Create the session (a NEW id: any previous one is discarded), set the cookie, go back to ``next_path``.
    ``tags`` index the session for :meth:`SessionStore.delete_tagged` (the ``idnat:`` tag is always added).

    Raises SessionStoreUnavailable for the caller to render (fail closed).
    """
    now = time.time()
    old_id = request.cookies.get(gateway.settings.sessions.cookie_name)
    if old_id:
        session = gateway.sessions.rotate(old_id, identity, now, data=dict(data or {}), tags=tags)
    else:
        session = gateway.sessions.create(identity, now, dict(data or {}), tags)
    response = see_other(next_path)
    set_session_cookie(gateway, response, session.id)
    audit_event(
        gateway,
        "login",
        identity=identity,
        now=now,
        decision="allow",
        reasons=["authenticated"],
        card_serial=identity.card_serial or None,
        acr=identity.acr or None,
        **dict(audit_fields or {}),
    )
    return response, session


def set_session_cookie(gateway: Gateway, response: Response, session_id: str) -> None:
    # __Host-: Secure, Path=/, no Domain — the cookie cannot be set or read by a sibling sub-domain.
    response.set_cookie(
        gateway.settings.sessions.cookie_name,
        session_id,
        secure=True,
        httponly=True,
        samesite="Lax",
        path="/",
        max_age=int(gateway.settings.sessions.absolute_timeout),
    )


def clear_session_cookie(gateway: Gateway, response: Response) -> None:
    response.delete_cookie(
        gateway.settings.sessions.cookie_name, secure=True, httponly=True, samesite="Lax", path="/"
    )


class LoginRefused(Exception):
    """A login attempt that must not even be tried: rate-limited, banned, or the limits store is down."""

    def __init__(self, reason: Reason, retry_after: int | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.retry_after = retry_after


def admit_login_attempt(gateway: Gateway, claimed_identity: str | None) -> None:
    """Count one login attempt (per client IP and per claimed identity); raise LoginRefused when over."""
    try:
        verdict = gateway.login_throttle.check(client_ip(gateway), claimed_identity, time.time())
    except LimitsUnavailable:
        raise LoginRefused(Reason.LIMITS_UNAVAILABLE) from None
    if not verdict.allowed:
        assert verdict.reason is not None
        audit_event(
            gateway,
            "login",
            decision="deny",
            reasons=[verdict.reason.value],
            claimed_identity=claimed_identity,
        )
        raise LoginRefused(verdict.reason, verdict.retry_after)


def login_failed(gateway: Gateway, claimed_identity: str | None, reason: Reason, **fields: Any) -> None:
    """Audit a failed login and count it towards a ban (audited when one starts)."""
    ip = client_ip(gateway)
    audit_event(
        gateway, "login", decision="deny", reasons=[reason.value], claimed_identity=claimed_identity, **fields
    )
    try:
        ban = gateway.login_throttle.record_failure(ip, claimed_identity, time.time())
    except LimitsUnavailable:
        return  # the next attempt is refused by admit_login_attempt: fail closed there
    if ban is not None:
        for scope, banned in (("ip", ban.banned_ip), ("identity", ban.banned_identity)):
            if banned:
                metrics.ban(scope)
        audit_event(
            gateway,
            "ban",
            decision="deny",
            reasons=[Reason.BANNED.value],
            banned_ip=ban.banned_ip,
            banned_identity=ban.banned_identity,
            until=ban.until,
            failures=ban.failures,
        )


def login_succeeded(gateway: Gateway, claimed_identity: str | None) -> None:
    with contextlib.suppress(LimitsUnavailable):
        gateway.login_throttle.record_success(client_ip(gateway), claimed_identity, time.time())
