"""Turning a verified login into a gateway session, and ending sessions — shared by every login method."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flask import Response, redirect, request

from gateway.identity import Identity
from gateway.runtime import Gateway, client_ip, request_id
from gateway.sessions import Session


def open_session(
    gateway: Gateway,
    identity: Identity,
    next_path: str,
    *,
    data: Mapping[str, str] | None = None,
    audit_fields: Mapping[str, Any] | None = None,
) -> tuple[Response, Session]:
    """Create the session (a NEW id: any previous one is discarded), set the cookie, go back to ``next_path``.

    Raises SessionStoreUnavailable for the caller to render (fail closed).
    """
    now = time.time()
    old_id = request.cookies.get(gateway.settings.sessions.cookie_name)
    if old_id:
        session = gateway.sessions.rotate(old_id, identity, now, data=dict(data or {}))
    else:
        session = gateway.sessions.create(identity, now, dict(data or {}))
    response = redirect(next_path, code=303)
    set_session_cookie(gateway, response, session.id)
    gateway.audit.record(
        "login",
        now=now,
        request_id=request_id(),
        client_ip=client_ip(gateway),
        idnat=identity.idnat,
        method=identity.method.value,
        auth_mode=identity.auth_mode,
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
