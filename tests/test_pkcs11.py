from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from gateway import pkcs11 as tokens
from tests.support.pki import session_pki
from tests.support.softhsm import CardSet, session_cards


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> CardSet:
    return session_cards(session_pki(tmp_path_factory.mktemp("pki")))


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


@pytest.mark.parametrize("card", ["doctor", "pharmacist-ec"])
def test_public_key_on_token_matches_certificate(cards: CardSet, card: str) -> None:
    token_card = cards[card]
    public_key = tokens.read_public_key(token_card.label, token_card.key_id)
    assert _spki(public_key) == _spki(token_card.certificate.public_key())


def test_rsa_signature_is_pkcs1v15_sha256(cards: CardSet) -> None:
    card = cards["doctor"]
    signature = tokens.sign(card.label, b"data", card.key_id, pin="1234")
    card.certificate.public_key().verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg,union-attr]
    assert len(signature) == 256


def test_ec_signature_is_der_ecdsa_sha256(cards: CardSet) -> None:
    card = cards["pharmacist-ec"]
    signature = tokens.sign(card.label, b"data", card.key_id)
    assert signature[0] == 0x30  # DER SEQUENCE(r, s), not the raw r||s the token returns
    public_key = card.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature, b"data", ec.ECDSA(hashes.SHA256()))
    assert hashlib.sha256(b"data").digest()  # hashed in Python: SoftHSM has no CKM_ECDSA_SHA256


def test_listing_pairs_certificate_with_key_id(cards: CardSet) -> None:
    infos = {info.label: info for info in tokens.list_tokens()}
    for card in cards.cards.values():
        (certificate,) = infos[card.label].certificates
        assert certificate.key_id == card.key_id
        assert certificate.der == card.certificate.public_bytes(serialization.Encoding.DER)
    assert [c.key_id for c in tokens.token_certificates(cards["doctor"].label)] == [cards["doctor"].key_id]


def test_unknown_token_and_wrong_pin(cards: CardSet) -> None:
    with pytest.raises(tokens.TokenError):
        tokens.sign("no-such-card", b"data", b"\x01")
    with pytest.raises(tokens.TokenError) as caught:
        tokens.sign(cards["doctor"].label, b"data", cards["doctor"].key_id, pin="9999")
    assert "9999" not in str(caught.value)  # PINs never end up in messages


def test_private_key_needs_the_pin(cards: CardSet) -> None:
    from gateway.devtools.cards import softhsm_env

    label = "test-private-key"
    tokens.init_softhsm_token(label, "12345678", "4321", softhsm_env(cards.base_dir))
    public_key = tokens.generate_key_pair(label, "4321", "k", b"\x42", "ec", private=True)
    with pytest.raises(tokens.TokenError):
        tokens.sign(label, b"data", b"\x42")  # not logged in: the private key is invisible
    signature = tokens.sign(label, b"data", b"\x42", pin="4321")
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature, b"data", ec.ECDSA(hashes.SHA256()))


def test_two_tokens_with_one_label_are_named_never_a_traceback(cards: CardSet) -> None:
    from gateway.devtools.cards import softhsm_env

    for _ in range(2):  # two readers holding cards labelled alike: which one is meant cannot be guessed
        tokens.init_softhsm_token("test-twin", "12345678", "4321", softhsm_env(cards.base_dir))
    with pytest.raises(tokens.TokenError, match="several tokens are labelled 'test-twin'"):
        tokens.token_certificates("test-twin")
