"""The ``ecps`` settings section: optional, validated with file/line like the rest, secrets from ${ENV}."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config_source import ConfigErrors
from gateway.settings import DEFAULT_SETTINGS_FILE, documented_keys, load_settings
from tests.support.config import write_config

ECPS = {
    "metadata_url": "https://auth.esw.esante.gouv.fr/auth/realms/esante-wallet/.well-known/wallet-openid-configuration",
    "client_id": "my-service",
    "client_secret": "${PSC_CLIENT_SECRET}",
    "redirect_uri": "https://portal.example.fr/.gateway/ecps/callback",
    "login_cookie_secret": "${LOGIN_COOKIE_SECRET}",
}
ENV = {"PSC_CLIENT_SECRET": "from-the-environment", "LOGIN_COOKIE_SECRET": "k" * 48}


def config_with(tmp_path: Path, assertion_key: Path, ecps: dict[str, object] | None) -> Path:
    extra = {"ecps": ecps} if ecps is not None else None
    return write_config(tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key, extra=extra)


def test_ecps_is_off_when_absent(tmp_path: Path, assertion_key: Path) -> None:
    assert load_settings(config_with(tmp_path, assertion_key, None), ENV).ecps is None


def test_defaults_and_environment_references(tmp_path: Path, assertion_key: Path) -> None:
    ecps = load_settings(config_with(tmp_path, assertion_key, ECPS), ENV).ecps
    assert ecps is not None
    assert ecps.client_secret == "from-the-environment"
    assert ecps.login_cookie_secret == "k" * 48
    assert (ecps.scopes, ecps.acr_values, ecps.accept_missing_acr) == ("openid scope_all", "eidas1", False)
    assert ecps.accepted_acr == ["eidas1", "eidas2", "eidas3"]


def test_errors_name_the_file_and_line(tmp_path: Path, assertion_key: Path) -> None:
    broken = {
        **ECPS,
        "client_auth": "client_secret_jwt",
        "login_cookie_secret": "short",
        "scopes": "scope_all",
    }
    path = config_with(tmp_path, assertion_key, broken)
    with pytest.raises(ConfigErrors) as caught:
        load_settings(path, ENV)
    messages = [str(error) for error in caught.value.errors]
    assert any("ecps.client_auth" in m and f"{path}:" in m for m in messages), messages
    assert any("ecps.login_cookie_secret" in m for m in messages), messages
    assert any("ecps.scopes" in m for m in messages), messages


def test_private_key_jwt_needs_a_key_file(tmp_path: Path, assertion_key: Path) -> None:
    path = config_with(tmp_path, assertion_key, {**ECPS, "client_auth": "private_key_jwt"})
    with pytest.raises(ConfigErrors, match="private_key_file"):
        load_settings(path, ENV)


def test_every_ecps_key_is_documented() -> None:
    rows = {key: description for key, _, description in documented_keys() if key.startswith("ecps.")}
    assert {"ecps.metadata_url", "ecps.client_secret", "ecps.login_cookie_secret"} <= set(rows)
    assert all(rows.values())


def test_the_default_file_enables_ecps_against_the_stand_in() -> None:
    ecps = load_settings(DEFAULT_SETTINGS_FILE, require_files=False).ecps
    assert ecps is not None and ecps.metadata_url.startswith("http://127.0.0.1:8082/")


def write_key(path: Path, key: PrivateKeyTypes, password: bytes | None = None) -> Path:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


def private_key_jwt(path: Path) -> dict[str, object]:
    return {**ECPS, "client_auth": "private_key_jwt", "client_secret": None, "private_key_file": str(path)}


@pytest.mark.parametrize("curve_or_size", ["P-256", 2048])
def test_private_key_jwt_takes_an_ec_p256_or_rsa_key(
    tmp_path: Path, assertion_key: Path, curve_or_size: object
) -> None:
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if curve_or_size == "P-256"
        else rsa.generate_private_key(65537, 2048)
    )
    path = config_with(tmp_path, assertion_key, private_key_jwt(write_key(tmp_path / "client.key", key)))
    ecps = load_settings(path, ENV).ecps
    assert ecps is not None and ecps.private_key_file == tmp_path / "client.key"


@pytest.mark.parametrize(
    "key, password, message",
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), None, "cannot sign ES256: use P-256"),
        (lambda: rsa.generate_private_key(65537, 1024), None, "too short"),  # noqa: S505 - the point
        (ed25519.Ed25519PrivateKey.generate, None, "cannot sign RS256 or ES256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), b"secret", "the key is encrypted"),
    ],
    ids=["ec-p384", "rsa-1024", "ed25519", "encrypted"],
)
def test_check_refuses_a_client_assertion_key_that_cannot_work(
    tmp_path: Path, assertion_key: Path, key: Any, password: bytes | None, message: str
) -> None:
    path = config_with(
        tmp_path, assertion_key, private_key_jwt(write_key(tmp_path / "client.key", key(), password))
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **ENV},
    )
    assert result.returncode == 2, result.stdout
    assert "ecps.private_key_file" in result.stderr and message in result.stderr, result.stderr


def client_certificate(
    directory: Path,
    *,
    days: tuple[int, int] = (-1, 30),
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    other_key: bool = False,
) -> dict[str, object]:
    """tls_client_auth settings with a self-signed certificate (validity in days from now) and its key file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "passerelle.portail.test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "client.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    write_key(directory / "client.key", ec.generate_private_key(ec.SECP256R1()) if other_key else key)
    return {
        **ECPS,
        "client_auth": "tls_client_auth",
        "client_secret": None,
        "client_certificate_file": str(directory / "client.pem"),
        "client_certificate_key_file": str(directory / "client.key"),
    }


def test_tls_client_auth_takes_a_certificate_and_its_key(tmp_path: Path, assertion_key: Path) -> None:
    ecps = load_settings(config_with(tmp_path, assertion_key, client_certificate(tmp_path)), ENV).ecps
    assert ecps is not None and ecps.client_auth == "tls_client_auth"


@pytest.mark.parametrize(
    "certificate, message",
    [
        ({"other_key": True}, "is not the private key of"),
        ({"days": (-60, -1)}, "is not valid now"),
        ({"days": (2, 30)}, "is not valid now"),
        ({"usage": ExtendedKeyUsageOID.SERVER_AUTH}, "lacks the TLS client authentication usage"),
    ],
    ids=["key-of-another-certificate", "expired", "not-yet-valid", "server-only"],
)
def test_tls_client_auth_refuses_a_certificate_that_cannot_work(
    tmp_path: Path, assertion_key: Path, certificate: dict[str, Any], message: str
) -> None:
    path = config_with(tmp_path, assertion_key, client_certificate(tmp_path, **certificate))
    with pytest.raises(ConfigErrors, match=message) as caught:
        load_settings(path, ENV)
    assert "ecps" in str(caught.value.errors[0])


def test_tls_client_auth_needs_both_files(tmp_path: Path, assertion_key: Path) -> None:
    settings = {**client_certificate(tmp_path), "client_certificate_key_file": None}
    with pytest.raises(ConfigErrors, match="needs client_certificate_file and client_certificate_key_file"):
        load_settings(config_with(tmp_path, assertion_key, settings), ENV)
