"""SoftHSM2 tokens standing in for CPS cards: FOR DEVELOPMENT AND TESTS ONLY.

Each card is a token of a project-local SoftHSM (``<base_dir>/softhsm/softhsm2.conf``, never the system token
directory) holding a key pair generated ON the token and its certificate (same CKA_ID), issued by the dev PKI
of :mod:`gateway.devtools.pki` in ``base_dir``. The certificate is also written to
``<base_dir>/softhsm/<label>.pem`` for curl ``--cert``.

SoftHSM reads SOFTHSM2_CONF when the module initialises, once per process: the functions here set it in
``os.environ`` for the current process (and :func:`softhsm_env` gives it to child processes).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import pkcs11 as tokens
from gateway.authn.card.certificate import PROFESSION_LABELS
from gateway.devtools.pki import (
    CardUsage,
    CardVariant,
    check_card_holder,
    ensure_dev_pki,
    issue_card_certificate,
    revoke,
)
from gateway.identity import CardKind

SO_PIN = "12345678"  # dev tokens only


@dataclass(frozen=True, slots=True)
class Card:
    label: str
    key_label: str
    key_id: bytes
    certificate: x509.Certificate
    pem_path: Path
    #: The CKA_ID of the second (signature) key pair of a two-key card, None on a one-key card.
    signature_key_id: bytes | None = None

    @property
    def idnat(self) -> str:
        return str(self.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def softhsm_dir(base_dir: Path) -> Path:
    return base_dir / "softhsm"


def ensure_softhsm_config(base_dir: Path) -> Path:
    """Write the project-local SoftHSM config (once) and return its path."""
    directory = softhsm_dir(base_dir)
    (directory / "tokens").mkdir(parents=True, exist_ok=True)
    config = directory / "softhsm2.conf"
    if not config.exists():
        config.write_text(
            f"directories.tokendir = {(directory / 'tokens').resolve()}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n",
            encoding="utf-8",
        )
    return config


def softhsm_env(base_dir: Path) -> dict[str, str]:
    """Environment for child processes (curl, nginx, chromium, pkcs11-tool) that use these cards."""
    return dict(os.environ, SOFTHSM2_CONF=str(ensure_softhsm_config(base_dir).resolve()))


def use_softhsm(base_dir: Path, module_path: str = tokens.SOFTHSM_MODULE) -> None:
    """Point this process's SoftHSM at ``base_dir`` (re-initialising the module if it changed)."""
    config = str(ensure_softhsm_config(base_dir).resolve())
    if os.environ.get("SOFTHSM2_CONF") != config:
        os.environ["SOFTHSM2_CONF"] = config
        tokens.refresh_module(module_path)


def create_card(
    base_dir: Path,
    label: str,
    idnat: str,
    surname: str,
    given: str,
    profession_code: str,
    pin: str = "1234",
    variant: CardVariant | None = None,
    *,
    kind: CardKind = CardKind.CPS,
    structure_name: str = "",
    signature_key: bool = False,
    key_kind: tokens.KeyKind = "rsa",
    now: datetime | None = None,
    module_path: str = tokens.SOFTHSM_MODULE,
) -> Card:
    """Create a test card: token, key pair on it, certificate from the dev PKI, stored on it.

    ``kind``: CPS (a professional, ``profession_code``), CPE (establishment staff, idNat ``3<FINESS>/<no>``) or
    CPA (organisation, idNat ``4<SIREN>/<no>`` or ``5<SIRET>/<no>``), each in its real subject layout;
    ``structure_name`` is a CPE's or CPA's structure. ``signature_key`` adds a second key pair with a
    non-repudiation certificate, like a CPS3 card. ``variant``: None, "expired", "revoked",
    "not-yet-valid" or "wrong-ca".
    """
    if kind is CardKind.CPS and profession_code not in PROFESSION_LABELS:
        raise ValueError(f"unknown TRE_G15 profession code {profession_code!r}")
    if any(info.label == label for info in list_cards(base_dir, module_path)):
        raise ValueError(f"a card labelled {label!r} already exists")
    pki = ensure_dev_pki(base_dir, now)
    title = PROFESSION_LABELS[profession_code] if kind is CardKind.CPS else None
    now = now or datetime.now(UTC)

    def key_pair(usage: CardUsage) -> tuple[bytes, x509.Certificate]:
        key_id = secrets.token_bytes(8)
        public_key = tokens.generate_key_pair(
            label, pin, f"{label} {usage} key", key_id, key_kind, module_path
        )
        certificate = issue_card_certificate(
            pki, public_key, idnat, surname, given, title,
            kind=kind, structure_name=structure_name, usage=usage, variant=variant, now=now,
        )  # fmt: skip
        der = certificate.public_bytes(serialization.Encoding.DER)
        tokens.store_certificate(label, pin, der, key_id, f"{label} {usage} certificate", module_path)
        return key_id, certificate

    check_card_holder(idnat, kind, structure_name)  # before a token exists: no half-made card
    tokens.init_softhsm_token(label, SO_PIN, pin, softhsm_env(base_dir))
    signature_key_id = key_pair("signature")[0] if signature_key else None
    key_id, certificate = key_pair("authentication")
    pem_path = softhsm_dir(base_dir) / f"{label}.pem"
    pem_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Card(label, f"{label} authentication key", key_id, certificate, pem_path, signature_key_id)


def delete_card(base_dir: Path, label: str, module_path: str = tokens.SOFTHSM_MODULE) -> None:
    """Remove the test card ``label`` of this base_dir's SoftHSM: its token and its certificate file."""
    tokens.delete_softhsm_token(label, softhsm_env(base_dir))
    (softhsm_dir(base_dir) / f"{label}.pem").unlink(missing_ok=True)
    use_softhsm(base_dir, module_path)
    tokens.refresh_module(module_path)  # this process must stop seeing the deleted token


def list_cards(base_dir: Path, module_path: str = tokens.SOFTHSM_MODULE) -> list[tokens.TokenInfo]:
    """The tokens of this base_dir's SoftHSM and their certificates."""
    use_softhsm(base_dir, module_path)
    return tokens.list_tokens(module_path)


def revoke_card(base_dir: Path, label: str, now: datetime | None = None) -> list[x509.Certificate]:
    """List the certificates of the card ``label`` in the dev PKI's CRL (re-signed); returns them.

    A running gateway acts on it at its next CRL refresh (``card.crl_refresh``): it refuses the card and ends
    the sessions the card opened; a gateway started afterwards refuses it at once and ends such a session at
    its next use.
    """
    tokens_found = [info for info in list_cards(base_dir) if info.label == label]
    if not tokens_found:
        raise ValueError(f"no card labelled {label!r} in {softhsm_dir(base_dir)}")
    pki = ensure_dev_pki(base_dir, now)
    certificates = [x509.load_der_x509_certificate(c.der) for c in tokens_found[0].certificates]
    for certificate in certificates:
        revoke(pki, certificate.serial_number, now or datetime.now(UTC))
    return certificates
