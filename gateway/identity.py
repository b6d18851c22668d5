"""Who the gateway let in: plain data shared by every login method, the policy engine and the proxy."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class LoginMethod(enum.StrEnum):
    """How the professional proved who they are to the gateway."""

    CARD = "card"  # CPS smart card: TLS client certificate or PKCS#11 challenge
    ECPS = "ecps"  # Pro Santé Connect (e-CPS app, or the card at PSC: see Identity.auth_mode)


class CardKind(enum.StrEnum):
    """Which card of the CPS family (ANS) a card login used: who holds it."""

    CPS = "CPS"  # Carte de Professionnel de Santé: a health professional, professions from the certificate
    CPE = "CPE"  # Carte de Personnel d'Établissement: staff of a health or social structure, no profession
    CPA = "CPA"  # Carte de Personnel Autorisé (and director cards): acts for an organisation, no profession


#: Card kinds that designate an establishment's staff or an organisation, not a health professional.
STAFF_OR_ORGANISATION_CARDS = frozenset({CardKind.CPE, CardKind.CPA})

# First digit of an idNat (domain.md): who the identifier designates.
ID_TYPE_ADELI = "0"
ID_TYPE_ADELI_PRACTICE = "1"
ID_TYPE_FINESS = "3"
ID_TYPE_SIREN = "4"
ID_TYPE_SIRET = "5"
ID_TYPE_RPPS_PRACTICE = "6"
ID_TYPE_RPPS = "8"
#: idNat types that designate an establishment's staff or an organisation, not a health professional.
STAFF_OR_ORGANISATION_ID_TYPES = frozenset({ID_TYPE_FINESS, ID_TYPE_SIREN, ID_TYPE_SIRET})
#: ``auth_time`` when the login method did not say when the professional authenticated (PSC may omit it when
#: no max_age was asked): the epoch, so the login counts as too old for any rule with a ``max_age``.
UNKNOWN_AUTH_TIME = 0.0


@dataclass(frozen=True, slots=True)
class Identity:
    """A professional after a successful strong login.

    ``auth_time`` is the POSIX time of the login itself (not of the session's last use): policies
    compare it with their ``max_age`` to ask for a fresh login (step-up). :data:`UNKNOWN_AUTH_TIME` when
    the provider did not say.
    """

    idnat: str
    method: LoginMethod
    auth_time: float
    surname: str = ""
    given_name: str = ""
    #: TRE_G15 profession codes ("10" Médecin, "21" Pharmacien, ...); a professional may hold several.
    professions: tuple[str, ...] = ()
    #: PSC ``authMode`` (e.g. "CARD") for e-CPS logins; "CARD" for direct card logins.
    auth_mode: str = ""
    #: PSC ``acr`` for e-CPS logins (e.g. "eidas1"); empty for card logins.
    acr: str = ""
    #: Card certificate serial (hex) and issuer, for card logins: audit and revocation follow-up.
    card_serial: str = ""
    card_issuer: str = ""
    #: Card logins: the kind of card (None for e-CPS logins).
    card_kind: CardKind | None = None
    #: Staff and organisation cards: the structure's idNat (before the ``/`` of the holder's), its name (the
    #: certificate's O) and the holder's number within it (after the ``/``). Empty for a professional.
    structure_id: str = ""
    structure_name: str = ""
    employee_id: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def id_type(self) -> str:
        """The idNat type digit (``8`` RPPS, ``0`` ADELI, ``3`` FINESS staff card...)."""
        return self.idnat[:1]

    @property
    def is_staff_or_organisation(self) -> bool:
        return self.card_kind in STAFF_OR_ORGANISATION_CARDS or self.id_type in STAFF_OR_ORGANISATION_ID_TYPES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["method"] = self.method.value
        data["professions"] = list(self.professions)
        data["card_kind"] = self.card_kind.value if self.card_kind else ""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        return cls(
            idnat=str(data["idnat"]),
            method=LoginMethod(data["method"]),
            auth_time=float(data["auth_time"]),
            surname=str(data.get("surname", "")),
            given_name=str(data.get("given_name", "")),
            professions=tuple(str(p) for p in data.get("professions", ())),
            auth_mode=str(data.get("auth_mode", "")),
            acr=str(data.get("acr", "")),
            card_serial=str(data.get("card_serial", "")),
            card_issuer=str(data.get("card_issuer", "")),
            card_kind=CardKind(data["card_kind"]) if data.get("card_kind") else None,
            structure_id=str(data.get("structure_id", "")),
            structure_name=str(data.get("structure_name", "")),
            employee_id=str(data.get("employee_id", "")),
            extra={str(k): str(v) for k, v in dict(data.get("extra", {})).items()},
        )
