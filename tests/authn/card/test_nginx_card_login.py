"""The shipped nginx template, run for real: curl presents a SoftHSM card through the libp11 engine, nginx
forwards the certificate header and the card host secret, the gateway side extracts and verifies it."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from werkzeug.datastructures import Headers

from gateway.authn.card.headers import CardHost, client_certificate_from_headers, parse_networks
from gateway.authn.card.verify import CardError
from gateway.devtools.card_host import card_host_nginx_argv
from gateway.devtools.pki import DevPki
from gateway.policy.decision import Reason
from tests.support.card_stack import curl_with_card
from tests.support.config import CARD_HOST_SECRET
from tests.support.pki import verifier_for
from tests.support.processes import free_port, running
from tests.support.softhsm import PIN, CardSet


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
    argv = card_host_nginx_argv(
        work, dev_pki, listen=f"127.0.0.1:{port}", gateway=f"127.0.0.1:{upstream}", secret=CARD_HOST_SECRET
    )
    with running(argv, port, log=work / "stdout.log"):
        yield port


def _curl(
    pki: DevPki,
    port: int,
    card_label: str | None,
    extra: list[str],
    tmp: Path,
    path: str = "/.gateway/login/card",
) -> Headers:
    """The headers nginx forwarded for a curl request presenting ``card_label`` (or no card)."""
    result = curl_with_card(pki, card_label, f"https://127.0.0.1:{port}{path}", extra, tmp, pin=PIN)
    assert result.returncode == 0, result.stderr
    return Headers(json.loads(result.stdout))


CARD_HOST = CardHost("127.0.0.1", parse_networks(["127.0.0.1/32"]), CARD_HOST_SECRET.encode())


def test_card_through_nginx_is_verified_by_the_gateway(
    nginx: int, dev_pki: DevPki, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    headers = _curl(dev_pki, nginx, "test-doctor", [], tmp_path)
    forwarded = client_certificate_from_headers(headers, "127.0.0.1", CARD_HOST)
    assert forwarded.terminator_verify == "SUCCESS"
    assert forwarded.certificate is not None
    verifier, _ = verifier_for(dev_pki)
    assert verifier.verify(forwarded.certificate, datetime.now(UTC)).idnat == softhsm_cards["doctor"].idnat


def test_revoked_card_reaches_the_gateway_which_names_the_reason(
    nginx: int, dev_pki: DevPki, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    headers = _curl(dev_pki, nginx, "test-revoked", [], tmp_path)
    forwarded = client_certificate_from_headers(headers, "127.0.0.1", CARD_HOST)
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
        dev_pki,
        nginx,
        None,
        ["-H", f"X-SSL-Client-Cert: {forged}", "-H", "X-SSL-Client-Verify: SUCCESS"],
        tmp_path,
    )
    forwarded = client_certificate_from_headers(headers, "127.0.0.1", CARD_HOST)
    assert forwarded.certificate is None
    assert forwarded.terminator_verify == "NONE"


def _handshake(pki: DevPki, port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(pki.server_ca.cert_path),
            *options,
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=20,
        check=False,
    )


def test_the_card_host_negotiates_tls_1_2_whatever_the_client_offers(nginx: int, dev_pki: DevPki) -> None:
    # TLS 1.3 would forbid the PKCS#1 v1.5 signature of an RSA card without PSS (see the template).
    assert "New, TLSv1.2, Cipher is ECDHE-" in _handshake(dev_pki, nginx).stdout
    only_13 = _handshake(dev_pki, nginx, "-tls1_3")
    assert only_13.returncode != 0 and "New, TLSv1.3" not in only_13.stdout


def test_the_card_host_adds_its_secret_and_replaces_a_forged_one(
    nginx: int, dev_pki: DevPki, tmp_path: Path
) -> None:
    headers = _curl(dev_pki, nginx, None, ["-H", "X-Card-Host-Secret: guessed"], tmp_path)
    assert headers["X-Card-Host-Secret"] == CARD_HOST_SECRET
    assert CARD_HOST.vouches("127.0.0.1", headers["Host"], headers["X-Card-Host-Secret"])


def test_the_card_host_serves_the_card_login_endpoint_only(
    nginx: int, dev_pki: DevPki, tmp_path: Path
) -> None:
    for path in ("/.gateway/auth", "/.gateway/login", "/.gateway/card/verify", "/patients/1"):
        result = curl_with_card(
            dev_pki,
            None,
            f"https://127.0.0.1:{nginx}{path}",
            ["-o", "/dev/null", "-w", "%{http_code}"],
            tmp_path,
        )
        assert result.stdout == "404", path
    # The stylesheet of its pages is served, without certificate or secret.
    forged = ["-H", "X-SSL-Client-Cert: forged", "-H", f"X-Card-Host-Secret: {CARD_HOST_SECRET}"]
    static = _curl(dev_pki, nginx, "test-doctor", forged, tmp_path, path="/.gateway/static/gateway.css")
    assert "X-SSL-Client-Cert" not in static and "X-Card-Host-Secret" not in static
