"""Headless Chromium (Debian's package, driven by Playwright) as the tests launch it.

The flags keep it from reaching out to the network this machine does not have (background updates, sync,
QUIC) and from hanging on dialogs nobody sees; see recipes.md. Never `playwright install`.
"""

from __future__ import annotations

from pathlib import Path

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
