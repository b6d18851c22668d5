"""Build the card-login objects ONCE from the settings: trust store, CRL store, challenge and hand-off stores.

The CRL store is refreshed here at start-up (errors logged, never fatal: the verifier fails closed per issuer
without a fresh CRL, and the background refresh may recover) and then in a daemon thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from gateway.authn.card.challenge import ChallengeIssuer, MemoryNonceStore, NonceStore, RedisNonceStore
from gateway.authn.card.verify import CardVerifier, CrlSource, CrlStore, NewRevocations
from gateway.settings import CardSettings, Settings

log = logging.getLogger("gateway.card")


@dataclass(frozen=True, slots=True)
class CardLogin:
    verifier: CardVerifier
    crl_store: CrlStore
    challenges: ChallengeIssuer
    #: One-time tokens carrying a fresh card session from the card-login host to the main host.
    handoffs: NonceStore


def _certificates(paths: list[Path]) -> list[x509.Certificate]:
    return [cert for path in paths for cert in x509.load_pem_x509_certificates(path.read_bytes())]


def nonce_store(url: str, prefix: str = "gw:card-nonce:") -> NonceStore:
    if url.startswith("memory://"):
        return MemoryNonceStore()
    from gateway.redis_client import redis_client

    return RedisNonceStore(redis_client(url), prefix)


def build_card_login(
    settings: Settings, card: CardSettings, on_new_revocations: NewRevocations | None = None
) -> CardLogin:
    sources = [
        CrlSource(source.url_or_file, x509.load_pem_x509_certificate(source.issuer.read_bytes()))
        for source in card.crls
    ]
    crl_store = CrlStore(
        sources, grace=timedelta(seconds=card.crl_grace), on_new_revocations=on_new_revocations
    )
    for error in crl_store.refresh():
        log.error("card CRL not loaded at start-up (card logins through this CA fail closed): %s", error)
    crl_store.start(interval=card.crl_refresh)
    verifier = CardVerifier(_certificates(card.trust_anchors), _certificates(card.intermediates), crl_store)
    store = nonce_store(card.nonce_store or settings.sessions.store)
    challenges = ChallengeIssuer(store, settings.server.public_origin, int(card.challenge_ttl))
    return CardLogin(verifier, crl_store, challenges, store)


def crls_ready(login: CardLogin, now: datetime | None = None) -> bool:
    """Every configured CRL is loaded and not past nextUpdate + grace (else card logins are refused)."""
    return login.crl_store.all_fresh(now or datetime.now(UTC))
