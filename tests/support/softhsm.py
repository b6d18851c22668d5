"""SoftHSM test cards, created once per session in a project-local SoftHSM (never the system tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.devtools.cards import Card, create_card, use_softhsm
from gateway.devtools.pki import DevPki
from gateway.identity import CardKind

PIN = "1234"


@dataclass(frozen=True)
class CardSet:
    base_dir: Path
    cards: dict[str, Card]

    def __getitem__(self, name: str) -> Card:
        return self.cards[name]


_cards: CardSet | None = None

#: name -> (idnat, surname, given name, profession code, variant, key kind)
CARD_SPECS: dict[str, tuple[str, str, str, str, str | None, str]] = {
    "doctor": ("810002813839", "DUPONT", "JEAN", "10", None, "rsa"),
    "pharmacist-ec": ("810002813840", "MARTIN", "ANNE", "21", None, "ec"),
    "expired": ("810002813841", "DURAND", "PAUL", "10", "expired", "rsa"),
    "revoked": ("810002813842", "LEROY", "MARIE", "60", "revoked", "rsa"),
    "not-yet-valid": ("810002813843", "MOREAU", "LUC", "40", "not-yet-valid", "rsa"),
    "wrong-ca": ("810002813844", "SIMON", "EVE", "10", "wrong-ca", "rsa"),
    "staff": ("3750000001/00042", "PETIT", "JULIE", "10", None, "rsa"),
}
#: Cards that are not a professional's CPS: name -> (kind, structure name).
STRUCTURE_CARDS: dict[str, tuple[CardKind, str]] = {"staff": (CardKind.CPE, "CLINIQUE DES LILAS")}


def session_cards(pki: DevPki) -> CardSet:
    """The cards live next to the session PKI (cards.create_card issues from the PKI in base_dir)."""
    global _cards
    if _cards is None:
        use_softhsm(pki.base_dir)
        cards = {
            name: create_card(
                pki.base_dir,
                f"test-{name}",
                idnat,
                surname,
                given,
                code,
                PIN,
                variant,
                key_kind=kind,  # type: ignore[arg-type]
                kind=STRUCTURE_CARDS.get(name, (CardKind.CPS, ""))[0],
                structure_name=STRUCTURE_CARDS.get(name, (CardKind.CPS, ""))[1],
            )
            for name, (idnat, surname, given, code, variant, kind) in CARD_SPECS.items()
        }
        _cards = CardSet(pki.base_dir, cards)
    return _cards


@pytest.fixture(scope="session")
def softhsm_cards(dev_pki: DevPki) -> CardSet:
    return session_cards(dev_pki)
