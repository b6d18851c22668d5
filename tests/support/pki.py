"""Dev PKI fixtures: built once per session; tests that change CRLs get their own copy."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.authn.card.verify import CardVerifier, CrlSource, CrlStore
from gateway.devtools.pki import CardVariant, DevPki, card_subject, ensure_dev_pki, issue_card_certificate
from gateway.identity import CardKind

_session_pki: DevPki | None = None
_card_key: rsa.RSAPrivateKey | None = None


def card_key() -> rsa.RSAPrivateKey:
    """One software RSA key for certificate-only tests (key generation is the slow part)."""
    global _card_key
    if _card_key is None:
        _card_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _card_key


def software_card(
    pki: DevPki,
    *,
    idnat: str = "810002813839",
    surname: str = "DUPONT",
    given_name: str = "JEAN",
    title: str | None = "Médecin",
    variant: CardVariant | None = None,
    kind: CardKind = CardKind.CPS,
    structure_name: str = "",
    now: datetime | None = None,
) -> x509.Certificate:
    return issue_card_certificate(
        pki,
        card_key().public_key(),
        idnat,
        surname,
        given_name,
        title,
        kind=kind,
        structure_name=structure_name,
        variant=variant,
        now=now,
    )


def custom_card(
    pki: DevPki,
    subject: x509.Name | None = None,
    *,
    key_usage: x509.KeyUsage | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
    now: datetime | None = None,
) -> x509.Certificate:
    """A card certificate from the real intermediate with chosen subject / usages (odd cards)."""
    now = now or datetime.now(UTC)
    issuer = pki.intermediate
    public_key = card_key().public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or card_subject("810002813839", "DUPONT", "JEAN", "Médecin"))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def crl_sources(pki: DevPki) -> list[CrlSource]:
    return [
        CrlSource(str(pki.root.crl_path), pki.root.certificate),
        CrlSource(str(pki.intermediate.crl_path), pki.intermediate.certificate),
    ]


def verifier_for(pki: DevPki, grace: timedelta = timedelta(0)) -> tuple[CardVerifier, CrlStore]:
    store = CrlStore(crl_sources(pki), grace=grace)
    assert store.refresh() == []
    return CardVerifier(pki.trust_anchors, pki.intermediates, store), store


def session_pki(base: Path) -> DevPki:
    global _session_pki
    if _session_pki is None:
        _session_pki = ensure_dev_pki(base)
    return _session_pki


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return session_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def own_pki(dev_pki: DevPki, tmp_path: Path) -> Iterator[DevPki]:
    """A private copy of the session PKI (same keys) whose CRLs a test may rewrite."""
    copy = tmp_path / "pki"
    shutil.copytree(dev_pki.base_dir, copy, ignore=shutil.ignore_patterns("softhsm"))
    yield ensure_dev_pki(copy)
