from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.authn.card.certificate import format_serial
from gateway.devtools.cards import create_card, list_cards, softhsm_env
from gateway.devtools.pki import DevPki
from gateway.pkcs11 import SOFTHSM_MODULE
from tests.support.processes import PYTHON, REPO_ROOT
from tests.support.softhsm import CARD_SPECS, CardSet


def test_project_local_softhsm_config(softhsm_cards: CardSet) -> None:
    env = softhsm_env(softhsm_cards.base_dir)
    config = Path(env["SOFTHSM2_CONF"])
    assert config.is_relative_to(softhsm_cards.base_dir.resolve())
    text = config.read_text()
    assert f"directories.tokendir = {(softhsm_cards.base_dir / 'softhsm' / 'tokens').resolve()}" in text
    assert "objectstore.backend = file" in text and "log.level = ERROR" in text


def test_cards_listed_with_their_certificates(softhsm_cards: CardSet) -> None:
    listed = {info.label: info for info in list_cards(softhsm_cards.base_dir)}
    assert {f"test-{name}" for name in CARD_SPECS} <= set(listed)
    for card in softhsm_cards.cards.values():
        assert listed[card.label].certificates[0].key_id == card.key_id
        assert x509.load_pem_x509_certificate(card.pem_path.read_bytes()) == card.certificate
        assert card.pem_path.parent == softhsm_cards.base_dir / "softhsm"


def test_key_is_generated_on_token_sensitive_and_not_extractable(softhsm_cards: CardSet) -> None:
    # Ask the token through another PKCS#11 client (OpenSC's pkcs11-tool), with the card's environment.
    card = softhsm_cards["doctor"]
    out = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", card.label, "--list-objects"],
        env=softhsm_env(softhsm_cards.base_dir),
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    private = out.split("Private Key Object")[1].split("Object;")[0]
    assert "sensitive" in private and "never extractable" in private
    assert card.key_id.hex() in out.replace(" ", "")
    assert "Certificate Object" in out


def test_staff_card_subject(softhsm_cards: CardSet) -> None:
    card = softhsm_cards["staff"]
    assert card.idnat.startswith("3") and "/" in card.idnat
    (title,) = card.certificate.subject.get_attributes_for_oid(x509.NameOID.TITLE)
    assert title.value == "Carte de service santé ou social"


def test_refuses_duplicate_label_unknown_profession_and_a_structure_idnat(softhsm_cards: CardSet) -> None:
    with pytest.raises(ValueError):
        create_card(softhsm_cards.base_dir, "test-doctor", "810000000001", "X", "Y", "10")
    with pytest.raises(ValueError):
        create_card(softhsm_cards.base_dir, "test-new", "810000000001", "X", "Y", "99")
    # Not a person's idNat: a structure's would be read as a staff or organisation card at login.
    for idnat in ("bad", "3750000001", "8100/1"):
        with pytest.raises(ValueError, match="a cps card's idNat is a person's"):
            create_card(softhsm_cards.base_dir, "test-new", idnat, "X", "Y", "10")
    assert "test-new" not in {info.label for info in list_cards(softhsm_cards.base_dir)}  # no half-made card


def test_a_signature_key_makes_a_two_key_token_like_a_cps3_card(softhsm_cards: CardSet) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from gateway import pkcs11 as tokens
    from gateway.authn.card.client import authentication_certificate

    card = create_card(
        softhsm_cards.base_dir, "test-cps3", "810002813870", "X", "Y", "10", signature_key=True
    )
    (listed,) = [info for info in list_cards(softhsm_cards.base_dir) if info.label == "test-cps3"]
    by_id = {c.key_id: x509.load_der_x509_certificate(c.der) for c in listed.certificates}
    assert card.signature_key_id is not None and set(by_id) == {card.key_id, card.signature_key_id}
    usages = {key_id: certificate.extensions.get_extension_for_class(x509.KeyUsage).value
              for key_id, certificate in by_id.items()}  # fmt: skip
    assert usages[card.key_id].digital_signature and not usages[card.key_id].content_commitment
    assert (
        usages[card.signature_key_id].content_commitment
        and not usages[card.signature_key_id].digital_signature
    )
    # Whatever the listing order, the authentication certificate is the one `gateway card login` signs with...
    for order in (listed.certificates, listed.certificates[::-1]):
        assert authentication_certificate(order, "test-cps3").key_id == card.key_id
    # ... and each certificate is paired with its own key on the token (same CKA_ID).
    for key_id, certificate in by_id.items():
        signature = tokens.sign("test-cps3", b"data", key_id, pin="1234")
        certificate.public_key().verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg,union-attr]


def test_certificate_public_key_is_the_token_key(softhsm_cards: CardSet) -> None:
    from gateway.pkcs11 import read_public_key

    card = softhsm_cards["doctor"]
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert read_public_key(card.label, card.key_id).public_bytes(
        *fmt
    ) == card.certificate.public_key().public_bytes(*fmt)


def test_dev_revoke_lists_the_card_in_the_crl_and_says_when_it_takes_effect(
    dev_pki: DevPki, tmp_path: Path
) -> None:
    base = tmp_path / "dev"
    shutil.copytree(dev_pki.base_dir, base, ignore=shutil.ignore_patterns("softhsm"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "gateway.cli", "dev", *args, "--dir", str(base)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )

    created = cli("card", "--label", "to-revoke", "--idnat", "810002813860", "--surname", "X", "--given", "Y")
    assert created.returncode == 0, created.stderr
    certificate = x509.load_pem_x509_certificate((base / "softhsm" / "to-revoke.pem").read_bytes())
    revoked = cli("revoke", "--label", "to-revoke")
    assert revoked.returncode == 0, revoked.stderr
    assert format_serial(certificate.serial_number) in revoked.stdout
    assert "at its next CRL refresh" in revoked.stdout and "5 min by default" in revoked.stdout
    crl = x509.load_pem_x509_crl((base / "intermediate.crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None
    born_revoked = cli(
        "card",
        "--label",
        "born-revoked",
        "--idnat",
        "810002813861",
        "--surname",
        "X",
        "--given",
        "Y",
        "--revoked",
    )
    assert "at its next CRL refresh" in born_revoked.stdout
    unknown = cli("revoke", "--label", "nobody")
    assert unknown.returncode != 0 and "no card labelled 'nobody'" in unknown.stderr
