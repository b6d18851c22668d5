"""A revoked card loses its sessions: when a refreshed CRL lists a card's certificate, or a CA above it, every
session that card opened ends, in every gateway process sharing the session store, with an audit record.

Card logins tag their sessions (:func:`gateway.authn.card.certificate.card_tag`, by the verifier's
``session_tags``, when the main host opens the session); the CRL store hands the serials a refresh brings for the first time to
:class:`RevokedCardSessions`, which ends the sessions carrying their tags at once, used or not. A session that
no refresh ended (opened before this process first loaded the CRL, or the store was down during the sweep) is
caught at its next use by ``CardVerifier.revoked_since_login`` (gateway/access.py).
"""

from __future__ import annotations

from cryptography import x509

from gateway.audit import AuditLog
from gateway.authn.card.certificate import card_tag, format_serial
from gateway.policy.decision import Reason
from gateway.sessions import SessionStore

#: The audit event of sessions ended by a card's revocation.
REVOCATION_EVENT = "card_revocation"


class RevokedCardSessions:
    """The CRL store's ``on_new_revocations``: end the sessions of newly revoked certificates, audit each."""

    def __init__(self, sessions: SessionStore, audit: AuditLog) -> None:
        self._sessions = sessions
        self._audit = audit

    def __call__(self, issuer: x509.Name, serials: frozenset[int]) -> None:
        for serial in sorted(serials):
            ended = self._sessions.delete_tagged(card_tag(issuer.rfc4514_string(), serial))
            if ended:  # another process may have ended them first: one record per session ended
                self._audit.record(
                    REVOCATION_EVENT,
                    decision="deny",
                    reasons=[Reason.CARD_REVOKED.value],
                    card_serial=format_serial(serial),
                    card_issuer=issuer.rfc4514_string(),
                    sessions_ended=ended,
                    detected="crl_refresh",
                )
