"""The demo's browser card login AS SHIPPED: `gateway demo` itself (gateway/default/gateway.yaml verbatim, its
nginx card host from the shipped template, its own test card), a browser set up by `gateway dev browser` as
docs/card.md tells a person to, and headless Chromium clicking the login page's card button."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.browser import chromium_policies, log_in_with_the_card_button
from tests.support.demo import ORIGIN, demo_ports, running_demo, wait_for_banner

pytestmark = pytest.mark.browser

DEMO_CARD_IDNAT = "810002813839"  # the demo's own card, demo-doctor (gateway/devtools/demo.py)
RECORD = "/patients/180017512345678"


def test_chromium_logs_in_to_the_demo_with_the_demo_card(tmp_path: Path) -> None:
    here, home = tmp_path / "somewhere", tmp_path / "home"
    here.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home)}  # a user's, without SOFTHSM2_CONF
    with demo_ports(), running_demo(here, tmp_path / "demo.log") as demo, chromium_policies():
        wait_for_banner(demo, tmp_path / "demo.log")
        set_up = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "dev", "browser"],
            cwd=here,
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        assert set_up.returncode == 0, set_up.stdout + set_up.stderr
        softhsm = set_up.stdout.split("SOFTHSM2_CONF=", 1)[1].split()[0]  # as it says to start the browser
        text = log_in_with_the_card_button(
            ORIGIN, RECORD, {**env, "SOFTHSM2_CONF": softhsm}, tmp_path / "profile"
        )
    assert "Portail démo" in text and DEMO_CARD_IDNAT in text, text
