"""The real card-login stack for end-to-end tests: nginx card host (shipped template) -> gateway process.

nginx reaches the gateway from 127.0.0.2 (``proxy_bind``), the only address configured as TLS terminator
and trusted proxy, and adds the card host secret: a request sent straight to the gateway from 127.0.0.1 is
"not through nginx".
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from gateway.devtools.card_host import card_host_nginx_argv
from gateway.devtools.cards import softhsm_env
from gateway.devtools.pki import DevPki
from gateway.pkcs11 import SOFTHSM_MODULE
from tests.support.audit import audit_records
from tests.support.config import CARD_HOST_SECRET, TEST_POLICIES, write_config
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running, wait_for_port
from tests.support.softhsm import CardSet

ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")
NGINX_SOURCE_ADDRESS = "127.0.0.2"


@dataclass(frozen=True)
class CardStack:
    gateway_url: str  # the main host (plain http on loopback)
    card_origin: str  # nginx's card-login host
    audit_file: Path
    pki: DevPki
    metrics_url: str

    def audit(self) -> list[dict[str, Any]]:
        return audit_records(self.audit_file)


@pytest.fixture(scope="module", name="stack")
def card_stack_of_the_module(
    dev_pki: DevPki,
    softhsm_cards: CardSet,  # created first: the revoked card re-signs the CRL the gateway loads
    upstream_url: str,
    assertion_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CardStack]:
    """``stack``: the card stack on the session PKI, for a whole test module (import it to use it)."""
    with card_stack(tmp_path_factory.mktemp("card-stack"), dev_pki, upstream_url, assertion_key) as running:
        yield running


def card_settings(pki: DevPki, login_origin: str) -> dict[str, Any]:
    base = pki.base_dir
    return {
        "trust_anchors": [str(base / "root.pem")],
        "intermediates": [str(base / "intermediate.pem")],
        "crls": [
            {"url_or_file": str(base / "root.crl.pem"), "issuer": str(base / "root.pem")},
            {"url_or_file": str(base / "intermediate.crl.pem"), "issuer": str(base / "intermediate.pem")},
        ],
        "login_origin": login_origin,
        "host_secret": CARD_HOST_SECRET,
    }


def card_host_headers(pem: bytes, login_origin: str) -> dict[str, str]:
    """What the card-login host's nginx sends the gateway for a request presenting the certificate ``pem``."""
    return {
        "Host": login_origin.split("://", 1)[1],
        "X-SSL-Client-Cert": quote(pem.decode(), safe=""),
        "X-Card-Host-Secret": CARD_HOST_SECRET,
    }


def nginx_config(work: Path, pki: DevPki, listen_port: int, gateway_port: int) -> list[str]:
    return card_host_nginx_argv(
        work,
        pki,
        listen=f"127.0.0.1:{listen_port}",
        gateway=f"127.0.0.1:{gateway_port}",
        secret=CARD_HOST_SECRET,
        source_address=NGINX_SOURCE_ADDRESS,
    )


@contextlib.contextmanager
def card_stack(
    work: Path,
    pki: DevPki,
    upstream_url: str,
    assertion_key: Path,
    limits: dict[str, Any] | None = None,
    *,
    cards: Callable[[str], dict[str, Any]] | None = None,
    policies: str = TEST_POLICIES,
    nginx_is_a_trusted_proxy: bool = True,
) -> Iterator[CardStack]:
    """nginx (card host) + the gateway as real processes; login limits generous unless ``limits`` says so.

    ``pki`` gives nginx its server certificate, and the gateway its card trust unless ``cards`` maps the card
    origin to another ``card`` section (e.g. an openssl-made hierarchy's). ``nginx_is_a_trusted_proxy=False``
    is the demo's configuration: the card host sees nginx's address as the client's, the main host the
    browser's.
    """
    gateway_port, nginx_port, metrics_port = free_port(), free_port(), free_port()
    card_origin = f"https://127.0.0.1:{nginx_port}"
    terminator = f"{NGINX_SOURCE_ADDRESS}/32"
    config = write_config(
        work / "gateway",
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        policies=policies,
        listen=f"127.0.0.1:{gateway_port}",
        extra={
            "server": {
                "tls_terminators": [terminator],
                "trusted_proxies": [terminator] if nginx_is_a_trusted_proxy else [],
                "workers": 1,
            },
            "card": (cards or functools.partial(card_settings, pki))(card_origin),
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "limits": limits
            or {
                "ban_after": 1000,
                "login_attempts_per_ip": "1000/minute",
                "login_requests_per_ip": "1000/minute",
            },
        },
    )
    gateway_argv = serve_argv(config)
    (work / "nginx").mkdir()
    with (
        running(
            gateway_argv, gateway_port, log=work / "gateway.log", env=softhsm_env(pki.base_dir)
        ) as gateway,
        running(
            nginx_config(work / "nginx", pki, nginx_port, gateway_port), nginx_port, log=work / "nginx.log"
        ),
    ):
        wait_for_port(metrics_port, gateway)  # the master opens it once its workers are up
        yield CardStack(
            f"http://127.0.0.1:{gateway_port}",
            card_origin,
            work / "gateway" / "audit.log",
            pki,
            f"http://127.0.0.1:{metrics_port}",
        )


def curl(*argv: str) -> subprocess.CompletedProcess[str]:
    """curl (no card), stdin closed, bounded in time; the caller checks the outcome."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=20,
        check=False,
    )


def bound_card_login_url(gateway_url: str, next_path: str, jar: Path) -> str:
    """The card host's login URL as a browser reaches it: the main host's /.gateway/card/start puts the
    binding cookie in ``jar`` (curl's cookie jar) and redirects there."""
    start = curl(
        "-c",
        str(jar),
        "-o",
        "/dev/null",
        "-w",
        "%{redirect_url}",
        f"{gateway_url}/.gateway/card/start?next={quote(next_path)}",
    )
    assert "/.gateway/login/card?" in start.stdout and "binding=" in start.stdout, start.stdout + start.stderr
    return start.stdout


def curl_with_card(
    pki: DevPki, card_label: str | None, url: str, extra: list[str], work: Path, pin: str = "1234"
) -> subprocess.CompletedProcess[str]:
    """curl presenting a dev card through the libp11 engine (key on the SoftHSM token); stdin closed."""
    if card_label is None:
        return curl_with_token(
            softhsm_env(pki.base_dir), pki.base_dir / "server-ca.pem", None, url, extra, work
        )
    key_uri = (
        f"pkcs11:token={quote(card_label)};object={quote(f'{card_label} authentication key')};type=private"
    )
    return curl_with_token(
        softhsm_env(pki.base_dir),
        pki.base_dir / "server-ca.pem",
        (f"{key_uri}?pin-value={pin}", pki.base_dir / "softhsm" / f"{card_label}.pem"),
        url,
        extra,
        work,
    )


def curl_with_token(
    env: Mapping[str, str],
    cacert: Path,
    client: tuple[str, Path] | None,
    url: str,
    extra: list[str],
    work: Path,
) -> subprocess.CompletedProcess[str]:
    """curl presenting ``client`` = (PKCS#11 URI of the key, certificate PEM) through the libp11 engine, with
    the SoftHSM of ``env``; stdin closed (a PIN prompt fails instead of waiting)."""
    env = dict(env)
    argv = ["curl", "-sS", "--max-time", "10", "--cacert", str(cacert), *extra]
    if client is not None:
        conf = work / "openssl.cnf"
        conf.write_text(
            "openssl_conf = init\n[init]\nengines = engines\n[engines]\npkcs11 = pkcs11\n"
            f"[pkcs11]\ndynamic_path = {ENGINE}\nMODULE_PATH = {SOFTHSM_MODULE}\ninit = 0\n"
        )
        env["OPENSSL_CONF"] = str(conf)
        key_uri, certificate = client
        argv += ["--engine", "pkcs11", "--key-type", "ENG", "--key", key_uri, "--cert", str(certificate)]
    return subprocess.run(
        [*argv, url],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
