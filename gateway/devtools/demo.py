"""``gateway demo``: the demo portal and its stand-ins as child processes, the gateway in front; Ctrl-C stops all."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from gateway.devtools.card_host import card_host_nginx_argv
from gateway.devtools.pki import ensure_dev_pki
from gateway.settings import DEFAULT_SETTINGS_FILE, Settings, load_settings

#: nginx reaches the demo gateway from this loopback address, its only trusted TLS terminator.
CARD_HOST_SOURCE = "127.0.0.2"


@contextlib.contextmanager
def child(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def run_demo() -> int:
    # Stopping the demo by PID (SIGTERM) must stop its children too, like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    python = sys.executable
    subprocess.run([python, "-m", "gateway.cli", "dev", "init"], check=True)
    settings = load_settings(DEFAULT_SETTINGS_FILE)
    upstream_listen = settings.upstream.url.split("://", 1)[1]
    origin = settings.server.public_origin
    print(
        f"\n  Demo portal behind the gateway: {origin}/\n"
        f"  Protected pages: {origin}/patients/180017512345678 , {origin}/account/rib\n"
        "  They answer the login page; its e-CPS button leads to the Pro Santé Connect stand-in.\n"
        "  Card login without a browser (PKCS#11 challenge; no TLS needed on loopback):\n"
        "    gateway dev card --label demo-doctor --idnat 810002813839 --surname DUPONT --given JEAN --profession 10\n"
        "    SOFTHSM2_CONF=certs/dev/softhsm/softhsm2.conf gateway card login --url "
        f"{origin} --token-label demo-doctor --cookie-jar cookies.txt\n"
        f"    curl -b cookies.txt {origin}/patients/180017512345678\n"
        f"  Revoke it: gateway dev revoke --label demo-doctor{_revocation_note(settings)}\n"
        f"  Browser card login: the card button leads to the nginx card host{_card_host_note(settings)}.\n"
        "  A browser needs a card (or a SoftHSM token in its NSS database, see docs/card.md).\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
    with (
        child([python, "-m", "gateway.cli", "dev", "portal", "--listen", upstream_listen]),
        contextlib.ExitStack() as stand_ins,
    ):
        if settings.ecps is not None:
            stand_ins.enter_context(child(psc_stand_in_argv(python, settings)))
        if settings.card is not None and shutil.which("nginx"):
            stand_ins.enter_context(child(card_host_argv(settings)))
        gateway = subprocess.Popen([python, "-m", "gateway.cli", "serve"], stdin=subprocess.DEVNULL)
        try:
            return gateway.wait()
        except KeyboardInterrupt:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
            return 0


def _revocation_note(settings: Settings) -> str:
    if settings.card is None:
        return ""
    return (
        f" (the gateway refuses the card, and ends the sessions it opened, at its next CRL refresh:"
        f" within {settings.card.crl_refresh:g} s)"
    )


def _card_host_note(settings: Settings) -> str:
    if settings.card is None:
        return " (no card section)"
    return f" {settings.card.login_origin}" if shutil.which("nginx") else " (nginx is not installed)"


def card_host_argv(settings: Settings) -> list[str]:
    """nginx with the shipped card-login template and the dev PKI, in front of the demo gateway."""
    assert settings.card is not None
    pki = ensure_dev_pki(settings.card.trust_anchors[0].parent)  # where `gateway dev init` created it
    listen = settings.card.login_origin.split("://", 1)[1]
    return card_host_nginx_argv(
        Path("var", "card-host").resolve(),
        pki,
        listen=listen,
        gateway=settings.server.listen,
        source_address=CARD_HOST_SOURCE,
    )


def psc_stand_in_argv(python: str, settings: Settings) -> list[str]:
    """The Pro Santé Connect stand-in, with the gateway registered as its client (as ANS registers it)."""
    ecps = settings.ecps
    if ecps is None:
        raise ValueError("no ecps section")
    metadata = urlsplit(ecps.metadata_url)
    if metadata.hostname != "127.0.0.1" or metadata.port is None:
        raise ValueError("the demo's ecps.metadata_url must name the stand-in on 127.0.0.1:<port>")
    issuer_path = metadata.path.split("/.well-known/", 1)[0]
    argv = [python, "-m", "gateway.devtools.psc", "--port", str(metadata.port), "--issuer-path", issuer_path]
    argv += ["--client-id", ecps.client_id, "--client-secret", ecps.client_secret or ""]
    argv += ["--redirect-uri", ecps.redirect_uri]
    argv += ["--backchannel-logout-uri", settings.server.public_origin + "/.gateway/ecps/backchannel-logout"]
    if ecps.post_logout_redirect_uri:
        argv += ["--post-logout-redirect-uri", ecps.post_logout_redirect_uri]
    return argv
