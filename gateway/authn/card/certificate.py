"""Read who a CPS card certificate designates: idNat, names, profession codes (TRE_G15).

Current cards: subject ``CN=<idNat>+SN=<surname>+GN=<given>, title=<profession label>, C=FR`` (a multi-valued
first RDN). Legacy cards: ``CN=0<ADELI>`` with the profession in ``OU``. The title is a LABEL ("Médecin"),
mapped to its code through :data:`PROFESSION_LABELS`; an unknown label is reported, never guessed.
Parsing says nothing about trust: :mod:`gateway.authn.card.verify` checks the chain first.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.identity import STAFF_OR_ORGANISATION_ID_TYPES
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


def normalise_label(label: str) -> str:
    """Compare labels without accents, case, or hyphen/space differences ("sage femme" == "Sage-Femme")."""
    decomposed = unicodedata.normalize("NFKD", label)
    without_accents = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.split(r"[\s\-_]+", without_accents.casefold().strip()))


_CODE_BY_LABEL: dict[str, str] = {normalise_label(label): code for code, label in PROFESSION_LABELS.items()}


def profession_code(value: str) -> str:
    """TRE_G15 code for a title label or a bare numeric code; CARD_UNKNOWN_PROFESSION otherwise."""
    stripped = value.strip()
    if stripped in PROFESSION_LABELS:
        return stripped
    code = _CODE_BY_LABEL.get(normalise_label(stripped))
    if code is None:
        raise CardError(Reason.CARD_UNKNOWN_PROFESSION, f"unknown profession title {stripped!r}")
    return code


@dataclass(frozen=True, slots=True)
class CardHolder:
    idnat: str
    surname: str
    given_name: str
    professions: tuple[str, ...]
    serial_hex: str
    issuer: str
    not_before: datetime
    not_after: datetime

    @property
    def is_staff_or_organisation(self) -> bool:
        return self.idnat[:1] in STAFF_OR_ORGANISATION_ID_TYPES


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    # get_attributes_for_oid walks every RDN, including each member of a multi-valued RDN.
    return [str(attribute.value).strip() for attribute in name.get_attributes_for_oid(oid)]


def _single(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    values = _values(name, oid)
    if len(values) > 1:
        raise CardError(Reason.CARD_MALFORMED, f"subject has {len(values)} {what} attributes")
    return values[0] if values else ""


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
    return ()  # staff cards have no profession: policies deny them by idNat type


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
    return CardHolder(
        idnat=idnat,
        surname=surname,
        given_name=given_name,
        professions=_professions(subject, idnat),
        serial_hex=serial_hex,
        issuer=issuer,
        not_before=not_before,
        not_after=not_after,
    )
