from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from gateway.devtools.pki import INTERMEDIATE_CN, ROOT_CN, DevPki, ensure_dev_pki, revoke
from gateway.identity import CardKind
from tests.support.pki import card_key, software_card


def test_files_and_private_key_permissions(dev_pki: DevPki) -> None:
    base = dev_pki.base_dir
    for name in ("root", "intermediate", "server-ca", "wrong-root", "wrong-intermediate"):
        assert (base / f"{name}.pem").exists()
        assert (base / f"{name}.crl.pem").exists()
        assert stat.S_IMODE((base / f"{name}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((base / "server.key").stat().st_mode) == 0o600
    readme = (base / "README.md").read_text(encoding="utf-8")
    assert "NOT FOR PRODUCTION" in readme and "IGC-Santé" in readme


def test_rerun_keeps_existing_files(dev_pki: DevPki) -> None:
    before = {p.name: p.read_bytes() for p in dev_pki.base_dir.glob("*.pem")}
    again = ensure_dev_pki(dev_pki.base_dir)
    assert again.root.certificate == dev_pki.root.certificate
    assert {p.name: p.read_bytes() for p in dev_pki.base_dir.glob("*.pem") if p.name in before} == before


def test_igc_sante_names_and_chain_file(dev_pki: DevPki) -> None:
    root, intermediate = dev_pki.root.certificate, dev_pki.intermediate.certificate
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ROOT_CN
    assert intermediate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == INTERMEDIATE_CN
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "ASIP-SANTE"
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "IGC-SANTE TEST"
    assert intermediate.issuer == root.subject
    intermediate.verify_directly_issued_by(root)
    chain = x509.load_pem_x509_certificates(dev_pki.ca_chain_path.read_bytes())
    assert chain == [intermediate, root]


def test_crls_are_signed_and_fresh(dev_pki: DevPki) -> None:
    for ca in (dev_pki.root, dev_pki.intermediate):
        assert ca.crl_path is not None
        crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
        assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
        assert crl.next_update_utc is not None
        assert (
            datetime.now(UTC) + timedelta(days=2)
            < crl.next_update_utc
            < datetime.now(UTC) + timedelta(days=8)
        )


def test_server_certificate_valid_for_localhost_and_loopback(dev_pki: DevPki) -> None:
    verifier = PolicyBuilder().store(Store([dev_pki.server_ca.certificate])).build_server_verifier
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier(name).verify(dev_pki.server.certificate, [])  # raises if not valid
    # Separate anchors: the card root does not vouch for the server and vice versa.
    assert dev_pki.server.certificate.issuer != dev_pki.root.certificate.subject


def test_card_subject_layout_and_extensions(dev_pki: DevPki) -> None:
    cert = software_card(dev_pki)
    # As on real cards: C first in DER, the multi-valued CN+SN+GN last (first in RFC 4514 order).
    assert cert.subject.rdns[0].get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "FR"
    assert cert.subject.rdns[1].get_attributes_for_oid(NameOID.TITLE)[0].value == "Médecin"
    last_rdn = cert.subject.rdns[2]
    assert {a.oid for a in last_rdn} == {NameOID.COMMON_NAME, NameOID.SURNAME, NameOID.GIVEN_NAME}
    assert cert.subject.rfc4514_string().endswith("2.5.4.12=Médecin,C=FR")
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = dev_pki.intermediate.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == card_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_variants_dates_issuer_and_staff(dev_pki: DevPki) -> None:
    now = datetime.now(UTC)
    assert software_card(dev_pki, variant="expired", now=now).not_valid_after_utc < now
    assert software_card(dev_pki, variant="not-yet-valid", now=now).not_valid_before_utc > now
    wrong = software_card(dev_pki, variant="wrong-ca")
    assert wrong.issuer == dev_pki.intermediate.certificate.subject  # same name...
    wrong.verify_directly_issued_by(dev_pki.wrong_intermediate.certificate)  # ...other key
    with pytest.raises(ValueError, match="idNat"):
        software_card(dev_pki, kind=CardKind.CPE, idnat="810002813839", structure_name="CLINIQUE")
    with pytest.raises(ValueError, match="structure"):
        software_card(dev_pki, kind=CardKind.CPA, idnat="512345678900011/D0007")
    staff = software_card(dev_pki, kind=CardKind.CPE, idnat="3750000001/00042", structure_name="CLINIQUE")
    assert staff.subject.rfc4514_string() == (
        "CN=3750000001/00042,2.5.4.65=EMPLOYE00042,2.5.4.12=Carte de service santé ou social,"
        "OU=750000001,O=CLINIQUE,C=FR"
    )


def test_revoke_adds_serial_and_resigns(own_pki: DevPki) -> None:
    assert own_pki.intermediate.crl_path is not None
    already = {
        entry.serial_number for entry in x509.load_pem_x509_crl(own_pki.intermediate.crl_path.read_bytes())
    }
    revoked = software_card(own_pki, variant="revoked")
    assert own_pki.intermediate.crl_path is not None
    crl = x509.load_pem_x509_crl(own_pki.intermediate.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    assert crl.is_signature_valid(own_pki.intermediate.certificate.public_key())  # type: ignore[arg-type]
    revoke(own_pki, 12345, datetime.now(UTC))
    crl = x509.load_pem_x509_crl(own_pki.intermediate.crl_path.read_bytes())
    assert {entry.serial_number for entry in crl} == already | {revoked.serial_number, 12345}
