"""Logout for every login method: a confirmation page (GET) and the logout itself (POST, CSRF-protected).

Logout is a state-changing POST with the session's synchroniser token: a cross-site page must not be able
to log a professional out (nor, with PSC's RP-initiated logout, out of Pro Santé Connect).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import replace
from urllib.parse import urlsplit

from flask import Blueprint, Response, request

from gateway.access import current_session
from gateway.i18n import language_of
from gateway.identity import LoginMethod
from gateway.login import clear_session_cookie
from gateway.policy.decision import Reason
from gateway.responses import SECURITY_HEADERS, render_page
from gateway.runtime import (
    LOGOUT_PATH,
    Gateway,
    audit_event,
    gateway_of,
    refuse,
    see_other,
    way_forward,
)
from gateway.sessions import Session, SessionStoreUnavailable

#: Where a logout ends (PSC's post_logout_redirect_uri should name it too): it says the session is closed.
LOGGED_OUT_PATH = LOGOUT_PATH + "/done"


def blueprint() -> Blueprint:
    logout = Blueprint("gateway_logout", __name__)
    logout.add_url_rule(LOGOUT_PATH, "confirm", confirm_logout, methods=["GET"])
    logout.add_url_rule(LOGOUT_PATH, "logout", log_out, methods=["POST"])
    logout.add_url_rule(LOGGED_OUT_PATH, "done", logged_out, methods=["GET"])
    return logout


def confirm_logout() -> Response:
    return _logout_page(done=False)


def logged_out() -> Response:
    return _logout_page(done=True)


def _logout_page(*, done: bool) -> Response:
    """The question (with the form) while a session is live; otherwise that there is none, or, at the end of
    a logout, that it is closed. A live session always gets the question: the page never claims a logout
    that did not happen."""
    gateway = gateway_of()
    try:
        session = current_session(gateway, time.time())
    except SessionStoreUnavailable:
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path="/")
    language = language_of(request, gateway.settings.server.language)
    body = render_page(
        "logout.html",
        language,
        action=LOGOUT_PATH,
        csrf_token=session.csrf_token if session else None,
        done=done,
        way_forward=replace(way_forward(gateway), logout=None),
    )
    response = Response(body, 200, content_type="text/html; charset=utf-8")
    response.headers.extend(SECURITY_HEADERS)
    if session is not None:
        response.headers["Content-Security-Policy"] = _page_policy(_end_session_origin(gateway, session))
    return response


def _page_policy(extra_form_target: str | None) -> str:
    """The pages' policy, plus PSC's logout origin: CSP form-action also governs the redirects that follow
    the POST, and the e-CPS logout ends at PSC (an http:// stand-in in development would be blocked)."""
    form_targets = " ".join(filter(None, ("'self' https:", extra_form_target)))
    return f"default-src 'none'; style-src 'self'; form-action {form_targets}; frame-ancestors 'none'"


def _end_session_origin(gateway: Gateway, session: Session) -> str | None:
    url = _end_session_url(gateway, session)
    if url is None:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def log_out() -> Response:
    gateway = gateway_of()
    try:
        session = current_session(gateway, time.time())
    except SessionStoreUnavailable:
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path="/")
    if session is None:
        # Nothing to end (expired, or already logged out): just make sure the browser forgets the cookie.
        response = see_other(LOGGED_OUT_PATH)
        clear_session_cookie(gateway, response)
        return response
    if not hmac.compare_digest(request.form.get("csrf_token", ""), session.csrf_token):
        _audit(gateway, session, "deny", Reason.CSRF_FAILED.value)
        return refuse(Reason.CSRF_FAILED, next_path="/")
    try:
        gateway.sessions.delete(session.id)
    except SessionStoreUnavailable:
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path="/")
    _audit(gateway, session, "allow", "logout")
    response = see_other(_after_logout_url(gateway, session))
    clear_session_cookie(gateway, response)
    response.headers["Cache-Control"] = "no-store"
    return response


def _after_logout_url(gateway: Gateway, session: Session) -> str:
    """e-CPS sessions also end the PSC session (RP-initiated logout) when PSC can be reached."""
    return _end_session_url(gateway, session) or LOGGED_OUT_PATH


def _end_session_url(gateway: Gateway, session: Session) -> str | None:
    id_token = session.data.get("id_token")
    if session.identity.method is LoginMethod.ECPS and gateway.ecps is not None and id_token:
        return gateway.ecps.end_session_url(id_token)
    return None


def _audit(gateway: Gateway, session: Session, decision: str, reason: str) -> None:
    identity = session.identity
    audit_event(
        gateway,
        "logout",
        identity=identity,
        decision=decision,
        reasons=[reason],
    )
