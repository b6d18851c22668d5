"""The ``ecps`` settings section: optional, validated with file/line like the rest, secrets from ${ENV}."""

from __future__ import annotations

from pathlib import Path

import pytest

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
