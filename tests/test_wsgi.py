"""WSGI-level behaviour around the app: Strict-Transport-Security on the gateway's https origins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from gateway.devtools.pki import DevPki
from tests.support.apps import gateway_app
from tests.support.card_stack import card_settings
from tests.support.pki import dev_pki  # noqa: F401 - fixture

HSTS = "max-age=31536000"


@pytest.fixture
def https_app(
    tmp_path: Path,
    upstream_url: str,
    assertion_key: Path,
    dev_pki: DevPki,  # noqa: F811 - the fixture imported above
) -> Iterator[Flask]:
    extra = {
        "server": {"public_origin": "https://portail.example.fr"},
        "card": card_settings(dev_pki, "https://carte.example.fr:8443"),
    }
    with gateway_app(tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, extra=extra) as app:
        yield app


@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("portail.example.fr", "/hello"),  # a proxied portal page
        ("portail.example.fr", "/patients/1"),  # a refusal page
        ("PORTAIL.example.fr", "/.gateway/login"),  # a gateway page
        ("portail.example.fr", "/.gateway/card/start"),  # a login redirect
        ("carte.example.fr:8443", "/.gateway/login/card"),  # the card host
        ("carte.example.fr", "/.gateway/login/card"),  # the card host, through nginx's $host
    ],
)
def test_every_answer_on_an_https_origin_carries_hsts(https_app: Flask, host: str, path: str) -> None:
    response = https_app.test_client().get(path, headers={"Host": host})
    assert response.headers.get_all("Strict-Transport-Security") == [HSTS]


def test_no_hsts_for_other_hosts_or_plain_http_origins(
    https_app: Flask, tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    assert "Strict-Transport-Security" not in https_app.test_client().get("/hello").headers
    with gateway_app(tmp_path / "plain", upstream_url=upstream_url, assertion_key=assertion_key) as plain:
        assert "Strict-Transport-Security" not in plain.test_client().get("/hello").headers
