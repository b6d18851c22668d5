"""CPS card login endpoints: TLS client certificate (card-login host), hand-off to the main host, challenge.

Why a hand-off: the card certificate is requested only by a DEDICATED host (nginx with
``ssl_verify_client optional_no_ca``; the main host never asks, as per-path requests would need TLS
renegotiation), and the session cookie is ``__Host-``: the card host cannot set it for the main host. The
main host binds the browser first (``/.gateway/card/start``), the card host verifies the card and stores a
single-use hand-off for that browser, the main host spends it and opens the session (authn/card/handoff.py).

Failed logins count against the client address always, and against the card (its serial and issuer) only
once the client has proved it holds the card's key (the TLS handshake on the card host, or the signed
challenge) AND the certificate chains to the trust anchors: anyone holding a card's public certificate, or
a forged one with its serial, must not be able to lock its owner out.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import redis
from cryptography import x509
from flask import Blueprint, Response, request

from gateway import metrics
from gateway.authn.card.certificate import CardError, format_serial
from gateway.authn.card.challenge import proven_certificate
from gateway.authn.card.handoff import (
    BINDING_COOKIE,
    BINDING_TTL_SECONDS,
    HandoffUnavailable,
    issue_handoff,
    new_binding,
    reference_of,
    spend_handoff,
    well_formed,
)
from gateway.authn.card.headers import client_certificate_from_headers
from gateway.authn.card.verify import load_certificate
from gateway.endpoints.pages import safe_next_path
from gateway.identity import Identity
from gateway.login import (
    LoginRefused,
    admit_login_attempt,
    admit_proven_identity,
    login_failed,
    login_succeeded,
    open_session,
    set_session_cookie,
)
from gateway.policy.decision import Reason
from gateway.responses import SECURITY_HEADERS
from gateway.runtime import (
    CARD_LOGIN_PATH,
    CARD_START_PATH,
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


def blueprint() -> Blueprint:
    card = Blueprint("gateway_card", __name__)
    card.add_url_rule(CARD_START_PATH, "start", start, methods=["GET"])
    card.add_url_rule(CARD_LOGIN_PATH, "tls_login", tls_login, methods=["GET"])
    card.add_url_rule(COMPLETE_PATH, "complete", complete, methods=["GET"])
    card.add_url_rule(f"{GATEWAY_PREFIX}/card/challenge", "challenge", challenge, methods=["POST"])
    card.add_url_rule(f"{GATEWAY_PREFIX}/card/verify", "verify", verify, methods=["POST"])
    return card


def card_key(certificate: x509.Certificate) -> str:
    """Whom a proven card's failures count against: its serial (as openssl prints it) at its issuer."""
    return f"{format_serial(certificate.serial_number)}@{certificate.issuer.rfc4514_string()}"


# --------------------------------------------------------------------------- TLS client certificate


def start() -> Response:
    """On the main host: bind this browser (a short-lived cookie), then go to the card host with a reference."""
    gateway = gateway_of()
    assert gateway.settings.card is not None
    next_path = safe_next_path(request.args.get("next"))
    binding = new_binding()
    target = (
        f"{gateway.settings.card.login_origin}{CARD_LOGIN_PATH}"
        f"?next={quote(next_path, safe='/')}&binding={reference_of(binding)}"
    )
    response = see_other(target)
    response.set_cookie(
        BINDING_COOKIE,
        binding,
        max_age=BINDING_TTL_SECONDS,
        secure=True,
        httponly=True,
        # Lax: the card host's redirect back is a top-level GET navigation, maybe from another site.
        samesite="Lax",
        path="/",
    )
    return _no_store(response)


def tls_login() -> Response:
    """On the card-login host: the certificate nginx forwarded -> verified identity -> hand-off."""
    gateway = gateway_of()
    next_path = safe_next_path(request.args.get("next"))
    forwarded = client_certificate_from_headers(request.headers, peer(), gateway.card_host)
    if forwarded.spoofed:
        _audit_spoofed(gateway, forwarded.spoofed)
    reference = request.args.get("binding")
    if not well_formed(reference):
        # Not started on the main host (a bookmark, an old link): start there, nothing is judged or counted.
        origin = gateway.settings.server.public_origin
        return _no_store(see_other(f"{origin}{CARD_START_PATH}?next={quote(next_path, safe='/')}"))
    assert reference is not None
    if forwarded.certificate is None:
        return _deny(gateway, Reason.CARD_MISSING, "tls", "no client certificate", next_path)
    assert gateway.card_verifier is not None and gateway.card_handoffs is not None
    try:
        admit_login_attempt(gateway)
    except LoginRefused as refused:
        metrics.login_attempt("card", refused.reason.value)
        return refuse(refused.reason, retry_after=refused.retry_after, next_path=next_path)
    try:
        certificate = load_certificate(forwarded.certificate)
    except CardError as error:
        return _deny(gateway, error.reason, "tls", error.detail, next_path)
    try:
        # The card host's TLS handshake proved the key: the certificate stands for its holder.
        identity = _verify_proven(gateway, certificate, "tls")
    except _Refused as refused:
        return refuse(refused.reason, retry_after=refused.retry_after, next_path=next_path)
    try:
        token = issue_handoff(gateway.card_handoffs, identity, reference, time.time())
    except (HandoffUnavailable, redis.RedisError) as error:
        log.warning("hand-off store unavailable (request %s): %s", request_id(), type(error).__name__)
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path=next_path)
    origin = gateway.settings.server.public_origin
    target = f"{origin}{COMPLETE_PATH}?handoff={token}&next={quote(next_path, safe='/')}"
    return _no_store(see_other(target))


def complete() -> Response:
    """On the main host: spend the hand-off of THIS browser, open the session, set the ``__Host-`` cookie."""
    gateway = gateway_of()
    next_path = safe_next_path(request.args.get("next"))
    if gateway.card_handoffs is None:
        return refuse(Reason.STATE_MISMATCH, next_path=next_path)
    binding = request.cookies.get(BINDING_COOKIE, "")
    try:
        identity = spend_handoff(gateway.card_handoffs, request.args.get("handoff", ""), binding, time.time())
    except redis.RedisError as error:
        log.warning("hand-off store unavailable (request %s): %s", request_id(), type(error).__name__)
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path=next_path)
    if identity is None:
        detail = "unknown, used or expired hand-off, or started in another browser"
        audit_event(
            gateway,
            "card_handoff",
            decision="deny",
            reasons=[Reason.STATE_MISMATCH.value],
            detail=detail if binding else "no binding cookie: the login was not started in this browser",
        )
        return refuse(Reason.STATE_MISMATCH, next_path=next_path)
    try:
        response, _ = open_session(
            gateway,
            identity,
            next_path,
            audit_fields=_login_facts(identity, "tls"),
            tags=_session_tags(gateway, identity),
        )
    except SessionStoreUnavailable:
        return refuse(Reason.SESSION_STORE_UNAVAILABLE, next_path=next_path)
    response.delete_cookie(BINDING_COOKIE, secure=True, httponly=True, samesite="Lax", path="/")
    return _no_store(response)


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
    # Only application/json reaches here (login.refuse_cross_site_logins): no cross-site form can post it.
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        # Nested deeper than the parser's recursion limit ("[" * 3000): malformed, refused before counting.
        audit_event(
            gateway,
            "bad_request",
            reasons=[Reason.BAD_REQUEST_BODY.value],
            endpoint=request.endpoint,
            detail="JSON nested too deeply",
        )
        return _json_refusal(Reason.BAD_REQUEST_BODY)
    try:
        admit_login_attempt(gateway)
    except LoginRefused as refused:
        metrics.login_attempt("card", refused.reason.value)
        return _json_refusal(refused.reason, retry_after=refused.retry_after)
    now = datetime.now(UTC)
    try:
        certificate = proven_certificate(gateway.challenge_issuer, body, client_ip(gateway), now)
    except CardError as error:
        # No proof the client holds the key: count against its address only, whatever certificate it sent.
        _audit_denied(gateway, error.reason, "challenge", error.detail, _claimed_card(body))
        return _json_refusal(error.reason)
    except redis.RedisError as error:  # nonce store down: fail closed
        log.warning("nonce store unavailable (request %s): %s", request_id(), type(error).__name__)
        return _json_refusal(Reason.SESSION_STORE_UNAVAILABLE)
    try:
        identity = _verify_proven(gateway, certificate, "challenge")
    except _Refused as refused:
        return _json_refusal(refused.reason, retry_after=refused.retry_after)
    try:
        _, session = open_session(
            gateway,
            identity,
            "/",
            audit_fields=_login_facts(identity, "challenge"),
            tags=_session_tags(gateway, identity),
        )
    except SessionStoreUnavailable:
        return _json_refusal(Reason.SESSION_STORE_UNAVAILABLE)
    response = _json({"subject": identity.idnat}, 200)
    set_session_cookie(gateway, response, session.id)
    return response


class _Refused(Exception):
    """A proven card's login refused: by the verifier, or because the card is banned or over its rate."""

    def __init__(self, reason: Reason, retry_after: int | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.retry_after = retry_after


def _verify_proven(gateway: Gateway, certificate: x509.Certificate, channel: str) -> Identity:
    """Judge a certificate whose key the client proved it holds: its identity, or _Refused (audited and
    counted, against the card too when its chain is trusted)."""
    assert gateway.card_verifier is not None
    now = datetime.now(UTC)
    try:
        identity = gateway.card_verifier.verify(certificate, now)
    except CardError as error:
        key = card_key(certificate) if gateway.card_verifier.chains_to_anchor(certificate, now) else None
        if key is not None:
            _admit_card(gateway, key)
        _audit_denied(gateway, error.reason, channel, error.detail, _card_facts(certificate), key)
        raise _Refused(error.reason) from None
    key = card_key(certificate)
    _admit_card(gateway, key)
    login_succeeded(gateway, key)
    metrics.login_attempt("card", "success")
    return identity


def _session_tags(gateway: Gateway, identity: Identity) -> tuple[str, ...]:
    """The card's and its CAs' tags: a CRL refresh listing one of them ends the session (revocation.py)."""
    assert gateway.card_verifier is not None
    return gateway.card_verifier.session_tags(identity)


def _admit_card(gateway: Gateway, key: str) -> None:
    try:
        admit_proven_identity(gateway, key)
    except LoginRefused as refused:
        metrics.login_attempt("card", refused.reason.value)
        raise _Refused(refused.reason, refused.retry_after) from None


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


def _card_facts(certificate: x509.Certificate) -> dict[str, str]:
    """Serial and issuer of a card, for the audit (whether or not its holder proved anything)."""
    return {
        "card_serial": format_serial(certificate.serial_number),
        "card_issuer": certificate.issuer.rfc4514_string(),
    }


def _claimed_card(body: object) -> dict[str, str]:
    """The facts of the certificate a challenge body names, when it can be read at all."""
    certificate = body.get("certificate") if isinstance(body, dict) else None
    if not isinstance(certificate, str):
        return {}
    try:
        return _card_facts(load_certificate(certificate))
    except CardError:
        return {}


#: Refusals that are not the card holder's attempt (no card presented, our CRL is stale): never count to a ban.
_NOT_COUNTED = frozenset({Reason.CARD_MISSING, Reason.CRL_UNAVAILABLE, Reason.SESSION_STORE_UNAVAILABLE})


def _audit_denied(
    gateway: Gateway,
    reason: Reason,
    channel: str,
    detail: str,
    facts: dict[str, str],
    proven_card: str | None = None,
) -> None:
    metrics.login_attempt("card", reason.value)
    fields: dict[str, Any] = {
        "method": "card",
        "channel": channel,
        "detail": detail,
        "card_serial": facts.get("card_serial"),
        "card_issuer": facts.get("card_issuer"),
    }
    if reason not in _NOT_COUNTED:
        login_failed(gateway, proven_card, reason, **fields)
        return
    audit_event(gateway, "login", decision="deny", reasons=[reason.value], **fields)


def _audit_spoofed(gateway: Gateway, headers: tuple[str, ...]) -> None:
    audit_event(gateway, "spoofed_header", reasons=[Reason.SPOOFED_HEADER.value], headers=list(headers))


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
