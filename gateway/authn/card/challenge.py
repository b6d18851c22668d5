"""Challenge-response card login for native clients (``gateway card login``).

The gateway hands out a single-use nonce bound to the client IP, valid a short time; the client signs
``b"cps-gateway-challenge-v1\\n" + audience + b"\\n" + nonce`` with the card key. The audience is the
gateway's public origin, so a nonce relayed from another site that asked the card to sign gives a signature
that is useless here. Nonces live in a :class:`NonceStore` (memory for one process, Redis for several),
typed by :class:`NonceKind`: a challenge nonce is never found when presented as a card-host hand-off token,
nor the reverse.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509

from gateway.authn.card.certificate import CardError
from gateway.authn.card.verify import load_certificate, verify_challenge_signature
from gateway.policy.decision import Reason

CHALLENGE_PREFIX = b"cps-gateway-challenge-v1\n"
DEFAULT_TTL_SECONDS = 60


def challenge_message(audience: str, nonce: str) -> bytes:
    """The exact bytes the card signs."""
    return CHALLENGE_PREFIX + audience.encode("utf-8") + b"\n" + nonce.encode("ascii")


class NonceKind(enum.StrEnum):
    """What a single-use value stands for; part of its key, so one kind is never taken for another."""

    CHALLENGE = "challenge"
    CARD_HANDOFF = "card-handoff"
    #: e-CPS states and back-channel logout token ids already consumed (replays refused on every instance).
    ECPS_USED = "ecps-used"


class NonceStore(Protocol):
    """Single-use values, expiring: ``add`` refuses an existing key, ``take`` reads and deletes atomically.
    Keys live in one namespace per :class:`NonceKind`."""

    def add(self, kind: NonceKind, key: str, value: str, ttl_seconds: int, now: float) -> bool: ...

    def take(self, kind: NonceKind, key: str, now: float) -> str | None: ...


class MemoryNonceStore:
    """Thread-safe in-process store; expired entries are purged as new ones arrive."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def _purge(self, now: float) -> None:
        for key in [k for k, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[key]

    def add(self, kind: NonceKind, key: str, value: str, ttl_seconds: int, now: float) -> bool:
        with self._lock:
            if len(self._entries) >= self._max_entries:
                self._purge(now)
                if len(self._entries) >= self._max_entries:
                    return False  # bounded memory: refuse rather than grow without limit
            stored_key = f"{kind}:{key}"
            if stored_key in self._entries:
                return False
            self._entries[stored_key] = (value, now + ttl_seconds)
            return True

    def take(self, kind: NonceKind, key: str, now: float) -> str | None:
        with self._lock:
            entry = self._entries.pop(f"{kind}:{key}", None)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def __len__(self) -> int:
        return len(self._entries)


class NonceSpace:
    """One kind's view of a :class:`NonceStore`, for a component that keeps a single kind of value."""

    def __init__(self, store: NonceStore, kind: NonceKind) -> None:
        self._store = store
        self._kind = kind

    def add(self, key: str, value: str, ttl_seconds: int, now: float) -> bool:
        return self._store.add(self._kind, key, value, ttl_seconds, now)

    def take(self, key: str, now: float) -> str | None:
        return self._store.take(self._kind, key, now)


class RedisLike(Protocol):
    """The two commands the nonce store needs (redis.Redis satisfies it)."""

    def set(self, name: str, value: str, *, nx: bool, ex: int) -> object: ...

    def getdel(self, name: str) -> object: ...


class RedisNonceStore:
    """Shared by every gateway process: ``SET NX EX`` to create, ``GETDEL`` to consume (atomic, single-use).

    Redis expires keys on its own clock; the issuer also stores the expiry in the value and checks it against
    ``now``, so both clocks must agree that the nonce is still valid.
    """

    def __init__(self, client: RedisLike, prefix: str = "gw:card-nonce:") -> None:
        self._redis = client
        self._prefix = prefix

    def add(self, kind: NonceKind, key: str, value: str, ttl_seconds: int, now: float) -> bool:
        return bool(self._redis.set(f"{self._prefix}{kind}:{key}", value, nx=True, ex=ttl_seconds))

    def take(self, kind: NonceKind, key: str, now: float) -> str | None:
        value = self._redis.getdel(f"{self._prefix}{kind}:{key}")
        if value is None:
            return None
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: str
    expires_in: int
    audience: str

    def to_json(self) -> dict[str, object]:
        return {"nonce": self.nonce, "expires_in": self.expires_in, "audience": self.audience}


class ChallengeIssuer:
    """Issue and consume challenges for one audience (the gateway's public origin, e.g. https://gw.example)."""

    def __init__(self, store: NonceStore, audience: str, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        self._store = store
        self.audience = audience
        self.ttl_seconds = ttl_seconds

    def issue(self, client_ip: str, now: float) -> Challenge:
        nonce = secrets.token_urlsafe(32)
        record = json.dumps({"ip": client_ip, "exp": now + self.ttl_seconds})
        if not self._store.add(NonceKind.CHALLENGE, nonce, record, self.ttl_seconds, now):
            raise CardError(Reason.CHALLENGE_INVALID, "nonce store refused a new nonce")
        return Challenge(nonce, self.ttl_seconds, self.audience)

    def consume(self, nonce: str, client_ip: str, now: float) -> bytes:
        """Spend the nonce (whatever the outcome) and return the message the card must have signed."""
        if not isinstance(nonce, str) or not 20 <= len(nonce) <= 128:
            raise CardError(Reason.CHALLENGE_INVALID, "malformed nonce")
        record = self._store.take(NonceKind.CHALLENGE, nonce, now)
        if record is None:
            raise CardError(Reason.CHALLENGE_INVALID, "unknown, expired or already used nonce")
        try:
            data = json.loads(record)
            bound_ip, expires = str(data["ip"]), float(data["exp"])
        except (ValueError, KeyError, TypeError) as error:
            raise CardError(Reason.CHALLENGE_INVALID, "unreadable nonce record") from error
        if now > expires:
            raise CardError(Reason.CHALLENGE_INVALID, "expired nonce")
        if bound_ip != client_ip:
            raise CardError(Reason.CHALLENGE_INVALID, "nonce issued to another client address")
        return challenge_message(self.audience, nonce)


def proven_certificate(
    issuer: ChallengeIssuer, body: object, client_ip: str, now: datetime
) -> x509.Certificate:
    """The certificate whose key signed this request's challenge (``POST /.gateway/card/verify``, parsed JSON).

    The proof of possession, in the safe order: 1. spend the nonce (single use, this client, not expired)
    -> CHALLENGE_INVALID; 2. the signature over the audience-bound message with the certificate's key ->
    SIGNATURE_INVALID. The certificate itself (chain, dates, CRLs) is judged afterwards by the verifier:
    only a holder of the key learns a precise card reason, and only then may a failure count against it.
    """
    if not isinstance(body, dict):
        raise CardError(Reason.CHALLENGE_INVALID, "body is not a JSON object")
    nonce, certificate, signature = body.get("nonce"), body.get("certificate"), body.get("signature")
    if not isinstance(nonce, str):
        raise CardError(Reason.CHALLENGE_INVALID, "missing nonce")
    message = issuer.consume(nonce, client_ip, now.timestamp())
    if not isinstance(certificate, str) or not certificate.strip():
        raise CardError(Reason.CARD_MISSING, "missing certificate")
    if not isinstance(signature, str):
        raise CardError(Reason.SIGNATURE_INVALID, "missing signature")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise CardError(Reason.SIGNATURE_INVALID, "signature is not base64") from None
    card = load_certificate(certificate.encode("ascii", "replace"))
    verify_challenge_signature(card, message, raw_signature)
    return card
