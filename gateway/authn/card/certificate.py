"""Read who a CPS-family card certificate designates: card kind, idNat, names, professions or structure.

Layouts (see docs/card.md for which were seen on real cards and which are only documented):

- professional card (CPS): ``CN=<idNat>+SN=<surname>+GN=<given>, title=<profession label>, C=FR`` (a
  multi-valued RDN); legacy cards ``CN=0<ADELI>`` with the profession in ``OU``. The title is a LABEL
  ("Médecin"), mapped to its TRE_G15 code through :data:`PROFESSION_LABELS`; an unknown label is reported,
  never guessed.
- establishment staff card (CPE): ``CN=3<FINESS>/<employee no.>, pseudonym=…, title=Carte de service santé ou
  social, OU=<structure id>, O=<structure name>, …, C=FR``: the title names the card, not a profession.
- organisation card (CPA, director cards): ``CN=<4|5><SIREN|SIRET>/<holder no.>(+SN+GN), OU=…, O=…, C=FR``.

The kind comes from a card-kind title when there is one, else from the idNat type; a card-kind title on a
person's idNat is refused as malformed. Parsing says nothing about trust: :mod:`gateway.authn.card.verify`
checks the chain first.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.identity import (
    ID_TYPE_FINESS,
    STAFF_OR_ORGANISATION_CARDS,
    STAFF_OR_ORGANISATION_ID_TYPES,
    CardKind,
)
from gateway.policy.decision import Reason
from gateway.professions import PROFESSIONS


class CardError(Exception):
    """A card was refused; ``reason`` is the stable code, ``detail`` is for logs (never shown raw)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


#: TRE_G15 profession codes and their labels (one table for the whole gateway).
PROFESSION_LABELS: dict[str, str] = PROFESSIONS

_IDNAT = re.compile(r"^[0-9][0-9A-Za-z/]{1,63}$")


def format_serial(serial: int) -> str:
    """A certificate serial as openssl prints it (``openssl x509 -serial``): uppercase hex, whole bytes, so a
    leading zero stays (``0E1530D2A1``, never ``E1530D2A1``), ``-`` before a negative one.

    The ONE form of a serial in the audit, bans, sessions and logs: an operator can grep the audit for what
    ``openssl x509 -noout -serial`` or ``openssl crl -text`` shows.
    """
    digits = format(abs(serial), "X")
    return ("-" if serial < 0 else "") + digits.zfill(len(digits) + len(digits) % 2)


#: Prefix of the session tags of card logins (see :func:`card_tag`).
CARD_TAG_PREFIX = "card:"


def card_tag(issuer: str, serial: int) -> str:
    """The session tag of the certificate ``serial`` of the CA named ``issuer`` (RFC 4514): ``card:`` + the
    SHA-256 (hex) of both. A card login's session carries its card's tag and its CAs', so that a CRL listing
    any of them ends the session (``delete_tagged``). The name as text, not as DER: the same whatever string
    types a certificate and a CRL encode it with, and what a session's identity remembers (``card_issuer``)."""
    digest = hashlib.sha256(f"{issuer}\n{format_serial(serial)}".encode())
    return CARD_TAG_PREFIX + digest.hexdigest()


def normalise_label(label: str) -> str:
    """Compare labels without accents, case, or hyphen/space differences ("sage femme" == "Sage-Femme")."""
    decomposed = unicodedata.normalize("NFKD", label)
    without_accents = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.split(r"[\s\-_]+", without_accents.casefold().strip()))


_CODE_BY_LABEL: dict[str, str] = {normalise_label(label): code for code, label in PROFESSION_LABELS.items()}


#: Titles that name the card instead of a profession. Only the CPE one was seen on a real card; the others are
#: the ANS card names (unverified as certificate titles).
CARD_KIND_TITLES: dict[str, CardKind] = {
    normalise_label(title): kind
    for title, kind in (
        ("Carte de service santé ou social", CardKind.CPE),
        ("Carte de personnel d'établissement", CardKind.CPE),
        ("Carte de personnel autorisé", CardKind.CPA),
        ("Carte de directeur d'établissement", CardKind.CPA),
    )
}


def profession_code(value: str) -> str:
    """TRE_G15 code for a title label or a bare numeric code; CARD_UNKNOWN_PROFESSION otherwise."""
    stripped = value.strip()
    if stripped in PROFESSION_LABELS:
        return stripped
    code = _CODE_BY_LABEL.get(normalise_label(stripped))
    if code is None:
        raise CardError(Reason.CARD_UNKNOWN_PROFESSION, f"unknown profession title {stripped!r}")
    return code


def check_key_usage(certificate: x509.Certificate) -> None:
    """CardError unless the certificate may authenticate its holder: digitalSignature, and clientAuth when it
    restricts its extended usages."""
    try:
        key_usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CardError(Reason.CARD_BAD_KEY_USAGE, "no KeyUsage extension") from None
    except (ValueError, x509.DuplicateExtension) as error:
        raise CardError(Reason.CARD_MALFORMED, f"unreadable extensions: {error}") from error
    if not key_usage.digital_signature:
        raise CardError(Reason.CARD_BAD_KEY_USAGE, "KeyUsage lacks digitalSignature")
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # EKUs of real cards are unverified (domain.md): absent means unrestricted
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise CardError(Reason.CARD_BAD_KEY_USAGE, "ExtendedKeyUsage lacks clientAuth")


@dataclass(frozen=True, slots=True)
class CardHolder:
    idnat: str
    kind: CardKind
    surname: str
    given_name: str
    professions: tuple[str, ...]
    serial_hex: str
    issuer: str
    not_before: datetime
    not_after: datetime
    #: Staff and organisation cards: the structure's idNat, its name, the holder's number in it.
    structure_id: str = ""
    structure_name: str = ""
    employee_id: str = ""

    @property
    def is_staff_or_organisation(self) -> bool:
        return self.kind in STAFF_OR_ORGANISATION_CARDS


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    # get_attributes_for_oid walks every RDN, including each member of a multi-valued RDN.
    return [str(attribute.value).strip() for attribute in name.get_attributes_for_oid(oid)]


def _single(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    values = _values(name, oid)
    if len(values) > 1:
        raise CardError(Reason.CARD_MALFORMED, f"subject has {len(values)} {what} attributes")
    return values[0] if values else ""


def _kind(name: x509.Name, idnat: str) -> CardKind:
    named = {
        CARD_KIND_TITLES[key]
        for key in map(normalise_label, _values(name, NameOID.TITLE))
        if key in CARD_KIND_TITLES
    }
    structure_idnat = idnat[:1] in STAFF_OR_ORGANISATION_ID_TYPES
    if len(named) > 1:
        raise CardError(Reason.CARD_MALFORMED, f"titles name several card kinds: {sorted(named)}")
    if named:
        kind = named.pop()
        if not structure_idnat:
            # A staff card title with a professional's idNat: trusting either half would be a guess.
            raise CardError(Reason.CARD_MALFORMED, f"{kind.value} title on the idNat of a person {idnat!r}")
        return kind
    if not structure_idnat:
        return CardKind.CPS
    return CardKind.CPE if idnat[:1] == ID_TYPE_FINESS else CardKind.CPA


def _professions(name: x509.Name, idnat: str) -> tuple[str, ...]:
    titles = _values(name, NameOID.TITLE)
    if titles:
        return tuple(dict.fromkeys(profession_code(title) for title in titles))
    if idnat.startswith("0"):
        # Legacy ADELI cards carry the profession in OU (label or code); OUs that are not
        # professions are ignored, but there must be one.
        units = _values(name, NameOID.ORGANIZATIONAL_UNIT_NAME)
        codes: list[str] = []
        for unit in units:
            try:
                codes.append(profession_code(unit))
            except CardError:
                continue
        if units and not codes:
            raise CardError(Reason.CARD_UNKNOWN_PROFESSION, f"no known profession in OU {units!r}")
        return tuple(dict.fromkeys(codes))
    return ()


def parse_card_certificate(certificate: x509.Certificate) -> CardHolder:
    try:
        subject = certificate.subject
        idnat = _single(subject, NameOID.COMMON_NAME, "CN")
        surname = _single(subject, NameOID.SURNAME, "SN")
        given_name = _single(subject, NameOID.GIVEN_NAME, "GN")
        issuer = certificate.issuer.rfc4514_string()
        serial_hex = format_serial(certificate.serial_number)
        not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    except CardError:
        raise
    except (ValueError, TypeError) as error:  # undecodable name or attributes
        raise CardError(Reason.CARD_MALFORMED, f"unreadable certificate: {error}") from error
    if not _IDNAT.match(idnat):
        raise CardError(Reason.CARD_MALFORMED, f"CN is not an idNat: {idnat!r}")
    kind = _kind(subject, idnat)
    organisation = _single(subject, NameOID.ORGANIZATION_NAME, "O") if kind is not CardKind.CPS else ""
    # Staff and organisation cards hold no profession: their title names the card. The structure is the part
    # of the idNat before "/", the holder's number the part after it.
    structure_id, _, employee_id = idnat.partition("/") if kind is not CardKind.CPS else ("", "", "")
    return CardHolder(
        idnat=idnat,
        kind=kind,
        surname=surname,
        given_name=given_name,
        professions=_professions(subject, idnat) if kind is CardKind.CPS else (),
        serial_hex=serial_hex,
        issuer=issuer,
        not_before=not_before,
        not_after=not_after,
        structure_id=structure_id,
        structure_name=organisation,
        employee_id=employee_id,
    )
