"""A real headless Chromium logs in with a SoftHSM card through nginx's card-login host (recipes.md).

The three settings that keep Chromium from hanging on a dialog nobody sees: the card module in the NSS db of
a private $HOME (FRIENDLY once the token exists), an AutoSelectCertificateForUrls enterprise policy for the
card host (port included), and a card key with CKA_PRIVATE=False (no PIN prompt).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from gateway.devtools.cards import create_card, softhsm_env, use_softhsm
from gateway.devtools.pki import INTERMEDIATE_CN, DevPki, ensure_dev_pki
from gateway.pkcs11 import SOFTHSM_MODULE
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.card_stack import CardStack, card_stack
from tests.support.openssl_pki import softhsm_config

POLICY_DIR = Path("/etc/chromium/policies/managed")
POLICY_FILE = POLICY_DIR / "cps-gateway-card-test.json"
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


def _nss_home(pki: DevPki, home: Path) -> dict[str, str]:
    env = dict(softhsm_env(pki.base_dir), HOME=str(home))
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    db = f"sql:{nssdb}"

    def run(*argv: str) -> None:
        subprocess.run(argv, env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)

    run("certutil", "-N", "--empty-password", "-d", db)
    run("modutil", "-force", "-dbdir", db, "-add", "softhsm", "-libfile", SOFTHSM_MODULE)
    run("modutil", "-force", "-dbdir", db, "-default", "softhsm", "-mechanisms", "FRIENDLY")
    run(
        "certutil",
        "-A",
        "-d",
        db,
        "-n",
        "dev-server-ca",
        "-t",
        "C,,",
        "-i",
        str(pki.base_dir / "server-ca.pem"),
    )
    return env


@pytest.fixture
def auto_select_policy() -> Iterator[None]:
    yield
    POLICY_FILE.unlink(missing_ok=True)


def _write_policy(card_origin: str) -> None:
    rule = {"pattern": card_origin, "filter": {"ISSUER": {"CN": INTERMEDIATE_CN}}}
    POLICY_DIR.mkdir(parents=True, exist_ok=True)
    POLICY_FILE.write_text(json.dumps({"AutoSelectCertificateForUrls": [json.dumps(rule)]}))


def _browse(stack: CardStack, env: dict[str, str], profile: Path) -> str:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            env=env,
            headless=True,
            timeout=20_000,
        )
        try:
            page = context.new_page()
            page.set_default_navigation_timeout(15_000)
            # As a professional does: the protected page, its "Carte CPS" button (the main host binds the
            # browser, then the card host asks for the card), back on the page with the session.
            response = page.goto(f"{stack.gateway_url}{CARD_ROUTE}")
            assert response is not None and response.status == 401
            page.click("#login-card")
            page.wait_for_url(f"{stack.gateway_url}{CARD_ROUTE}")
            assert page.url.startswith(f"{stack.gateway_url}{CARD_ROUTE}"), page.url
            return str(page.inner_text("body"))
        finally:
            context.close()


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
    auto_select_policy: None,
) -> None:
    pki: DevPki = request.getfixturevalue(card_pki)
    env = _nss_home(pki, tmp_path / "home")
    # As in the demo: the card host's nginx is not a trusted proxy, so the card host and the main host see
    # different client addresses; the hand-off is bound to the browser, not to an address.
    with card_stack(
        tmp_path / "stack", pki, upstream_url, assertion_key, nginx_is_a_trusted_proxy=False
    ) as stack:
        _write_policy(stack.card_origin)
        page = json.loads(_browse(stack, env, tmp_path / "profile"))
    assert page["path"] == CARD_ROUTE
    assert page["headers"]["x-gateway-subject"] == idnat
    assert page["headers"]["x-gateway-auth-method"] == "card"
