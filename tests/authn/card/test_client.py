"""card_login against a small real HTTPS server wired with the real challenge issuer and verifier."""

from __future__ import annotations

import http.cookiejar
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from gateway.authn.card.challenge import ChallengeIssuer, MemoryNonceStore, proven_certificate
from gateway.authn.card.client import CardLoginError, authentication_certificate, card_login
from gateway.authn.card.verify import CardError
from gateway.devtools.pki import DevPki, key_usage
from gateway.pkcs11 import TokenCertificate, TokenError
from tests.support.pki import custom_card, software_card, verifier_for
from tests.support.softhsm import CardSet


def _stand_in_gateway(pki: DevPki, origin_holder: list[str], audience_override: str | None) -> Flask:
    verifier, _ = verifier_for(pki)
    sessions: dict[str, str] = {}
    app = Flask(__name__)
    issuers: list[ChallengeIssuer] = []

    def issuer() -> ChallengeIssuer:
        if not issuers:
            issuers.append(ChallengeIssuer(MemoryNonceStore(), audience_override or origin_holder[0]))
        return issuers[0]

    @app.post("/.gateway/card/challenge")
    def challenge():  # type: ignore[no-untyped-def]
        return jsonify(issuer().issue(request.remote_addr or "", time.time()).to_json())

    @app.post("/.gateway/card/verify")
    def verify():  # type: ignore[no-untyped-def]
        try:
            now = datetime.now(UTC)
            body = request.get_json(silent=True)
            identity = verifier.verify(
                proven_certificate(issuer(), body, request.remote_addr or "", now), now
            )
        except CardError as error:
            return jsonify({"error": error.reason.value}), 403
        session_id = secrets.token_urlsafe(16)
        sessions[session_id] = identity.idnat
        response = jsonify({"subject": identity.idnat})
        response.set_cookie("gw_session", session_id, secure=True, httponly=True)
        return response

    @app.get("/whoami")
    def whoami():  # type: ignore[no-untyped-def]
        return sessions.get(request.cookies.get("gw_session", ""), "anonymous")

    return app


def _serve(pki: DevPki, audience_override: str | None = None) -> Iterator[str]:
    origin: list[str] = []
    app = _stand_in_gateway(pki, origin, audience_override)
    server = make_server(
        "127.0.0.1",
        0,
        app,
        threaded=True,
        ssl_context=(str(pki.server.cert_path), str(pki.base_dir / "server.key")),
    )
    origin.append(f"https://127.0.0.1:{server.server_port}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin[0]
    finally:
        server.shutdown()


@pytest.fixture
def gateway_url(dev_pki: DevPki, softhsm_cards: CardSet) -> Iterator[str]:
    yield from _serve(dev_pki)


def test_card_login_writes_cookie_jar_usable_by_curl(
    gateway_url: str, dev_pki: DevPki, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    jar = tmp_path / "cookies.txt"
    subject = card_login(
        gateway_url, "test-doctor", pin="1234", cookie_jar_path=jar, cacert=str(dev_pki.server_ca.cert_path)
    )
    assert subject == softhsm_cards["doctor"].idnat
    loaded = http.cookiejar.MozillaCookieJar(str(jar))
    loaded.load(ignore_discard=True, ignore_expires=True)
    assert [cookie.name for cookie in loaded] == ["gw_session"]
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(dev_pki.server_ca.cert_path),
            "-b",
            str(jar),
            f"{gateway_url}/whoami",
        ],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    ).stdout
    assert out == softhsm_cards["doctor"].idnat


def test_refused_card_reports_gateway_reason(gateway_url: str, dev_pki: DevPki, tmp_path: Path) -> None:
    with pytest.raises(CardLoginError, match=r"403.*card_revoked"):
        card_login(
            gateway_url,
            "test-revoked",
            cookie_jar_path=tmp_path / "c.txt",
            cacert=str(dev_pki.server_ca.cert_path),
        )
    assert not (tmp_path / "c.txt").exists()


def test_untrusted_server_certificate(gateway_url: str, dev_pki: DevPki, tmp_path: Path) -> None:
    with pytest.raises(CardLoginError, match="CERTIFICATE_VERIFY_FAILED"):
        card_login(
            gateway_url, "test-doctor", cookie_jar_path=tmp_path / "c.txt", cacert=str(dev_pki.root.cert_path)
        )


def test_client_refuses_foreign_audience(dev_pki: DevPki, softhsm_cards: CardSet, tmp_path: Path) -> None:
    for url in _serve(dev_pki, audience_override="https://other-gateway.example"):
        with pytest.raises(CardLoginError, match="audience"):
            card_login(
                url,
                "test-doctor",
                cookie_jar_path=tmp_path / "c.txt",
                cacert=str(dev_pki.server_ca.cert_path),
            )


def _on_token(certificate: x509.Certificate, key_id: bytes) -> TokenCertificate:
    return TokenCertificate(
        f"cert {key_id.hex()}", key_id, certificate.public_bytes(serialization.Encoding.DER)
    )


def test_the_authentication_certificate_is_chosen_by_its_usages(dev_pki: DevPki) -> None:
    authentication = _on_token(software_card(dev_pki), b"\x01")
    signature = _on_token(
        custom_card(dev_pki, key_usage=key_usage(digital_signature=False, content_commitment=True)), b"\x02"
    )
    both = _on_token(
        custom_card(dev_pki, key_usage=key_usage(digital_signature=True, content_commitment=True)), b"\x03"
    )
    assert authentication_certificate([signature, authentication], "t") is authentication
    assert authentication_certificate([both, authentication, signature], "t") is authentication
    assert authentication_certificate([signature, authentication], "t", "02") is signature
    with pytest.raises(TokenError, match=r"no authentication certificate.*CKA_ID 02"):
        authentication_certificate([signature, both], "t")
    with pytest.raises(
        TokenError, match=r"several authentication certificates.*--cert-id.*CKA_ID 01.*CKA_ID 04"
    ):
        authentication_certificate([authentication, _on_token(software_card(dev_pki), b"\x04")], "t")
    with pytest.raises(TokenError, match="not hexadecimal"):
        authentication_certificate([authentication], "t", "zz")
