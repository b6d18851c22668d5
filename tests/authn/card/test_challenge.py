from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from gateway import pkcs11 as tokens
from gateway.authn.card.challenge import (
    ChallengeIssuer,
    MemoryNonceStore,
    NonceKind,
    NonceStore,
    RedisNonceStore,
    challenge_message,
    proven_certificate,
)
from gateway.authn.card.handoff import issue_handoff, new_binding, reference_of, spend_handoff
from gateway.authn.card.verify import CardError, CardVerifier, verify_challenge_signature
from gateway.devtools.pki import DevPki
from gateway.identity import Identity, LoginMethod
from gateway.policy.decision import Reason
from tests.support.pki import verifier_for
from tests.support.processes import free_port, running
from tests.support.softhsm import CardSet

AUDIENCE = "https://gateway.example"
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    directory: Path = tmp_path_factory.mktemp("redis")
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with running([*argv, "--dir", str(directory)], port):
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> NonceStore:
    if request.param == "memory":
        return MemoryNonceStore()
    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    client.flushdb()
    return RedisNonceStore(client)


def _refused(issuer: ChallengeIssuer, nonce: str, ip: str, now: float) -> None:
    with pytest.raises(CardError) as caught:
        issuer.consume(nonce, ip, now)
    assert caught.value.reason is Reason.CHALLENGE_INVALID


def test_issue_then_consume_once(store: NonceStore) -> None:
    issuer = ChallengeIssuer(store, AUDIENCE)
    challenge = issuer.issue("192.0.2.1", NOW)
    assert challenge.to_json() == {"nonce": challenge.nonce, "expires_in": 60, "audience": AUDIENCE}
    assert len(challenge.nonce) >= 43
    message = issuer.consume(challenge.nonce, "192.0.2.1", NOW + 5)
    assert message == b"cps-gateway-challenge-v1\n" + AUDIENCE.encode() + b"\n" + challenge.nonce.encode()
    _refused(issuer, challenge.nonce, "192.0.2.1", NOW + 6)  # replay


def test_expired_nonce_refused(store: NonceStore) -> None:
    issuer = ChallengeIssuer(store, AUDIENCE, ttl_seconds=60)
    challenge = issuer.issue("192.0.2.1", NOW)
    _refused(issuer, challenge.nonce, "192.0.2.1", NOW + 61)


def test_foreign_ip_refused_and_nonce_burnt(store: NonceStore) -> None:
    issuer = ChallengeIssuer(store, AUDIENCE)
    challenge = issuer.issue("192.0.2.1", NOW)
    _refused(issuer, challenge.nonce, "198.51.100.7", NOW + 1)
    _refused(issuer, challenge.nonce, "192.0.2.1", NOW + 2)  # a failed attempt spends the nonce


def test_unknown_and_malformed_nonces_refused(store: NonceStore) -> None:
    issuer = ChallengeIssuer(store, AUDIENCE)
    _refused(issuer, "x" * 43, "192.0.2.1", NOW)
    _refused(issuer, "", "192.0.2.1", NOW)


def test_nonces_are_unique(store: NonceStore) -> None:
    issuer = ChallengeIssuer(store, AUDIENCE)
    assert len({issuer.issue("192.0.2.1", NOW).nonce for _ in range(200)}) == 200


def test_concurrent_consumers_get_one_success(store: NonceStore) -> None:
    issuer = ChallengeIssuer(store, AUDIENCE)
    nonce = issuer.issue("192.0.2.1", NOW).nonce
    successes: list[bytes] = []

    def attempt() -> None:
        with contextlib.suppress(CardError):
            successes.append(issuer.consume(nonce, "192.0.2.1", NOW + 1))

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(successes) == 1


def test_memory_store_purges_expired_entries() -> None:
    store = MemoryNonceStore(max_entries=10)
    issuer = ChallengeIssuer(store, AUDIENCE, ttl_seconds=1)
    for _ in range(10):
        issuer.issue("192.0.2.1", NOW)
    with pytest.raises(CardError):
        issuer.issue("192.0.2.1", NOW)  # full, nothing expired yet
    issuer.issue("192.0.2.1", NOW + 2)  # the expired ten are purged
    assert len(store) == 1


def test_token_signed_challenge_verifies_and_relay_to_other_audience_fails(softhsm_cards: CardSet) -> None:
    card = softhsm_cards["doctor"]
    issuer = ChallengeIssuer(MemoryNonceStore(), AUDIENCE)
    challenge = issuer.issue("192.0.2.1", NOW)
    signature = tokens.sign(card.label, challenge_message(challenge.audience, challenge.nonce), card.key_id)
    message = issuer.consume(challenge.nonce, "192.0.2.1", NOW + 1)
    verify_challenge_signature(card.pem_path.read_bytes(), message, signature)
    # The same nonce signed for another site's audience is useless here.
    relayed = tokens.sign(card.label, challenge_message("https://evil.example", challenge.nonce), card.key_id)
    with pytest.raises(CardError) as caught:
        verify_challenge_signature(card.pem_path.read_bytes(), message, relayed)
    assert caught.value.reason is Reason.SIGNATURE_INVALID


def _login_body(card_set: CardSet, issuer: ChallengeIssuer, signer: str, presented: str) -> dict[str, str]:
    challenge = issuer.issue("192.0.2.1", time.time())
    signing_card = card_set[signer]
    signature = tokens.sign(
        signing_card.label, challenge_message(issuer.audience, challenge.nonce), signing_card.key_id
    )
    return {
        "nonce": challenge.nonce,
        "certificate": card_set[presented].pem_path.read_text(),
        "signature": base64.b64encode(signature).decode(),
    }


def _login(issuer: ChallengeIssuer, verifier: CardVerifier, body: object) -> Identity:
    now = datetime.now(UTC)
    return verifier.verify(proven_certificate(issuer, body, "192.0.2.1", now), now)


def _login_reason(issuer: ChallengeIssuer, verifier: CardVerifier, body: object) -> Reason:
    with pytest.raises(CardError) as caught:
        _login(issuer, verifier, body)
    return caught.value.reason


def test_challenge_login_end_to_end(softhsm_cards: CardSet, dev_pki: DevPki) -> None:
    issuer = ChallengeIssuer(MemoryNonceStore(), AUDIENCE)
    verifier, _ = verifier_for(dev_pki)
    body = _login_body(softhsm_cards, issuer, "doctor", "doctor")
    identity = _login(issuer, verifier, body)
    assert identity.idnat == softhsm_cards["doctor"].idnat
    assert _login_reason(issuer, verifier, body) is Reason.CHALLENGE_INVALID  # replayed request


def test_challenge_login_reasons(softhsm_cards: CardSet, dev_pki: DevPki) -> None:
    issuer = ChallengeIssuer(MemoryNonceStore(), AUDIENCE)
    verifier, _ = verifier_for(dev_pki)
    revoked = _login_body(softhsm_cards, issuer, "revoked", "revoked")
    assert _login_reason(issuer, verifier, revoked) is Reason.CARD_REVOKED
    stolen_cert = _login_body(softhsm_cards, issuer, "pharmacist-ec", "doctor")  # someone else's certificate
    assert _login_reason(issuer, verifier, stolen_cert) is Reason.SIGNATURE_INVALID
    not_base64 = dict(_login_body(softhsm_cards, issuer, "doctor", "doctor"), signature="%%%")
    assert _login_reason(issuer, verifier, not_base64) is Reason.SIGNATURE_INVALID
    garbage = dict(
        _login_body(softhsm_cards, issuer, "doctor", "doctor"), certificate="-----BEGIN CERTIFICATE-----"
    )
    assert _login_reason(issuer, verifier, garbage) is Reason.CARD_MALFORMED
    assert _login_reason(issuer, verifier, {"certificate": "x"}) is Reason.CHALLENGE_INVALID
    assert _login_reason(issuer, verifier, ["not", "an", "object"]) is Reason.CHALLENGE_INVALID


IDENTITY = Identity("810001234567", LoginMethod.CARD, NOW, professions=("10",), auth_mode="CARD")


def test_a_challenge_nonce_is_never_a_handoff_token_nor_the_reverse(store: NonceStore) -> None:
    issuer = ChallengeIssuer(store, AUDIENCE)
    nonce = issuer.issue("192.0.2.1", NOW).nonce
    assert store.take(NonceKind.CARD_HANDOFF, nonce, NOW + 1) is None
    binding = new_binding()
    token = issue_handoff(store, IDENTITY, reference_of(binding), NOW)
    _refused(issuer, token, "192.0.2.1", NOW + 1)
    assert issuer.consume(nonce, "192.0.2.1", NOW + 1)  # neither attempt spent the other kind's value
    assert spend_handoff(store, token, binding, NOW + 1) == IDENTITY


def test_a_handoff_is_spent_only_by_the_browser_that_started_it(store: NonceStore) -> None:
    binding = new_binding()
    token = issue_handoff(store, IDENTITY, reference_of(binding), NOW)
    assert spend_handoff(store, token, new_binding(), NOW + 1) is None  # another browser's cookie
    assert spend_handoff(store, token, "", NOW + 1) is None  # no cookie
    assert spend_handoff(store, token, binding, NOW + 31) is None  # expired (30 s)
    token = issue_handoff(store, IDENTITY, reference_of(binding), NOW)
    assert spend_handoff(store, token, binding, NOW + 1) == IDENTITY  # not spent by the attempts above
    assert spend_handoff(store, token, binding, NOW + 2) is None  # single use


def test_an_unreadable_handoff_record_is_refused_not_an_error(store: NonceStore) -> None:
    binding = new_binding()
    for record in ("not json", "[]", '{"identity": {}}', '{"exp": "x"}'):
        token = new_binding()
        assert store.add(NonceKind.CARD_HANDOFF, f"{reference_of(binding)}.{token}", record, 30, NOW)
        assert spend_handoff(store, token, binding, NOW + 1) is None
