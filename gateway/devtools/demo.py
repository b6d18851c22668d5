"""``gateway demo``: the demo portal and its stand-ins as child processes, the gateway in front; Ctrl-C stops all."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

from gateway.settings import DEFAULT_SETTINGS_FILE, load_settings


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
    python = sys.executable
    subprocess.run([python, "-m", "gateway.cli", "dev", "init"], check=True)
    settings = load_settings(DEFAULT_SETTINGS_FILE)
    upstream_listen = settings.upstream.url.split("://", 1)[1]
    origin = settings.server.public_origin
    print(
        f"\n  Demo portal behind the gateway: {origin}/\n"
        f"  Protected pages: {origin}/patients/180017512345678 , {origin}/account/rib\n"
        "  Card login without a browser (PKCS#11 challenge; no TLS needed on loopback):\n"
        "    gateway dev card --label demo-doctor --idnat 810002813839 --surname DUPONT --given JEAN --profession 10\n"
        "    SOFTHSM2_CONF=certs/dev/softhsm/softhsm2.conf gateway card login --url "
        f"{origin} --token-label demo-doctor --cookie-jar cookies.txt\n"
        f"    curl -b cookies.txt {origin}/patients/180017512345678\n"
        "  Browser card login needs the TLS card host: nginx with deploy/nginx/card-login.conf.template\n"
        "  (optional; see docs/card.md).\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
    with child([python, "-m", "gateway.cli", "dev", "portal", "--listen", upstream_listen]):
        gateway = subprocess.Popen([python, "-m", "gateway.cli", "serve"], stdin=subprocess.DEVNULL)
        try:
            return gateway.wait()
        except KeyboardInterrupt:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
            return 0
