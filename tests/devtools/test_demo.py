"""``gateway demo`` (what ``make demo`` runs) as a new user meets it, in a fresh directory: it says it is up
only once everything listens, every command it prints runs as printed, the audit log and the metrics are
where it says, an e-CPS login leaves no token in its output, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import requests

from tests.support.browser import chromium_policies
from tests.support.demo import DEMO_PORTS, ORIGIN, UP, demo_ports, listening, running_demo, wait_for_banner
from tests.support.ecps import Browser
from tests.support.psc import PscServer

STAND_IN_DOCTOR = "810001234567"  # one of the stand-in's default identities
RECORD = "/patients/180017512345678"


def run_printed(command: str, directory: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """A command line exactly as the banner printed it, typed into a shell in the same directory (by a user
    whose home is ``home``: `gateway dev browser` sets up the NSS database there)."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=directory,
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def ecps_login_and_logout() -> None:
    browser, psc = Browser(), PscServer(port=DEMO_PORTS["PSC stand-in"], log=Path("/dev/null"))
    to_psc = browser.get(f"{ORIGIN}/.gateway/login/ecps?next={RECORD}")
    back = browser.follow(browser.get(psc.approve(to_psc.headers["Location"], STAND_IN_DOCTOR)))
    assert back.status_code == 200 and "Portail démo" in back.text, back.text[:500]
    confirm = browser.get(f"{ORIGIN}/.gateway/logout")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', confirm.text)
    assert csrf is not None, confirm.text
    to_psc = browser.post(
        f"{ORIGIN}/.gateway/logout", data={"csrf_token": csrf.group(1)}, headers={"Origin": ORIGIN}
    )
    end_session = to_psc.headers["Location"]
    assert "id_token_hint=" in end_session  # RP-initiated logout at PSC: the stand-in logs this request
    assert requests.get(end_session, allow_redirects=False, timeout=10).status_code in (302, 303)


def test_demo_says_it_is_up_once_everything_listens_and_its_commands_run_as_printed(tmp_path: Path) -> None:
    here = tmp_path / "somewhere"  # a newcomer's directory: the demo makes its files here
    here.mkdir()
    log = tmp_path / "demo.log"
    with demo_ports(), chromium_policies(), running_demo(here, log) as demo:
        text = wait_for_banner(demo, log)
        not_yet = [name for name, port in DEMO_PORTS.items() if not listening(port)]
        assert not not_yet, f"the banner came before {not_yet} listened:\n{text}"
        assert text.count(UP) == 1, text
        banner = text[text.index(UP) :]

        home = requests.get(f"{ORIGIN}/", timeout=5)
        assert home.status_code == 200 and "Portail démo" in home.text
        page = requests.get(f"{ORIGIN}{RECORD}", headers={"Accept": "text/html"}, timeout=5)
        assert page.status_code == 401 and "/.gateway/login/ecps" in page.text

        commands = [line.strip() for line in banner.splitlines() if line.startswith("    ")]
        assert any(" card login " in c for c in commands) and any(c.startswith("curl ") for c in commands)
        outputs = {}
        for command in commands:
            done = run_printed(command, here, tmp_path / "home")
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            outputs[command] = done.stdout
        assert "DUPONT" in next(
            out for c, out in outputs.items() if c.startswith("curl ")
        )  # the record page, behind the card login
        # ... and when a revocation takes effect (the demo's card.crl_refresh).
        assert "at its next CRL refresh: within 30 s" in banner

        check = re.search(r"check its chain: (.+)\)", banner)
        assert check is not None, banner
        verified = run_printed(check.group(1), here, tmp_path / "home")
        assert verified.returncode == 0 and verified.stdout.startswith("OK:"), (
            verified.stdout + verified.stderr
        )
        metrics_url = re.search(r"Metrics: (\S+)", banner)
        assert metrics_url is not None, banner
        metrics = requests.get(metrics_url.group(1), timeout=5)
        assert metrics.status_code == 200 and "gateway_login_attempts_total" in metrics.text

        ecps_login_and_logout()
    assert demo.returncode == 0, log.read_text()
    still = [name for name, port in DEMO_PORTS.items() if listening(port)]
    assert not still, f"still listening after Ctrl-C: {still}\n{log.read_text()}"
    output = log.read_text(errors="replace")
    assert "Traceback" not in output
    assert not re.search(r"eyJ[\w-]{10,}", output), "a token (JWT) was printed"
    assert not re.search(r"code=[\w-]{8,}", output), "an authorization code was printed"


def test_demo_refuses_to_start_while_one_of_its_ports_is_taken(tmp_path: Path) -> None:
    # Another program on the demo portal's port would answer in the demo portal's place: the demo must not
    # announce itself up (its banner) over a process that is not its own.
    here = tmp_path / "somewhere"
    here.mkdir()
    log = tmp_path / "demo.log"
    with demo_ports(), socket.create_server(("127.0.0.1", DEMO_PORTS["demo portal"])):
        with running_demo(here, log) as demo:
            demo.wait(60)
        output = log.read_text(errors="replace")
        assert demo.returncode == 1, output
        assert "already in use: demo portal (127.0.0.1:8081)" in output and UP not in output
        assert "Traceback" not in output
        assert not [name for name, port in DEMO_PORTS.items() if port != 8081 and listening(port)]
