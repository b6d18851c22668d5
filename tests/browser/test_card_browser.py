"""A real headless Chromium logs in with a SoftHSM card through nginx's card-login host.

The settings that keep Chromium from hanging on a dialog nobody sees are made by what `gateway dev browser`
runs (gateway/devtools/browser.py): the card module in the NSS db of a private $HOME (FRIENDLY once the token
exists), an AutoSelectCertificateForUrls enterprise policy for the card host (port included); and the card
key has CKA_PRIVATE=False (no PIN prompt).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.devtools.browser import set_up_browser
from gateway.devtools.cards import create_card, softhsm_env, use_softhsm
from gateway.devtools.pki import DevPki, ensure_dev_pki
from gateway.pkcs11 import SOFTHSM_MODULE
from tests.support.browser import chromium_policies, log_in_with_the_card_button
from tests.support.card_stack import card_stack
from tests.support.openssl_pki import softhsm_config

CARD_ROUTE = "/echo/card/browser"

# No skip when a component is missing: `make test` installs nginx, Chromium and the NSS tools.
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser_pki(dev_pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevPki]:
    """A copy of the session PKI (same CA keys) whose SoftHSM holds ONE card: nothing for Chromium to choose."""
    copy = tmp_path_factory.mktemp("browser-pki") / "pki"
    shutil.copytree(dev_pki.base_dir, copy, ignore=shutil.ignore_patterns("softhsm"))
    pki = ensure_dev_pki(copy)
    try:
        create_card(copy, "browser-doctor", "810002813850", "BERNARD", "CLAIRE", "10")  # private=False key
    finally:
        use_softhsm(dev_pki.base_dir)  # this process's other tests use the session cards
    yield pki


#: What card middleware without RSA-PSS offers (e.g. an older Cryptolib): PKCS#1 v1.5 signatures only.
PSS_MECHANISMS = (
    "CKM_RSA_PKCS_PSS",
    "CKM_SHA1_RSA_PKCS_PSS",
    "CKM_SHA224_RSA_PKCS_PSS",
    "CKM_SHA256_RSA_PKCS_PSS",
    "CKM_SHA384_RSA_PKCS_PSS",
    "CKM_SHA512_RSA_PKCS_PSS",
)


@pytest.fixture(scope="module")
def pss_less_pki(dev_pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevPki]:
    """Like browser_pki, but its SoftHSM hides every RSA-PSS mechanism (softhsm2.conf slots.mechanisms)."""
    copy = tmp_path_factory.mktemp("pss-less-pki") / "pki"
    shutil.copytree(dev_pki.base_dir, copy, ignore=shutil.ignore_patterns("softhsm"))
    pki = ensure_dev_pki(copy)
    softhsm_config(copy / "softhsm", disabled_mechanisms=PSS_MECHANISMS)
    try:
        create_card(copy, "pss-less-doctor", "810002813851", "FABRE", "LEA", "10")  # RSA-2048, private=False
    finally:
        use_softhsm(dev_pki.base_dir)
    mechanisms = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--list-mechanisms"],
        env=softhsm_env(copy),
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    ).stdout
    assert "RSA-PKCS," in mechanisms and "PSS" not in mechanisms, mechanisms
    yield pki


@pytest.mark.parametrize(
    ("card_pki", "idnat"),
    [
        ("browser_pki", "810002813850"),
        # TLS 1.3 allows only RSA-PSS in a client's CertificateVerify, and Chromium does not retry with TLS 1.2:
        # over 1.3 this card fails with ERR_SSL_CLIENT_AUTH_NO_COMMON_ALGORITHMS. The shipped card-host
        # template negotiates TLS 1.2, where PKCS#1 v1.5 signatures are allowed.
        ("pss_less_pki", "810002813851"),
    ],
)
def test_chromium_logs_in_with_the_card_and_sees_the_protected_page(
    request: pytest.FixtureRequest,
    card_pki: str,
    idnat: str,
    upstream_url: str,
    assertion_key: Path,
    tmp_path: Path,
) -> None:
    pki: DevPki = request.getfixturevalue(card_pki)
    home = tmp_path / "home"
    env = dict(softhsm_env(pki.base_dir), HOME=str(home))
    # As in the demo: the card host's nginx is not a trusted proxy, so the card host and the main host see
    # different client addresses; the hand-off is bound to the browser, not to an address.
    with (
        card_stack(
            tmp_path / "stack", pki, upstream_url, assertion_key, nginx_is_a_trusted_proxy=False
        ) as stack,
        chromium_policies(),
    ):
        # What `gateway dev browser` does: NSS database, FRIENDLY slots, dev server CA, auto-select policy.
        set_up_browser(pki.base_dir, stack.card_origin, home / ".pki" / "nssdb")
        text = log_in_with_the_card_button(stack.gateway_url, CARD_ROUTE, env, tmp_path / "profile")
        page = json.loads(text)
    assert page["path"] == CARD_ROUTE
    assert page["headers"]["x-gateway-subject"] == idnat
    assert page["headers"]["x-gateway-auth-method"] == "card"
