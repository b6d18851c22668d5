from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.authn.card.certificate import (
    PROFESSION_LABELS,
    CardError,
    format_serial,
    parse_card_certificate,
    profession_code,
)
from gateway.devtools.pki import DevPki, card_subject
from gateway.identity import CardKind
from gateway.policy.decision import Reason
from tests.support.openssl_pki import OpensslPki, printed_serial
from tests.support.pki import custom_card, software_card


def _name(*rdns: list[tuple[x509.ObjectIdentifier, str]]) -> x509.Name:
    return x509.Name(
        [x509.RelativeDistinguishedName([x509.NameAttribute(o, v) for o, v in rdn]) for rdn in rdns]
    )


def test_current_card_with_multi_valued_rdn(dev_pki: DevPki) -> None:
    cert = software_card(dev_pki, idnat="810002813839", surname="DUPONT", given_name="JEAN", title="Médecin")
    holder = parse_card_certificate(cert)
    assert (holder.idnat, holder.surname, holder.given_name) == ("810002813839", "DUPONT", "JEAN")
    assert holder.professions == ("10",)
    assert holder.serial_hex == format_serial(cert.serial_number)
    assert "TEST AC IGC-SANTE ELEMENTAIRE PERSONNES" in holder.issuer
    assert holder.not_after == cert.not_valid_after_utc
    assert not holder.is_staff_or_organisation


@pytest.mark.parametrize(
    ("title", "code"),
    [
        ("Médecin", "10"),
        ("MEDECIN", "10"),
        ("médecin", "10"),
        ("Sage-Femme", "50"),
        ("sage femme", "50"),
        ("Masseur-Kinesitherapeute", "70"),
        ("Infirmier psychiatrique", "69"),
        ("Manipulateur ERM", "98"),
        ("21", "21"),
    ],
)
def test_title_label_or_code_maps_to_tre_g15(title: str, code: str) -> None:
    assert profession_code(title) == code


def test_every_label_round_trips() -> None:
    assert all(profession_code(label) == code for code, label in PROFESSION_LABELS.items())
    assert len(PROFESSION_LABELS) == 17


def test_unknown_title_is_reported_not_guessed(dev_pki: DevPki) -> None:
    cert = software_card(dev_pki, title="Sorcier")
    with pytest.raises(CardError) as caught:
        parse_card_certificate(cert)
    assert caught.value.reason is Reason.CARD_UNKNOWN_PROFESSION
    with pytest.raises(CardError):
        profession_code("11")  # a number that is not a TRE_G15 code


def test_legacy_adeli_card_profession_in_ou(dev_pki: DevPki) -> None:
    subject = _name(
        [(NameOID.COUNTRY_NAME, "FR")],
        [(NameOID.ORGANIZATIONAL_UNIT_NAME, "Pharmacien")],
        [(NameOID.COMMON_NAME, "0751234567")],
    )
    holder = parse_card_certificate(custom_card(dev_pki, subject))
    assert holder.idnat == "0751234567"
    assert holder.professions == ("21",)


def test_legacy_card_with_unknown_ou(dev_pki: DevPki) -> None:
    subject = _name(
        [(NameOID.ORGANIZATIONAL_UNIT_NAME, "Quelque chose")], [(NameOID.COMMON_NAME, "0751234567")]
    )
    with pytest.raises(CardError) as caught:
        parse_card_certificate(custom_card(dev_pki, subject))
    assert caught.value.reason is Reason.CARD_UNKNOWN_PROFESSION


def _tool_card(pki: OpensslPki, kind: str, tmp_path: Path) -> x509.Certificate:
    path = pki.software_card(kind, "0x01C0", tmp_path / f"{kind}.pem")
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize(
    ("kind", "card_kind", "idnat", "professions", "structure"),
    [
        ("cps", CardKind.CPS, "810002813839", ("10",), ("", "", "")),
        ("legacy", CardKind.CPS, "00B7010446", ("70",), ("", "", "")),
        ("cpe", CardKind.CPE, "3760021832/000000018", (), ("3760021832", "PHARMACIE DES LILAS", "000000018")),
        (
            "cpa",
            CardKind.CPA,
            "500000000029751/CPAT0001",
            (),
            ("500000000029751", "CENTRE DE SANTE DES LILAS", "CPAT0001"),
        ),
    ],
)
def test_each_card_kind_in_its_real_layout(
    tool_pki: OpensslPki,
    tmp_path: Path,
    kind: str,
    card_kind: CardKind,
    idnat: str,
    professions: tuple[str, ...],
    structure: tuple[str, str, str],
) -> None:
    # Certificates made with openssl: a staff card's title names the card ("Carte de service santé ou social"),
    # it is not a profession label to look up.
    holder = parse_card_certificate(_tool_card(tool_pki, kind, tmp_path))
    assert (holder.kind, holder.idnat, holder.professions) == (card_kind, idnat, professions)
    assert (holder.structure_id, holder.structure_name, holder.employee_id) == structure
    assert holder.is_staff_or_organisation is (card_kind is not CardKind.CPS)


def test_a_staff_card_title_on_a_professional_idnat_is_malformed(
    tool_pki: OpensslPki, tmp_path: Path
) -> None:
    with pytest.raises(CardError) as caught:
        parse_card_certificate(_tool_card(tool_pki, "cpe-on-rpps", tmp_path))
    assert caught.value.reason is Reason.CARD_MALFORMED


@pytest.mark.parametrize("kind", [CardKind.CPE, CardKind.CPA])
def test_the_dev_generator_makes_the_layout_of_each_kind(dev_pki: DevPki, kind: CardKind) -> None:
    idnat = "3750000001/00042" if kind is CardKind.CPE else "512345678900011/D0007"
    cert = software_card(dev_pki, idnat=idnat, title=None, kind=kind, structure_name="CLINIQUE DES LILAS")
    holder = parse_card_certificate(cert)
    assert (holder.kind, holder.professions, holder.structure_name) == (kind, (), "CLINIQUE DES LILAS")
    assert (holder.structure_id, holder.employee_id) == tuple(idnat.split("/"))
    titles = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.TITLE)]
    assert titles == (["Carte de service santé ou social"] if kind is CardKind.CPE else [])


@pytest.mark.parametrize(
    "subject",
    [
        _name([(NameOID.SURNAME, "DUPONT")], [(NameOID.COUNTRY_NAME, "FR")]),  # no CN
        _name([(NameOID.COMMON_NAME, "810002813839")], [(NameOID.COMMON_NAME, "810002813840")]),  # two CNs
        card_subject("DUPONT JEAN", "DUPONT", "JEAN", "Médecin"),  # CN is not an idNat
    ],
)
def test_malformed_subjects(dev_pki: DevPki, subject: x509.Name) -> None:
    with pytest.raises(CardError) as caught:
        parse_card_certificate(custom_card(dev_pki, subject))
    assert caught.value.reason is Reason.CARD_MALFORMED


@pytest.mark.parametrize("serial", ["0x0E1530D2A1B2C3D4", "0x0A", "0x8A01", "0x7F", "0x00FF00", "0x01"])
def test_serials_read_as_openssl_prints_them(tool_pki: OpensslPki, tmp_path: Path, serial: str) -> None:
    # Leading zero kept, whole bytes, uppercase: what an operator greps for after `openssl x509 -serial`.
    path = tool_pki.software_card("cps", serial, tmp_path / "card.pem")
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    assert parse_card_certificate(certificate).serial_hex == printed_serial(path)


def test_zero_and_negative_serials_keep_openssl_form() -> None:
    # What `openssl x509 -serial` printed for certificates made with -set_serial 0 and -set_serial -5.
    assert (format_serial(0), format_serial(-5), format_serial(-0x1FF)) == ("00", "-05", "-01FF")
