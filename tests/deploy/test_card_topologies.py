"""ONE nginx serving both the main host (forward-auth.conf) and the card-login host (card-login.conf.template),
both templates verbatim, each on its own port (the card host's TLS 1.2, docs/card.md): the topology the docs
allow, and the one where a professional's certificate, which is public, used to be enough to log in as them.

Both server blocks reach the gateway from one address, 127.0.0.1: its TLS terminator, trusted nginx and
trusted proxy. TLS for the main host comes from http-level ssl_* lines (the template leaves TLS to the
operator). curl reaches the two names through --resolve; a SoftHSM card signs the real handshake.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from gateway.devtools.card_host import card_host_config
from gateway.devtools.cards import softhsm_env
from gateway.devtools.pki import DevPki
from tests.support.audit import audit_records
from tests.support.card_stack import CARD_HOST_SECRET, card_settings, curl_with_card
from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, NGINX, main_config, render
from tests.support.processes import free_port, running
from tests.support.softhsm import CardSet

MAIN_HOST = "portail.test"
CARD_HOST = "carte.portail.test"
CARD_ROUTE = "/echo/card/records"


@dataclass(frozen=True)
class OneNginx:
    main_port: int
    card_port: int
    pki: DevPki
    audit_file: Path

    def curl(
        self, url: str, extra: list[str], work: Path, card: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """curl through the shared nginx: both names resolve to it; -k as the dev server certificate names
        localhost only (what is tested here is who may log in, not the server's name)."""
        resolve = [
            arg
            for name, port in ((MAIN_HOST, self.main_port), (CARD_HOST, self.card_port))
            for arg in ("--resolve", f"{name}:{port}:127.0.0.1")
        ]
        return curl_with_card(self.pki, card, url, ["-k", *resolve, *extra], work)

    def url(self, host: str, path: str) -> str:
        port = self.main_port if host == MAIN_HOST else self.card_port
        return f"https://{host}:{port}{path}"


@pytest.fixture(scope="module")
def one_nginx(
    dev_pki: DevPki,
    softhsm_cards: CardSet,  # created first: the revoked card re-signs the CRL the gateway loads
    upstream_url: str,
    assertion_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OneNginx]:
    work = tmp_path_factory.mktemp("one-nginx")
    main_port, card_port, gateway_port = free_port(), free_port(), free_port()
    nginx_address = ["127.0.0.1/32"]
    config = write_config(
        work / "gateway",
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        listen=f"127.0.0.1:{gateway_port}",
        extra={
            "server": {
                "public_origin": f"https://{MAIN_HOST}:{main_port}",
                "allowed_hosts": [],
                "tls_terminators": nginx_address,
                "trusted_proxies": nginx_address,
            },
            "forward_auth": {"trusted_nginx": nginx_address},
            "card": card_settings(dev_pki, f"https://{CARD_HOST}:{card_port}"),
            "limits": {"login_requests_per_ip": "1000/minute", "login_attempts_per_ip": "1000/minute"},
        },
    )
    prefix = work / "nginx"
    prefix.mkdir()
    main_host = render(
        FORWARD_AUTH_TEMPLATE,
        {
            "LISTEN": f"127.0.0.1:{main_port} ssl",
            "GATEWAY": f"127.0.0.1:{gateway_port}",
            "PORTAL": upstream_url.removeprefix("http://"),
            "CACHE_DIR": str(prefix),
            "ACCESS_LOG": str(prefix / "access.log"),
        },
    )
    card_host = card_host_config(
        dev_pki,
        listen=f"127.0.0.1:{card_port}",
        gateway=f"127.0.0.1:{gateway_port}",
        secret=CARD_HOST_SECRET,
        server_name=CARD_HOST,
    )
    tls = f"ssl_certificate {dev_pki.server.cert_path};\nssl_certificate_key {dev_pki.base_dir / 'server.key'};\n"
    (prefix / "nginx.conf").write_text(main_config(prefix, tls + main_host + card_host))
    argv = [
        NGINX,
        "-p",
        str(prefix),
        "-c",
        str(prefix / "nginx.conf"),
        "-g",
        f"daemon off; pid {prefix}/nginx.pid;",
    ]
    with (
        running(
            serve_argv(config), gateway_port, log=work / "gateway.log", env=softhsm_env(dev_pki.base_dir)
        ),
        running(argv, card_port, log=work / "nginx.log"),
    ):
        yield OneNginx(main_port, card_port, dev_pki, work / "gateway" / "audit.log")


def _headers(output: str) -> tuple[int, dict[str, str]]:
    status_line, *lines = output.split("\r\n\r\n", 1)[0].splitlines()
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def _start(one_nginx: OneNginx, jar: Path, work: Path) -> str:
    """/.gateway/card/start on the main host (the browser binding in ``jar``): the card host's login URL."""
    start = one_nginx.curl(
        one_nginx.url(MAIN_HOST, f"/.gateway/card/start?next={CARD_ROUTE}"),
        ["-c", str(jar), "-o", "/dev/null", "-w", "%{redirect_url}"],
        work,
    )
    assert start.returncode == 0 and "binding=" in start.stdout, start.stdout + start.stderr
    return start.stdout


def test_a_card_logs_in_through_the_card_host_of_the_shared_nginx(
    one_nginx: OneNginx, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    jar = tmp_path / "jar.txt"
    login_url = _start(one_nginx, jar, tmp_path)
    assert login_url.startswith(one_nginx.url(CARD_HOST, "/.gateway/login/card?"))
    page = one_nginx.curl(login_url, ["-L", "-c", str(jar), "-b", str(jar)], tmp_path, "test-doctor")
    assert page.returncode == 0, page.stderr
    assert f'"x-gateway-subject": "{softhsm_cards["doctor"].idnat}"' in page.stdout


FORGED_CARD = [
    "-H",
    "X-SSL-Client-Verify: SUCCESS",
    "-H",
    "X-Card-Host-Secret: guessed",
    "-H",
    "Accept: text/html",
]


@pytest.mark.parametrize("host_header", [None, CARD_HOST])
def test_a_certificate_header_sent_through_the_main_host_never_logs_in_and_is_audited(
    one_nginx: OneNginx, softhsm_cards: CardSet, tmp_path: Path, host_header: str | None
) -> None:
    # Everything a browser would have, on the main host, with the professional's certificate (public data) in a
    # header instead of a card; also with the card host's name in Host.
    jar = tmp_path / "jar.txt"
    login_query = _start(one_nginx, jar, tmp_path).split("?", 1)[1]
    certificate = quote(softhsm_cards["doctor"].pem_path.read_text(), safe="")
    forged = ["-H", f"X-SSL-Client-Cert: {certificate}", *FORGED_CARD]
    if host_header:
        forged += ["-H", f"Host: {host_header}:{one_nginx.card_port}"]
    before = len(audit_records(one_nginx.audit_file))
    result = one_nginx.curl(
        one_nginx.url(MAIN_HOST, f"/.gateway/login/card?{login_query}"),
        ["-b", str(jar), "-D", "-", "-o", "/dev/null", *forged],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    status, headers = _headers(result.stdout)
    assert (status, headers.get("x-gateway-reason")) == (401, "card_missing")
    assert "set-cookie" not in headers and "location" not in headers
    events = audit_records(one_nginx.audit_file)[before:]
    assert [e["event"] for e in events if e["event"] in ("spoofed_header", "login")] == [
        "spoofed_header",
        "login",
    ]
    assert [e["reasons"] for e in events if e["event"] == "login"] == [["card_missing"]]
