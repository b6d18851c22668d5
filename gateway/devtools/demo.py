"""``gateway demo``: the demo portal and its stand-ins as child processes, the gateway in front; Ctrl-C stops all."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway.devtools.card_host import card_host_nginx_argv
from gateway.devtools.pki import ensure_dev_pki
from gateway.pkcs11 import TokenError
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


@dataclass(frozen=True)
class Listener:
    name: str
    process: subprocess.Popen[bytes]
    address: str  # host:port


@dataclass(frozen=True)
class DemoCard:
    """The test card the demo makes (once) for the card login commands it prints."""

    label: str = "demo-doctor"
    idnat: str = "810002813839"
    surname: str = "DUPONT"
    given: str = "JEAN"
    profession: str = "10"


DEMO_CARD = DemoCard()
START_TIMEOUT = 90.0


def run_demo() -> int:
    # Stopping the demo by PID (SIGTERM) must stop its children too, like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    python = sys.executable
    subprocess.run([python, "-m", "gateway.cli", "dev", "init"], check=True)
    settings = load_settings(DEFAULT_SETTINGS_FILE)
    addresses = _addresses(settings)
    taken = [f"{name} ({address})" for name, address in addresses.items() if _accepts(address)]
    if taken:
        # Else the wait below would take another program's socket for the demo's and announce a demo that is
        # not the one running.
        print(
            f"\n  The demo did not start: already in use: {', '.join(taken)}. Another demo still running?"
            " Stop it (Ctrl-C in its terminal) or free these ports.",
            file=sys.stderr,
        )
        return 1
    cards = _demo_card(settings)
    listeners: list[Listener] = []
    with contextlib.ExitStack() as children:
        portal = children.enter_context(
            child([python, "-m", "gateway.cli", "dev", "portal", "--listen", addresses["demo portal"]])
        )
        listeners.append(Listener("demo portal", portal, addresses["demo portal"]))
        if "Pro Santé Connect stand-in" in addresses:
            psc = children.enter_context(child(psc_stand_in_argv(python, settings)))
            listeners.append(
                Listener("Pro Santé Connect stand-in", psc, addresses["Pro Santé Connect stand-in"])
            )
        if "nginx card host" in addresses:
            nginx = children.enter_context(child(card_host_argv(settings)))
            listeners.append(Listener("nginx card host", nginx, addresses["nginx card host"]))
        # In the terminal's process group: Ctrl-C reaches gunicorn's master directly, which stops its workers.
        gateway = subprocess.Popen([python, "-m", "gateway.cli", "serve"], stdin=subprocess.DEVNULL)
        try:
            listeners.append(Listener("gateway", gateway, addresses["gateway"]))
            if "gateway metrics" in addresses:
                listeners.append(Listener("gateway metrics", gateway, addresses["gateway metrics"]))
            failed = _wait_until_listening(listeners)
            if failed:
                print(f"\n  The demo did not start: {failed} (see the messages above).", file=sys.stderr)
                return 1
            print(banner(settings, cards), flush=True)
            return gateway.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            if gateway.poll() is None:
                gateway.send_signal(signal.SIGTERM)
                gateway.wait(30)


def _address(url: str) -> str:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.hostname}:{parts.port or default}"


def _addresses(settings: Settings) -> dict[str, str]:
    """Every address the demo's processes will listen on, by the name its messages give them."""
    addresses = {"demo portal": _address(settings.upstream.url)}
    if settings.ecps is not None:
        addresses["Pro Santé Connect stand-in"] = _address(settings.ecps.metadata_url)
    if settings.card is not None and shutil.which("nginx"):
        addresses["nginx card host"] = _address(settings.card.login_origin)
    addresses["gateway"] = settings.server.listen
    if settings.metrics is not None:
        addresses["gateway metrics"] = settings.metrics.listen
    return addresses


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_until_listening(listeners: list[Listener], timeout: float = START_TIMEOUT) -> str | None:
    """None once every listener accepts connections, else what went wrong."""
    deadline = time.monotonic() + timeout
    for listener in listeners:
        while True:
            if listener.process.poll() is not None:
                return f"the {listener.name} exited with status {listener.process.returncode}"
            if _accepts(listener.address):
                break
            if time.monotonic() > deadline:
                return f"the {listener.name} is not listening on {listener.address} after {timeout:.0f} s"
            time.sleep(0.1)
    return None


def _demo_card(settings: Settings) -> Path | None:
    """Where the demo's test card is (made on first use), or None without card login or SoftHSM."""
    from gateway.devtools.cards import create_card, list_cards

    if settings.card is None or shutil.which("softhsm2-util") is None:
        return None
    directory = settings.card.trust_anchors[0].parent
    card = DEMO_CARD
    try:
        if not any(token.label == card.label for token in list_cards(directory)):
            create_card(directory, card.label, card.idnat, card.surname, card.given, card.profession)
    except (TokenError, OSError, ValueError) as error:
        print(f"  (no demo card: {error})", file=sys.stderr)
        return None
    return directory


def banner(settings: Settings, cards: Path | None) -> str:
    """What the demo prints once everything listens: where to go, and commands runnable as printed."""
    from gateway.cli import command_name, shown_path

    gateway = command_name()
    origin = settings.server.public_origin
    record = f"{origin}/patients/180017512345678"
    lines = [
        "",
        f"  The demo is up: open {origin}/",
        f"  Protected pages answer the login page: {record} , {origin}/account/rib",
    ]
    if settings.ecps is not None:
        lines.append(
            "  e-CPS: the login page's e-CPS button leads to the Pro Santé Connect stand-in"
            f" ({_address(settings.ecps.metadata_url)}), where you approve as one of its test professionals."
        )
    if cards is not None:
        card = DEMO_CARD
        softhsm = shown_path(cards / "softhsm" / "softhsm2.conf")
        lines += [
            f"  Card {card.label} ({card.surname} {card.given}, idNat {card.idnat}), SoftHSM test card made in"
            f" {shown_path(cards)}. Without a browser, from this directory ({Path.cwd()}):",
            f"    SOFTHSM2_CONF={softhsm} {gateway} card login --url {origin} --token-label {card.label}"
            " --cookie-jar cookies.txt",
            f"    curl -b cookies.txt {record}",
            f"  In a browser, the card button leads to the nginx card host{_card_host_note(settings)}; put the"
            " card in the browser's NSS database first, and start the browser as it then says (docs/card.md):",
            f"    {gateway} dev browser",
            f"  Revoke the card{_revocation_note(settings)}:",
            f"    {gateway} dev revoke --label {card.label}",
        ]
    if settings.audit.file is not None:
        audit = shown_path(settings.audit.file)
        lines.append(f"  Audit log: {audit}  (check its chain: {gateway} audit verify {audit})")
    if settings.metrics is not None:
        lines.append(f"  Metrics: http://{settings.metrics.listen}/metrics")
    lines += ["  Ctrl-C stops everything.", ""]
    return "\n".join(lines)


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
        secret=settings.card.host_secret_value().decode("ascii"),
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
