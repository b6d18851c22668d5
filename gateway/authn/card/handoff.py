"""The card-host hand-off: a verified card login carried from the card-login host to the main host, bound to
the browser that started it.

The session cookie is ``__Host-`` (no Domain attribute): a cookie set by the card host is never sent to the
main host, so the card host cannot open the session itself. The flow:

1. the main host (``/.gateway/card/start``) gives the browser a short-lived ``__Host-`` binding cookie
   holding a random secret, and sends it to the card host with only a REFERENCE to that secret (its
   SHA-256) in the URL;
2. the card host verifies the card and stores the verified identity under a single-use token, keyed with
   that reference (never a session id: no session exists until the browser proves itself on the main host);
3. the main host (``/.gateway/card/complete``) looks the token up under the reference of the secret in THIS
   browser's cookie, and only then spends it and opens the session.

A hand-off URL that leaks (history, logs, a Referer) logs nobody else in, and cannot be burned by a browser
without the cookie: the lookup with another browser's reference finds nothing and takes nothing. Nor can an
attacker log a victim into the attacker's account (login CSRF): the victim's browser has no matching cookie.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets

from gateway.authn.card.challenge import NonceKind, NonceStore
from gateway.identity import Identity

#: The main host's cookie binding a card login to the browser that started it.
BINDING_COOKIE = "__Host-gateway-card"
#: Time to go through the card host: choose the certificate, type the PIN.
BINDING_TTL_SECONDS = 600
#: Long enough for one redirect, short enough that a leaked hand-off URL is useless almost at once.
HANDOFF_TTL_SECONDS = 30

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,128}$")


class HandoffUnavailable(Exception):
    """The store refused a new hand-off (full or down): fail closed."""


def new_binding() -> str:
    """A fresh binding secret, for the cookie."""
    return secrets.token_urlsafe(32)


def reference_of(binding: str) -> str:
    """What the card host may know of a binding: its SHA-256, URL-safe (the secret stays in the cookie)."""
    digest = hashlib.sha256(binding.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def well_formed(value: str | None) -> bool:
    """A binding, reference or token as the gateway makes them (anything else is never looked up)."""
    return value is not None and _TOKEN.match(value) is not None


def issue_handoff(store: NonceStore, identity: Identity, reference: str, now: float) -> str:
    """On the card host: store the verified identity for the browser holding ``reference``'s binding."""
    token = secrets.token_urlsafe(32)
    record = json.dumps({"identity": identity.to_dict(), "exp": now + HANDOFF_TTL_SECONDS})
    if not store.add(NonceKind.CARD_HANDOFF, _key(reference, token), record, HANDOFF_TTL_SECONDS, now):
        raise HandoffUnavailable("the hand-off store refused a new token")
    return token


def spend_handoff(store: NonceStore, token: str, binding: str, now: float) -> Identity | None:
    """On the main host: the identity ``token`` carries for the browser whose cookie holds ``binding``; None
    when unknown, used, expired, malformed or started in another browser (then nothing is spent)."""
    if not (well_formed(token) and well_formed(binding)):
        return None
    record = store.take(NonceKind.CARD_HANDOFF, _key(reference_of(binding), token), now)
    if record is None:
        return None
    try:
        data = json.loads(record)
        if float(data["exp"]) < now:
            return None
        return Identity.from_dict(data["identity"])
    except (ValueError, KeyError, TypeError):
        return None


def _key(reference: str, token: str) -> str:
    return f"{reference}.{token}"
