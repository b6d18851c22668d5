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
from gateway.policy.origin import is_cross_site, is_embedded_by_another_site
from gateway.runtime import LOGIN_COOKIE_NAME, Gateway, audit_event, client_ip, gateway_of, refuse, see_other
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


def admit_login_attempt(gateway: Gateway) -> None:
    """Count one login attempt of the client address; raise LoginRefused when over its rate or banned.

    Nothing the client merely CLAIMS (a certificate anyone may hold, an idNat) is counted or checked here:
    see :func:`admit_proven_identity`."""
    _admit(gateway, client_ip(gateway), None)


def admit_proven_identity(gateway: Gateway, identity: str) -> None:
    """Count one login attempt of an identity the client PROVED it holds (a card whose key signed and whose
    chain is trusted); raise LoginRefused when that identity is banned or over its rate."""
    _admit(gateway, None, identity)


def _admit(gateway: Gateway, ip: str | None, identity: str | None) -> None:
    try:
        verdict = gateway.login_throttle.check(ip, identity, time.time())
    except LimitsUnavailable:
        raise LoginRefused(Reason.LIMITS_UNAVAILABLE) from None
    if not verdict.allowed:
        assert verdict.reason is not None
        audit_event(
            gateway, "login", decision="deny", reasons=[verdict.reason.value], proven_identity=identity
        )
        raise LoginRefused(verdict.reason, verdict.retry_after)


def login_failed(gateway: Gateway, proven_identity: str | None, reason: Reason, **fields: Any) -> None:
    """Audit a failed login and count it towards a ban (audited when one starts): against the client
    address, and against ``proven_identity`` only when the client proved it (else None)."""
    ip = client_ip(gateway)
    audit_event(
        gateway, "login", decision="deny", reasons=[reason.value], proven_identity=proven_identity, **fields
    )
    try:
        ban = gateway.login_throttle.record_failure(ip, proven_identity, time.time())
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


def login_succeeded(gateway: Gateway, proven_identity: str | None) -> None:
    with contextlib.suppress(LimitsUnavailable):
        gateway.login_throttle.record_success(client_ip(gateway), proven_identity, time.time())


#: Login steps reached by navigating (a link, a redirect), never by another page's <img> or fetch.
_NAVIGATION_STEPS = frozenset(
    {
        "gateway_card.start",
        "gateway_card.tls_login",
        "gateway_card.complete",
        "gateway_ecps.login",
        "gateway_ecps.callback",
    }
)
#: JSON APIs of native clients (``gateway card login``): never posted by a page of another site.
_JSON_STEPS = frozenset({"gateway_card.challenge", "gateway_card.verify"})


def refuse_cross_site_logins() -> Response | None:
    """Before any login endpoint counts anything (flask-limiter included): refuse, uncounted, the requests a
    page of another site can make a browser send, so that such a page cannot spend the login budget or ban
    the address of a whole hospital NAT (a Flask before_request hook, registered before the limiter's)."""
    endpoint = request.endpoint or ""
    if endpoint in _JSON_STEPS:
        cross_site = is_cross_site(
            request.method,
            request.headers.get("Origin"),
            request.headers.get("Sec-Fetch-Site"),
            gateway_of().settings.server.trusted_origins,
        )
        if cross_site or not request.is_json:
            # A cross-site form can send text/plain or a form encoding, never application/json.
            detail = "not application/json" if not cross_site else "sent by another site"
            return _refuse_uncounted(Reason.CROSS_SITE_REQUEST, detail, as_json=True)
    elif endpoint in _NAVIGATION_STEPS:
        headers = request.headers
        if is_embedded_by_another_site(
            headers.get("Sec-Fetch-Site"),
            headers.get("Sec-Fetch-Mode"),
            headers.get("Sec-Fetch-Dest"),
            headers.get("Sec-Purpose") or headers.get("Purpose"),
        ):
            detail = "a login step loaded by another site's page (not a top-level navigation) or prefetched"
            return _refuse_uncounted(Reason.CROSS_SITE_REQUEST, detail)
        if endpoint == "gateway_ecps.callback" and LOGIN_COOKIE_NAME not in request.cookies:
            # PSC's answer for a login this browser never started (or whose cookie expired): nothing to check.
            return _refuse_uncounted(Reason.STATE_MISMATCH, "callback without the login cookie")
    return None


def _refuse_uncounted(reason: Reason, detail: str, *, as_json: bool = False) -> Response:
    audit_event(
        gateway_of(),
        "login",
        decision="deny",
        reasons=[reason.value],
        endpoint=request.endpoint,
        detail=detail,
    )
    return refuse(reason, next_path="/", as_json=as_json)
