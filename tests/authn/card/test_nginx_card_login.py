"""The shipped nginx template, run for real: curl presents a SoftHSM card through the libp11 engine, nginx
forwards the certificate header, the gateway side extracts and verifies it."""

from __future__ import annotations

import http.server
import json
import string
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from gateway.authn.card.headers import client_certificate_from_headers, parse_networks
from gateway.authn.card.verify import CardError
from gateway.devtools.cards import softhsm_env
from gateway.devtools.pki import DevPki
from gateway.pkcs11 import SOFTHSM_MODULE
from gateway.policy.decision import Reason
from tests.support.pki import verifier_for
from tests.support.processes import REPO_ROOT, free_port, running
from tests.support.softhsm import PIN, CardSet

TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "card-login.conf.template"
ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")


class _EchoHeaders(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({k: v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def nginx(dev_pki: DevPki, upstream: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    work = tmp_path_factory.mktemp("nginx")
    port = free_port()
    server_block = string.Template(TEMPLATE.read_text()).safe_substitute(
        CARD_LOGIN_HOST="127.0.0.1",
        LISTEN_ADDRESS=f"127.0.0.1:{port}",
        SERVER_CERT=dev_pki.server.cert_path,
        SERVER_KEY=dev_pki.base_dir / "server.key",
        CARD_CA_CHAIN=dev_pki.ca_chain_path,
        GATEWAY_UPSTREAM=f"127.0.0.1:{upstream}",
    )
    assert "${" not in server_block
    (work / "card-login.conf").write_text(server_block)
    temp = "\n".join(
        f"{kind}_temp_path {work}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (work / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log warn;\n"
        f"events {{}}\nhttp {{\naccess_log off;\n{temp}\ninclude {work}/card-login.conf;\n}}\n"
    )
    argv = ["nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(work / "nginx.conf")]
    with running(argv, port, log=work / "stdout.log"):
        yield port


def _curl(base_dir: Path, port: int, card_label: str | None, extra: list[str], tmp: Path) -> dict[str, str]:
    env = softhsm_env(base_dir)
    argv = ["curl", "-sS", "--max-time", "10", "--cacert", str(base_dir / "server-ca.pem"), *extra]
    if card_label:
        conf = tmp / "openssl.cnf"
        conf.write_text(
            "openssl_conf = init\n[init]\nengines = engines\n[engines]\npkcs11 = pkcs11\n"
            f"[pkcs11]\ndynamic_path = {ENGINE}\nMODULE_PATH = {SOFTHSM_MODULE}\ninit = 0\n"
        )
        env["OPENSSL_CONF"] = str(conf)
        key_object = quote(f"{card_label} authentication key")
        key_uri = f"pkcs11:token={quote(card_label)};object={key_object};type=private"
        argv += ["--engine", "pkcs11", "--key-type", "ENG", "--key", f"{key_uri}?pin-value={PIN}"]
        argv += ["--cert", str(base_dir / "softhsm" / f"{card_label}.pem")]
    result = subprocess.run(
        [*argv, f"https://127.0.0.1:{port}/.gateway/card/tls"],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


TRUSTED = parse_networks(["127.0.0.1/32"])


def test_card_through_nginx_is_verified_by_the_gateway(
    nginx: int, dev_pki: DevPki, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    headers = _curl(dev_pki.base_dir, nginx, "test-doctor", [], tmp_path)
    forwarded = client_certificate_from_headers(headers, "127.0.0.1", TRUSTED)
    assert forwarded.terminator_verify == "SUCCESS"
    assert forwarded.certificate is not None
    verifier, _ = verifier_for(dev_pki)
    assert verifier.verify(forwarded.certificate, datetime.now(UTC)).idnat == softhsm_cards["doctor"].idnat


def test_revoked_card_reaches_the_gateway_which_names_the_reason(
    nginx: int, dev_pki: DevPki, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    headers = _curl(dev_pki.base_dir, nginx, "test-revoked", [], tmp_path)
    forwarded = client_certificate_from_headers(headers, "127.0.0.1", TRUSTED)
    assert forwarded.certificate is not None  # optional_no_ca: nginx did not answer its own 400
    verifier, _ = verifier_for(dev_pki)
    with pytest.raises(CardError) as caught:
        verifier.verify(forwarded.certificate, datetime.now(UTC))
    assert caught.value.reason is Reason.CARD_REVOKED


def test_nginx_overwrites_a_forged_certificate_header(
    nginx: int, dev_pki: DevPki, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    forged = quote(softhsm_cards["doctor"].pem_path.read_text(), safe="")
    headers = _curl(
        dev_pki.base_dir,
        nginx,
        None,
        ["-H", f"X-SSL-Client-Cert: {forged}", "-H", "X-SSL-Client-Verify: SUCCESS"],
        tmp_path,
    )
    forwarded = client_certificate_from_headers(headers, "127.0.0.1", TRUSTED)
    assert forwarded.certificate is None
    assert forwarded.terminator_verify == "NONE"
