"""A real browser logs in with e-CPS: portal page, login page, PSC stand-in "phone", back on the page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.ecps import DOCTOR, EcpsWorld, running_ecps_world

pytestmark = pytest.mark.browser

TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path
) -> Iterator[EcpsWorld]:
    with running_ecps_world(tmp_path_factory.mktemp("ecps-browser"), upstream_url, assertion_key) as world:
        yield world


def test_ecps_login_in_a_real_browser(world: EcpsWorld, tmp_path: Path) -> None:
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        try:
            context = browser.new_context(locale="fr-FR")
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            protected = world.gateway_url + "/patients/180017512345678"

            page.goto(protected)
            assert page.locator("h1").inner_text() == "Identification requise"
            page.click("#login-ecps")

            # The stand-in's "phone": approve as the doctor.
            page.wait_for_url(world.psc.issuer + "/**")
            page.locator("tr", has_text=DOCTOR).get_by_role("button", name="Approuver").click()

            page.wait_for_url(protected)
            assert "hello from the portal" in page.content()
            cookies = {c["name"]: c for c in context.cookies(world.gateway_url)}
            assert (
                cookies["__Host-gateway-session"]["secure"] and cookies["__Host-gateway-session"]["httpOnly"]
            )

            # Logout (CSRF-protected form) ends the PSC session too and comes back to the portal.
            page.goto(world.gateway_url + "/.gateway/logout")
            page.click("#logout")
            page.wait_for_url(world.gateway_url + "/?state=*")
            assert "__Host-gateway-session" not in {c["name"] for c in context.cookies(world.gateway_url)}
        finally:
            browser.close()
