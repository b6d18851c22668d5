"""The project's single python-pkcs11 adapter: SoftHSM test cards, card signing for the card client.

Nothing else imports ``pkcs11``. PINs are passed through, never logged or put in exception messages.
A PKCS#11 module is loaded once per process; SoftHSM reads ``SOFTHSM2_CONF`` when it initialises, so a token
created after loading is invisible until :func:`refresh_module` (C_Finalize + C_Initialize) runs.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature, encode_named_curve_parameters
from pkcs11.util.x509 import decode_x509_certificate

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Module

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
KeyKind = Literal["rsa", "ec"]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_modules: dict[str, Pkcs11Module] = {}
_modules_lock = threading.Lock()


class TokenError(Exception):
    """A token, key or certificate is missing, or the module refused an operation."""


@dataclass(frozen=True, slots=True)
class TokenCertificate:
    label: str
    key_id: bytes
    der: bytes


@dataclass(frozen=True, slots=True)
class TokenInfo:
    label: str
    serial: str
    certificates: tuple[TokenCertificate, ...]


def load_module(module_path: str = SOFTHSM_MODULE) -> Pkcs11Module:
    """The process-wide handle of a PKCS#11 module (loaded on first use)."""
    with _modules_lock:
        if module_path not in _modules:
            try:
                _modules[module_path] = pkcs11.lib(module_path)
            except pkcs11.PKCS11Error as error:
                # SoftHSM's own initialisation failure (e.g. SOFTHSM2_CONF naming no file) has no message.
                reason = str(error) or type(error).__name__
                raise TokenError(f"cannot load the PKCS#11 module {module_path}: {reason}") from None
        return _modules[module_path]


def refresh_module(module_path: str = SOFTHSM_MODULE) -> None:
    """Re-initialise the module so that it sees tokens (and a SOFTHSM2_CONF) set up after loading.

    Sessions opened before are invalidated: call it only between operations.
    """
    load_module(module_path).reinitialize()


def _find_token(label: str, module_path: str) -> pkcs11.Token:
    lib = load_module(module_path)
    for attempt in range(2):
        try:
            return lib.get_token(token_label=label)
        except pkcs11.NoSuchToken:
            if attempt:
                break
            lib.reinitialize()  # the token may have been created after the module was loaded
        except pkcs11.MultipleTokensReturned:
            raise TokenError(f"several tokens are labelled {label!r} in {module_path}") from None
    raise TokenError(f"no token labelled {label!r} in {module_path}")


@contextmanager
def open_session(
    token_label: str, pin: str | None = None, module_path: str = SOFTHSM_MODULE, rw: bool = False
) -> Iterator[pkcs11.Session]:
    token = _find_token(token_label, module_path)
    try:
        session = token.open(user_pin=pin, rw=rw)
    except pkcs11.PKCS11Error as error:
        # The type name only: never echo arguments (the PIN).
        raise TokenError(f"cannot open token {token_label!r}: {type(error).__name__}") from None
    try:
        yield session
    finally:
        session.close()


def init_softhsm_token(label: str, so_pin: str, pin: str, env: dict[str, str]) -> None:
    """Initialise a new SoftHSM token in the first free slot (``env`` carries SOFTHSM2_CONF)."""
    args = ["--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin]
    _softhsm_util(args, env, f"initialise token {label!r}")


def delete_softhsm_token(label: str, env: dict[str, str]) -> None:
    """Delete the SoftHSM token ``label`` (``env`` carries SOFTHSM2_CONF)."""
    _softhsm_util(["--delete-token", "--token", label], env, f"delete token {label!r}")


def _softhsm_util(args: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(
        ["softhsm2-util", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise TokenError(f"softhsm2-util could not {what}: {result.stderr.strip()}")


def _private_key_template(private: bool) -> dict[Attribute, Any]:
    # Sensitive and non-extractable like a real card. private=False lets headless browsers use the key
    # without a PIN dialog (docs/card.md, "A browser with a test card"): usable without login, but it can never
    # leave the token.
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: private,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
    }


def _to_cryptography(public_key: pkcs11.PublicKey) -> PublicKey:
    if public_key.key_type == KeyType.RSA:
        modulus = int.from_bytes(public_key[Attribute.MODULUS], "big")
        exponent = int.from_bytes(public_key[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    loaded = serialization.load_der_public_key(encode_ec_public_key(public_key))
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    return loaded


def generate_key_pair(
    token_label: str,
    pin: str,
    key_label: str,
    key_id: bytes,
    kind: KeyKind = "rsa",
    module_path: str = SOFTHSM_MODULE,
    *,
    private: bool = False,
) -> PublicKey:
    """Generate a key pair ON the token (RSA-2048 or EC P-256) and return its public key.

    ``private=True`` makes the key usable only after login with the PIN, like a real CPS card.
    """
    with open_session(token_label, pin, module_path, rw=True) as session:
        options: dict[str, Any] = {
            "id": key_id,
            "label": key_label,
            "store": True,
            "private_template": _private_key_template(private),
            "public_template": {Attribute.TOKEN: True, Attribute.VERIFY: True},
        }
        if kind == "rsa":
            public, _ = session.generate_keypair(KeyType.RSA, 2048, **options)
        else:
            parameters = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
            )
            public, _ = parameters.generate_keypair(**options)
        return _to_cryptography(public)


def read_public_key(
    token_label: str, key_id: bytes, pin: str | None = None, module_path: str = SOFTHSM_MODULE
) -> PublicKey:
    with open_session(token_label, pin, module_path) as session:
        return _to_cryptography(
            cast(pkcs11.PublicKey, session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=key_id))
        )


def store_certificate(
    token_label: str,
    pin: str,
    certificate_der: bytes,
    key_id: bytes,
    label: str,
    module_path: str = SOFTHSM_MODULE,
) -> None:
    """Store a certificate with the key pair's CKA_ID, so engines, NSS and pkcs11-tool pair them."""
    attributes = decode_x509_certificate(certificate_der)
    attributes.update({Attribute.ID: key_id, Attribute.LABEL: label, Attribute.TOKEN: True})
    with open_session(token_label, pin, module_path, rw=True) as session:
        session.create_object(attributes)


def _certificates(session: pkcs11.Session) -> tuple[TokenCertificate, ...]:
    found = session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})
    return tuple(
        TokenCertificate(
            label=obj[Attribute.LABEL], key_id=bytes(obj[Attribute.ID]), der=bytes(obj[Attribute.VALUE])
        )
        for obj in found
    )


def list_tokens(module_path: str = SOFTHSM_MODULE) -> list[TokenInfo]:
    """Every initialised token with its (public) certificates; no PIN needed."""
    lib = load_module(module_path)
    lib.reinitialize()  # pick up tokens created since the module was loaded
    infos = []
    for token in lib.get_tokens():
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue  # SoftHSM always offers one free, uninitialised slot
        with token.open() as session:
            infos.append(
                TokenInfo(label=token.label, serial=str(token.serial), certificates=_certificates(session))
            )
    return infos


def token_certificates(token_label: str, module_path: str = SOFTHSM_MODULE) -> tuple[TokenCertificate, ...]:
    """Every certificate on the token, in the order the module lists them (not the order they were written)."""
    with open_session(token_label, None, module_path) as session:
        return _certificates(session)


def sign(
    token_label: str,
    data: bytes,
    key_id: bytes,
    pin: str | None = None,
    module_path: str = SOFTHSM_MODULE,
) -> bytes:
    """Sign ``data`` with the token key: RSA PKCS#1 v1.5 SHA-256, or ECDSA SHA-256 (DER-encoded).

    ``pin`` may be None when the key is not private (SoftHSM test cards); real cards need it.
    """
    with open_session(token_label, pin, module_path) as session:
        try:
            return _sign_with(session, token_label, data, key_id)
        except pkcs11.PKCS11Error as error:
            # NoSuchKey also when the key is private and no PIN was given: the token hides it.
            raise TokenError(f"cannot sign with token {token_label!r}: {type(error).__name__}") from None


def _sign_with(session: pkcs11.Session, token_label: str, data: bytes, key_id: bytes) -> bytes:
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
    if not isinstance(key, pkcs11.SignMixin):
        raise TokenError(f"the key on token {token_label!r} cannot sign")
    if key.key_type == KeyType.RSA:
        return bytes(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
    if key.key_type == KeyType.EC:
        # SoftHSM 2.6 has no CKM_ECDSA_SHA256: hash here, sign the digest raw, DER-encode (r, s).
        raw = key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
        return bytes(encode_ecdsa_signature(raw))
    raise TokenError(f"unsupported key type {key.key_type!r} on token {token_label!r}")
