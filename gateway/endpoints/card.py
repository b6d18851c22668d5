"""CPS card login endpoints: TLS client certificate (card-login host), hand-off to the main host, challenge.

Why a hand-off: the card certificate is requested only by a DEDICATED host (nginx with
``ssl_verify_client optional_no_ca``; the main host never asks, as per-path requests would need TLS
renegotiation). The session cookie is ``__Host-`` (no Domain attribute): a cookie set by the card host is
never sent to the main host. So the card host opens the session, stores a random, single-use token pointing
at it (30 s, bound to the client address) and redirects to ``<public_origin>/.gateway/card/complete``, which
spends the token, rotates the session id (the id never travels in a URL) and sets the cookie on the main host.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import redis
from flask import Blueprint, Response, request

from gateway import metrics
from gateway.authn.card.certificate import CardError, format_serial
from gateway.authn.card.challenge import NonceStore, verify_challenge_login
from gateway.authn.card.headers import client_certificate_from_headers
from gateway.authn.card.verify import load_certificate
from gateway.endpoints.pages import safe_next_path
from gateway.identity import Identity
from gateway.login import (
    LoginRefused,
    admit_login_attempt,
    login_failed,
    login_succeeded,
    open_session,
    set_session_cookie,
)
from gateway.policy.decision import Reason
from gateway.responses import SECURITY_HEADERS
from gateway.runtime import (
    CARD_LOGIN_PATH,
    GATEWAY_PREFIX,
    Gateway,
    audit_event,
    client_ip,
    gateway_of,
    peer,
    refuse,
    request_id,
    see_other,
)
from gateway.sessions import SessionStoreUnavailable

log = logging.getLogger("gateway.card")

COMPLETE_PATH = f"{GATEWAY_PREFIX}/card/complete"
#: Long enough for one redirect, short enough that a leaked hand-off URL is useless almost at once.
HANDOFF_TTL_SECONDS = 30


def blueprint() -> Blueprint:
    card = Blueprint("gateway_card", __name__)
    card.add_url_rule(CARD_LOGIN_PATH, "tls_login", tls_login, methods=["GET"])
    card.add_url_rule(COMPLETE_PATH, "complete", complete, methods=["GET"])
    card.add_url_rule(f"{GATEWAY_PREFIX}/card/challenge", "challenge", challenge, methods=["POST"])
    card.add_url_rule(f"{GATEWAY_PREFIX}/card/verify", "verify", verify, methods=["POST"])
    return card


# --------------------------------------------------------------------------- TLS client certificate


def tls_login() -> Response:
    """On the card-login host: the certificate nginx forwarded -> verified identity -> session -> hand-off."""
    gateway = gateway_of()
    next_path = safe_next_path(request.args.get("next"))
    forwarded = client_certificate_from_headers(
        dict(request.headers.items()), peer(), gateway.settings.server.tls_terminators
    )
    if forwarded.spoofed:
        _audit_spoofed(gateway)
    if forwarded.certificate is None:
        return _deny(gateway, Reason.CARD_MISSING, "tls", "no client certificate", next_path)
    assert gateway.card_verifier is not None and gateway.card_handoffs is not None
    facts = _card_facts(forwarded.certificate)
    try:
        admit_login_attempt(gateway, facts.get("card_serial"))
    except LoginRefused as refused:
        metrics.login_attempt("card", refused.reason.value)
        return refuse(refused.reason, retry_after=refused.retry_after, next_path=next_path)
    try:
        identity = gateway.card_verifier.verify(forwarded.certificate, datetime.now(UTC))
    except CardError as error:
        return _deny(gateway, error.reason, "tls", error.detail, next_path, facts)
    login_succeeded(gateway, facts.get("card_serial"))
    metrics.login_attempt("card", "success")
    try:
        _, session = open_session(gateway, identity, next_path, audit_fields=_login_facts(identity, "tls"))
        token = _issue_handoff(gateway.card_handoffs, session.id, client_ip(gateway))
    except SessionStoreUnavailable:
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path=next_path)
    origin = gateway.settings.server.public_origin
    target = f"{origin}{COMPLETE_PATH}?handoff={token}&next={quote(next_path, safe='/')}"
    return _no_store(see_other(target))


def complete() -> Response:
    """On the main host: spend the hand-off token, rotate the session id, set the ``__Host-`` cookie here."""
    gateway = gateway_of()
    next_path = safe_next_path(request.args.get("next"))
    if gateway.card_handoffs is None:
        return refuse(Reason.STATE_MISMATCH, next_path=next_path)
    now = time.time()
    try:
        session_id = _spend_handoff(
            gateway.card_handoffs, request.args.get("handoff", ""), client_ip(gateway), now
        )
        session = gateway.sessions.get(session_id, now) if session_id else None
        if session is None:
            audit_event(gateway, "card_handoff", decision="deny", reasons=[Reason.STATE_MISMATCH.value])
            return refuse(Reason.STATE_MISMATCH, next_path=next_path)
        fresh = gateway.sessions.rotate(session.id, session.identity, now)
    except SessionStoreUnavailable:
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path=next_path)
    response = see_other(next_path)
    set_session_cookie(gateway, response, fresh.id)
    audit_event(gateway, "card_handoff", identity=fresh.identity, decision="allow")
    return _no_store(response)


def _issue_handoff(store: NonceStore, session_id: str, address: str) -> str:
    token = secrets.token_urlsafe(32)
    record = json.dumps({"sid": session_id, "ip": address})
    if not store.add(token, record, HANDOFF_TTL_SECONDS, time.time()):
        raise SessionStoreUnavailable("the hand-off store refused a new token")
    return token


def _spend_handoff(store: NonceStore, token: str, address: str, now: float) -> str | None:
    """The session id the token stands for; None when unknown, used, expired or from another address."""
    if not 20 <= len(token) <= 128:
        return None
    record = store.take(token, now)  # single use: deleted whatever happens next
    if record is None:
        return None
    data = json.loads(record)
    # Bound to the address that logged in: a hand-off URL sent to someone else does not log them in.
    return str(data["sid"]) if data.get("ip") == address else None


# --------------------------------------------------------------------------- challenge-response


def challenge() -> Response:
    gateway = gateway_of()
    assert gateway.challenge_issuer is not None
    try:
        issued = gateway.challenge_issuer.issue(client_ip(gateway), time.time())
    except CardError as error:
        return _json_refusal(error.reason)
    except redis.RedisError as error:  # the nonce store is down: fail closed with a 503, not a 500
        log.warning("nonce store unavailable (request %s): %s", request_id(), type(error).__name__)
        return _json_refusal(Reason.SESSION_STORE_UNAVAILABLE)
    return _json(issued.to_json(), 200)


def verify() -> Response:
    gateway = gateway_of()
    assert gateway.challenge_issuer is not None and gateway.card_verifier is not None
    # get_json only parses application/json: a cross-site HTML form cannot post here without a CORS preflight.
    body = request.get_json(silent=True)
    certificate = body.get("certificate") if isinstance(body, dict) else None
    facts = _card_facts(certificate) if isinstance(certificate, str) else {}
    try:
        admit_login_attempt(gateway, facts.get("card_serial"))
    except LoginRefused as refused:
        metrics.login_attempt("card", refused.reason.value)
        return _json_refusal(refused.reason, retry_after=refused.retry_after)
    try:
        identity = verify_challenge_login(
            gateway.challenge_issuer, gateway.card_verifier, body, client_ip(gateway), datetime.now(UTC)
        )
    except CardError as error:
        _audit_denied(gateway, error.reason, "challenge", error.detail, facts)
        return _json_refusal(error.reason)
    except redis.RedisError as error:  # nonce store down: fail closed
        log.warning("nonce store unavailable (request %s): %s", request_id(), type(error).__name__)
        return _json_refusal(Reason.SESSION_STORE_UNAVAILABLE)
    login_succeeded(gateway, facts.get("card_serial"))
    metrics.login_attempt("card", "success")
    try:
        _, session = open_session(gateway, identity, "/", audit_fields=_login_facts(identity, "challenge"))
    except SessionStoreUnavailable:
        return _json_refusal(Reason.SESSION_STORE_UNAVAILABLE)
    response = _json({"subject": identity.idnat}, 200)
    set_session_cookie(gateway, response, session.id)
    return response


# --------------------------------------------------------------------------- refusals and audit


def _login_facts(identity: Identity, channel: str) -> dict[str, Any]:
    # Staff and organisation cards pass verification; the policies refuse them per route (allow_staff_cards).
    card_type = "staff_or_organisation" if identity.is_staff_or_organisation else "professional"
    facts: dict[str, Any] = {
        "channel": channel,
        "card_type": card_type,
        "card_kind": identity.card_kind.value if identity.card_kind else None,
        "card_issuer": identity.card_issuer,
    }
    if identity.is_staff_or_organisation:
        facts.update(structure_id=identity.structure_id, employee_id=identity.employee_id)
    return facts


def _card_facts(certificate: bytes | str) -> dict[str, str]:
    """Serial and issuer of a refused card, when the certificate can be read at all."""
    try:
        parsed = load_certificate(certificate)
        return {
            "card_serial": format_serial(parsed.serial_number),
            "card_issuer": parsed.issuer.rfc4514_string(),
        }
    except (CardError, ValueError):
        return {}


#: Refusals that are not the card holder's attempt (no card presented, our CRL is stale): never count to a ban.
_NOT_COUNTED = frozenset({Reason.CARD_MISSING, Reason.CRL_UNAVAILABLE, Reason.SESSION_STORE_UNAVAILABLE})


def _audit_denied(gateway: Gateway, reason: Reason, channel: str, detail: str, facts: dict[str, str]) -> None:
    metrics.login_attempt("card", reason.value)
    fields: dict[str, Any] = {
        "method": "card",
        "channel": channel,
        "detail": detail,
        "card_serial": facts.get("card_serial"),
        "card_issuer": facts.get("card_issuer"),
    }
    if reason not in _NOT_COUNTED:
        login_failed(gateway, facts.get("card_serial"), reason, **fields)
        return
    audit_event(gateway, "login", decision="deny", reasons=[reason.value], **fields)


def _audit_spoofed(gateway: Gateway) -> None:
    audit_event(
        gateway, "spoofed_header", reasons=[Reason.SPOOFED_HEADER.value], headers=["X-SSL-Client-Cert"]
    )


def _deny(
    gateway: Gateway,
    reason: Reason,
    channel: str,
    detail: str,
    next_path: str,
    facts: dict[str, str] | None = None,
) -> Response:
    _audit_denied(gateway, reason, channel, detail, facts or {})
    return refuse(reason, next_path=next_path)


def _json(payload: dict[str, Any], status: int) -> Response:
    return _no_store(Response(json.dumps(payload), status, content_type="application/json"))


def _json_refusal(reason: Reason, retry_after: int | None = None) -> Response:
    """The challenge endpoints speak JSON only, whatever the client's Accept header says."""
    return refuse(reason, retry_after=retry_after, next_path="/", as_json=True)


def _no_store(response: Response) -> Response:
    for name, value in SECURITY_HEADERS:
        response.headers.setdefault(name, value)
    return response
