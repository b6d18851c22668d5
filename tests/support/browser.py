"""Headless Chromium (Debian's package, driven by Playwright) as the tests launch it.

The flags keep it from reaching out to the network this machine does not have (background updates, sync,
QUIC) and from hanging on dialogs nobody sees (docs/card.md says which settings). Never `playwright install`.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import sync_playwright

from gateway.devtools.browser import CHROMIUM_POLICY_DIR, POLICY_FILE_NAME

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

#: Chromium reads every managed policy file of this directory: a browser test that writes one holds the lock.
POLICY_LOCK = Path("/tmp/cps-gateway-chromium-policy.lock")


@contextlib.contextmanager
def chromium_policies() -> Iterator[None]:
    """Hold the machine's Chromium policy directory for this block (across test runs), and remove the
    policy file the dev tools write when it ends."""
    with POLICY_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            (CHROMIUM_POLICY_DIR / POLICY_FILE_NAME).unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_in_with_the_card_button(origin: str, route: str, env: dict[str, str], profile: Path) -> str:
    """As a professional does: the protected page, its "Carte CPS" button (the main host binds the browser,
    then the card host asks for the card), back on the page with the session; the page's text."""
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
            response = page.goto(f"{origin}{route}")
            assert response is not None and response.status == 401
            page.click("#login-card")
            page.wait_for_url(f"{origin}{route}")
            assert page.url.startswith(f"{origin}{route}"), page.url
            return str(page.inner_text("body"))
        finally:
            context.close()
