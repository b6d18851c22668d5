"""e-CPS login through Pro Santé Connect: start, callback, and PSC's back-channel logout.

The adapter (``gateway.authn.ecps``) does the protocol and every verification; these views only connect it to
the gateway: step-up from the target's rule, the gateway session, audit, and refusal pages. Tokens and
authorization codes are never logged nor audited (EcpsError.detail is safe by construction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, request, session
from werkzeug.wrappers import Response as WerkzeugResponse

from gateway import metrics
from gateway.authn.ecps import EcpsError, ProSanteConnect
from gateway.endpoints.pages import safe_next_path
from gateway.identity import LoginMethod
from gateway.login import LoginRefused, admit_login_attempt, login_failed, open_session
from gateway.policy.decision import Reason
from gateway.policy.model import Action
from gateway.runtime import (
    GATEWAY_PREFIX,
    Gateway,
    audit_event,
    destination_rule,
    gateway_of,
    refuse,
)
from gateway.sessions import SessionStoreUnavailable, psc_sid_tag, psc_sub_tag

CALLBACK_PATH = "/ecps/callback"
CALLBACK_ENDPOINT = "gateway_ecps.callback"
BACKCHANNEL_LOGOUT_PATH = "/ecps/backchannel-logout"
BACKCHANNEL_LOGOUT_ENDPOINT = "gateway_ecps.backchannel_logout"


def blueprint(backchannel_rate: Callable[[Callable[[], Response]], Any] | None = None) -> Blueprint:
    """``backchannel_rate``: the rate limit of the (unauthenticated) back-channel logout endpoint."""
    ecps = Blueprint("gateway_ecps", __name__, url_prefix=GATEWAY_PREFIX)
    ecps.add_url_rule("/login/ecps", "login", begin_login, methods=["GET"])
    ecps.add_url_rule(CALLBACK_PATH, "callback", complete_login, methods=["GET"])
    logout_view = backchannel_rate(backchannel_logout) if backchannel_rate else backchannel_logout
    ecps.add_url_rule(BACKCHANNEL_LOGOUT_PATH, "backchannel_logout", logout_view, methods=["POST"])
    return ecps


def _client(gateway: Gateway) -> ProSanteConnect:
    if gateway.ecps is None:  # the blueprint is only registered when ecps is configured
        raise RuntimeError("e-CPS endpoints without an ecps configuration")
    return gateway.ecps


def begin_login() -> WerkzeugResponse:
    gateway = gateway_of()
    next_path = safe_next_path(request.args.get("next"))
    try:
        admit_login_attempt(gateway)  # the identity is unknown until PSC answers: per IP only
    except LoginRefused as refused:
        metrics.login_attempt(LoginMethod.ECPS.value, refused.reason.value)
        return refuse(refused.reason, retry_after=refused.retry_after, next_path=next_path)
    try:
        return _client(gateway).begin_login(next_path, max_age=_step_up_max_age(gateway, next_path))
    except EcpsError as exc:
        _audit_refused_login(gateway, exc)
        return refuse(exc.reason, next_path=next_path)


def _step_up_max_age(gateway: Gateway, next_path: str) -> int | None:
    """The ``max_age`` of the rule guarding ``next_path``: PSC must then authenticate the user again."""
    rule = destination_rule(gateway, next_path)
    if rule is None or rule.action is not Action.AUTHENTICATE or rule.login.max_age is None:
        return None
    return max(1, math.ceil(rule.login.max_age))


def complete_login() -> Response:
    gateway = gateway_of()
    try:
        login = _client(gateway).complete_login()
    except EcpsError as exc:
        metrics.login_attempt(LoginMethod.ECPS.value, exc.reason.value)
        if exc.reason in _SUSPICIOUS:
            login_failed(gateway, None, exc.reason, method=LoginMethod.ECPS.value, detail=exc.detail)
        else:
            _audit_refused_login(gateway, exc)
        return refuse(exc.reason, next_path=exc.next_path or "/")
    metrics.login_attempt(LoginMethod.ECPS.value, "success")
    data = {"id_token": login.id_token, "sid": login.sid or ""}
    # Back-channel logout names the PSC session (sid) or the subject (sub): index the session by both.
    tags = [psc_sub_tag(login.sub)] + ([psc_sid_tag(login.sid)] if login.sid else [])
    try:
        response, _ = open_session(
            gateway, login.identity, safe_next_path(login.next_path), data=data, tags=tags
        )
    except SessionStoreUnavailable:
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path="/")
    # The login cookie's job is done: the state is consumed, the gateway session takes over.
    session.clear()
    return response


#: Failures that count towards a ban: answers to THIS browser's login (its state matched) that do not verify.
#: A state mismatch does not: another site can send any browser here with a forged state, and counting it
#: would let that site ban the address of a whole hospital NAT; the adapter ends the browser's pending
#: logins instead, so no guess is ever answered. Nor does a cancelled login or PSC being down.
_SUSPICIOUS = frozenset({Reason.TOKEN_INVALID, Reason.ACR_NOT_ACCEPTED})


def backchannel_logout() -> Response:
    """PSC says a PSC session ended: end the gateway sessions opened through it (OIDC Back-Channel Logout
    1.0, section 2.7): those of its ``sid`` when the token names one, else every e-CPS session of its
    ``sub``. Card sessions of the same professional are not PSC's to end."""
    gateway = gateway_of()
    token = request.form.get("logout_token", "")
    try:
        logout = _client(gateway).verify_logout_token(token)
    except EcpsError as exc:
        _audit_logout(gateway, None, "deny", exc.reason.value, detail=exc.detail)
        # 503 when the replay store is down: PSC may deliver again; 400 for a token that is not valid.
        status = 503 if exc.reason is Reason.SESSION_STORE_UNAVAILABLE else 400
        return _no_store(Response("", status))
    if logout.sid:
        tag, scope = psc_sid_tag(logout.sid), "sid"
    elif logout.sub:
        tag, scope = psc_sub_tag(logout.sub), "sub"
    else:  # verify_logout_token refuses such tokens; never end sessions on nothing
        return _no_store(Response("", 400))
    try:
        ended = gateway.sessions.delete_tagged(tag)
    except SessionStoreUnavailable:
        # 503: PSC may deliver again; the session must not outlive the PSC session silently.
        _audit_logout(gateway, logout.idnat, "deny", Reason.SESSION_STORE_UNAVAILABLE.value)
        return _no_store(Response("", 503))
    _audit_logout(gateway, logout.idnat, "allow", "backchannel_logout", sessions_ended=ended, scope=scope)
    return _no_store(Response("", 200))


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


def _audit_refused_login(gateway: Gateway, exc: EcpsError) -> None:
    audit_event(
        gateway,
        "login",
        method=LoginMethod.ECPS.value,
        decision="deny",
        reasons=[exc.reason.value],
        detail=exc.detail,
    )


def _audit_logout(gateway: Gateway, idnat: str | None, decision: str, reason: str, **fields: Any) -> None:
    audit_event(
        gateway,
        "logout",
        idnat=idnat,
        method=LoginMethod.ECPS.value,
        decision=decision,
        reasons=[reason],
        **fields,
    )
