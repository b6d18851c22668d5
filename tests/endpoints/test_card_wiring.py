"""Card-login wiring in-process (Flask test client): settings, login button, fail-closed CRLs, refusals."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from flask import Flask
from flask.testing import FlaskClient

from gateway.app import create_app
from gateway.authn.card.certificate import format_serial
from gateway.config_source import ConfigErrors
from gateway.devtools.pki import DevPki
from gateway.runtime import gateway_of
from gateway.settings import documented_keys, load_settings
from tests.support.apps import gateway_app
from tests.support.audit import audit_records
from tests.support.card_stack import card_host_headers, card_settings
from tests.support.config import write_config
from tests.support.openssl_pki import OpensslPki, printed_serial
from tests.support.pki import card_key, software_card
from tests.support.redis import redis_server

CARD_ORIGIN = "https://card.example:8443"


def _app(
    tmp_path: Path,
    upstream_url: str,
    assertion_key: Path,
    card: dict[str, Any],
    limits: dict[str, Any] | None = None,
) -> Flask:
    config = write_config(
        tmp_path,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        # The test client's peer is 127.0.0.1: here it plays the TLS terminator.
        extra={"server": {"tls_terminators": ["127.0.0.1/32"]}, "card": card, "limits": limits or {}},
    )
    return create_app(load_settings(config))


@pytest.fixture
def app(tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki) -> Iterator[Flask]:
    application = _app(tmp_path, upstream_url, assertion_key, card_settings(dev_pki, CARD_ORIGIN))
    yield application
    gateway = gateway_of(application)
    gateway.upstream.close()
    assert gateway.crl_store is not None
    gateway.crl_store.stop()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _forwarded(pem: bytes) -> dict[str, str]:
    return {**card_host_headers(pem, CARD_ORIGIN), "Accept": "text/html"}


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    return audit_records(tmp_path / "audit.log")


def _card_login(client: FlaskClient, pem: bytes, next_path: str = "/") -> Any:
    """The browser's way: bound on the main host (/.gateway/card/start), then on the card host with the card
    (the test client plays both hosts and keeps the binding cookie)."""
    start = client.get(f"/.gateway/card/start?next={quote(next_path, safe='/')}")
    assert start.status_code == 303 and start.headers["Cache-Control"] == "no-store"
    return client.get(start.headers["Location"].removeprefix(CARD_ORIGIN), headers=_forwarded(pem))


def test_every_card_key_is_documented() -> None:
    keys = {key: description for key, _, description in documented_keys()}
    for name in ("trust_anchors", "crls", "crl_refresh", "login_origin", "challenge_ttl", "nonce_store"):
        assert keys[f"card.{name}"]


def test_a_missing_trust_anchor_is_a_located_config_error(
    tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki
) -> None:
    card = dict(card_settings(dev_pki, CARD_ORIGIN), trust_anchors=["missing-root.pem"])
    config = write_config(
        tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, extra={"card": card}
    )
    with pytest.raises(ConfigErrors) as caught:
        load_settings(config)
    assert "missing-root.pem" in str(caught.value) and "card" in str(caught.value)


def test_the_login_page_offers_the_card_host_through_the_main_host(client: FlaskClient) -> None:
    page = client.get("/.gateway/login?next=/patients/1", headers={"Accept": "text/html"}).get_data(
        as_text=True
    )
    assert "/.gateway/card/start?next=/patients/1" in page
    start = client.get("/.gateway/card/start?next=/patients/1")
    assert start.headers["Location"].startswith(
        f"{CARD_ORIGIN}/.gateway/login/card?next=/patients/1&binding="
    )
    cookie = start.headers["Set-Cookie"]
    assert cookie.startswith("__Host-gateway-card=") and "Secure" in cookie and "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie and "Max-Age=600" in cookie and "Path=/" in cookie
    binding = cookie.split("=", 1)[1].split(";", 1)[0]
    assert binding not in start.headers["Location"]  # only its reference travels to the card host


def test_a_verified_card_is_handed_over_to_the_main_host(client: FlaskClient, dev_pki: DevPki) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = software_card(dev_pki).public_bytes(Encoding.PEM)
    response = _card_login(client, pem, "//evil.example/x")
    assert response.status_code == 303
    location = response.headers["Location"]
    assert location.startswith("http://127.0.0.1:8080/.gateway/card/complete?handoff=")
    assert location.endswith("&next=/")  # an open redirect attempt falls back to /
    complete = client.get(location.replace("http://127.0.0.1:8080", ""))
    assert complete.status_code == 303 and complete.headers["Location"] == "/"
    assert complete.headers["Cache-Control"] == "no-store"
    cookies = complete.headers.getlist("Set-Cookie")
    assert any(c.startswith("__Host-gateway-session=") for c in cookies)
    assert any(c.startswith("__Host-gateway-card=;") for c in cookies)  # the binding is done


def test_a_handoff_url_opened_in_another_browser_logs_nobody_in_and_is_not_burnt(
    app: Flask, client: FlaskClient, dev_pki: DevPki
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    location = _card_login(client, software_card(dev_pki).public_bytes(Encoding.PEM)).headers["Location"]
    path = location.replace("http://127.0.0.1:8080", "")
    other = app.test_client()  # no binding cookie: the URL leaked, or an attacker sends his own to a victim
    refused = other.get(path)
    assert (refused.status_code, refused.headers["X-Gateway-Reason"]) == (400, "state_mismatch")
    assert "Set-Cookie" not in refused.headers
    other.get("/.gateway/card/start")  # a binding of its own does not match either
    assert other.get(path).headers["X-Gateway-Reason"] == "state_mismatch"
    assert client.get(path).status_code == 303  # the browser that started it still can


def test_a_challenge_nonce_presented_as_a_handoff_is_a_400_not_a_500(client: FlaskClient) -> None:
    client.get("/.gateway/card/start")
    nonce = client.post("/.gateway/card/challenge", json={}).get_json()["nonce"]
    response = client.get(f"/.gateway/card/complete?handoff={nonce}&next=/")
    assert (response.status_code, response.headers["X-Gateway-Reason"]) == (400, "state_mismatch")


def test_a_card_host_request_not_started_on_the_main_host_is_sent_there_unjudged(
    client: FlaskClient, dev_pki: DevPki, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = software_card(dev_pki, variant="expired").public_bytes(Encoding.PEM)
    response = client.get("/.gateway/login/card?next=/patients/1", headers=_forwarded(pem))
    assert response.status_code == 303
    assert response.headers["Location"] == "http://127.0.0.1:8080/.gateway/card/start?next=/patients/1"
    assert not [e for e in _audit(tmp_path) if e["event"] == "login"]


def test_no_crl_means_no_card_login(
    tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    app = _app(tmp_path, upstream_url, assertion_key, dict(card_settings(dev_pki, CARD_ORIGIN), crls=[]))
    pem = software_card(dev_pki).public_bytes(Encoding.PEM)
    response = _card_login(app.test_client(), pem)
    assert (response.status_code, response.headers["X-Gateway-Reason"]) == (503, "crl_unavailable")
    denied = [e for e in _audit(tmp_path) if e["event"] == "login"]
    assert denied[-1]["decision"] == "deny" and denied[-1]["card_serial"]
    store = gateway_of(app).crl_store
    assert store is not None
    store.stop()


def test_an_unknown_handoff_is_refused(client: FlaskClient) -> None:
    response = client.get("/.gateway/card/complete?handoff=" + "x" * 43 + "&next=/")
    assert (response.status_code, response.headers["X-Gateway-Reason"]) == (400, "state_mismatch")
    assert "Set-Cookie" not in response.headers


def test_verify_answers_json_refusals(client: FlaskClient) -> None:
    form = client.post("/.gateway/card/verify", data={"nonce": "x"})
    assert (form.status_code, form.get_json()["error"]) == (403, "cross_site_request")
    challenge = client.post("/.gateway/card/challenge", json={}).get_json()
    assert challenge["audience"] == "http://127.0.0.1:8080" and challenge["expires_in"] == 60
    bad = client.post(
        "/.gateway/card/verify",
        json={"nonce": challenge["nonce"], "certificate": "not a certificate", "signature": "AAAA"},
    )
    assert (bad.status_code, bad.get_json()["error"]) == (400, "card_malformed")


def test_readiness_says_whether_every_crl_is_fresh(
    tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki
) -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.authn.card.setup import build_card_login, crls_ready

    config = write_config(
        tmp_path,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        extra={"card": card_settings(dev_pki, CARD_ORIGIN)},
    )
    settings = load_settings(config)
    assert settings.card is not None
    login = build_card_login(settings, settings.card)
    try:
        assert crls_ready(login)
        assert not crls_ready(login, datetime.now(UTC) + timedelta(days=30))  # past nextUpdate: not ready
    finally:
        login.crl_store.stop()


def test_repeated_refused_cards_are_banned(
    tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    limits = {"ban_after": 3, "ban_window": "10m", "ban_duration": "15m"}
    app = _app(tmp_path, upstream_url, assertion_key, card_settings(dev_pki, CARD_ORIGIN), limits)
    client = app.test_client()
    expired = software_card(dev_pki, variant="expired")
    pem = expired.public_bytes(Encoding.PEM)
    reasons = [_card_login(client, pem).headers["X-Gateway-Reason"] for _ in range(4)]
    assert reasons == ["card_expired"] * 3 + ["banned"]
    banned = _card_login(client, pem)
    assert banned.status_code == 429 and int(banned.headers["Retry-After"]) > 800
    (ban,) = [event for event in _audit(tmp_path) if event["event"] == "ban"]
    # An expired card does not chain to the anchors today: its failures count against the address only.
    assert (ban["banned_ip"], ban["banned_identity"]) == ("127.0.0.1", None)
    refusals = [e for e in _audit(tmp_path) if e["event"] == "login" and e["reasons"] == ["card_expired"]]
    assert len(refusals) == 3 and {e["card_serial"] for e in refusals} == {
        format_serial(expired.serial_number)
    }
    assert {e["proven_identity"] for e in refusals} == {None}
    gateway_of(app).crl_store.stop()  # type: ignore[union-attr]


def test_login_endpoints_are_rate_limited_per_ip(
    tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki
) -> None:
    limits = {"login_requests_per_ip": "3/minute"}
    app = _app(tmp_path, upstream_url, assertion_key, card_settings(dev_pki, CARD_ORIGIN), limits)
    client = app.test_client()
    statuses = [client.post("/.gateway/card/challenge", json={}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    refused = client.post("/.gateway/card/challenge", json={})
    assert refused.json is not None and refused.json["error"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    limited = [event for event in _audit(tmp_path) if event["event"] == "rate_limited"]
    assert [event["endpoint"] for event in limited] == ["gateway_card.challenge"] * 2
    assert client.get("/hello").status_code == 200  # the portal's routes are not login endpoints
    gateway_of(app).crl_store.stop()  # type: ignore[union-attr]


def test_audit_bans_and_sessions_print_serials_as_openssl_does(
    tmp_path: Path, upstream_url: str, assertion_key: Path, own_tool_pki: OpensslPki
) -> None:
    # Serials with a leading zero nibble, from openssl: `E1530D2A...` for `0E1530D2A...` would send an
    # operator grepping the audit for what `openssl x509 -serial` printed to nothing.
    pki = own_tool_pki
    revoked = pki.software_card("cps", "0x0E1530D2A1B2C3D4", tmp_path / "revoked.pem")
    valid = pki.software_card("cps", "0x0B0C", tmp_path / "valid.pem")
    pki.people.revoke(revoked)
    pki.people.write_crl(pki.people_crl)
    limits = {"ban_after": 2, "ban_window": "10m", "ban_duration": "15m"}
    app = _app(tmp_path / "gw", upstream_url, assertion_key, pki.card_settings(CARD_ORIGIN), limits)
    client = app.test_client()
    try:
        handoff = _card_login(client, valid.read_bytes())
        client.get(handoff.headers["Location"].replace("http://127.0.0.1:8080", ""))
        session_id = client.get_cookie("__Host-gateway-session").value  # type: ignore[union-attr]
        session = gateway_of(app).sessions.get(session_id, time.time())
        refused = [_card_login(client, revoked.read_bytes()) for _ in range(2)]
        assert [r.headers["X-Gateway-Reason"] for r in refused] == ["card_revoked"] * 2
    finally:
        gateway_of(app).crl_store.stop()  # type: ignore[union-attr]
    records = _audit(tmp_path / "gw")
    denied = [e for e in records if e["event"] == "login" and e["decision"] == "deny"]
    assert [e["card_serial"] for e in denied] == [printed_serial(revoked)] * 2 == ["0E1530D2A1B2C3D4"] * 2
    assert all(printed_serial(revoked) in e["detail"] for e in denied)
    (ban,) = [e for e in records if e["event"] == "ban"]
    # A revoked card chains to the anchors, and nginx's handshake proved its key: banned as serial@issuer.
    assert ban["banned_identity"].startswith(printed_serial(revoked) + "@CN=")
    (allowed,) = [e for e in records if e["event"] == "login" and e["decision"] == "allow"]
    assert allowed["card_serial"] == printed_serial(valid) == "0B0C"
    assert session is not None and session.identity.card_serial == "0B0C"


def test_a_root_arl_keeps_card_logins_and_readiness(
    tmp_path: Path, upstream_url: str, assertion_key: Path, own_tool_pki: OpensslPki
) -> None:
    # The root publishes a CRL of CA certificates only (IssuingDistributionPoint onlyContainsCACerts), made
    # with `openssl ca -gencrl`: complete for the intermediate it is checked against.
    pki = own_tool_pki
    pki.root.write_crl(pki.root_crl, extensions="crl_only_ca")
    card = pki.software_card("cps", "0x0D01", tmp_path / "card.pem")
    app = _app(tmp_path / "gw", upstream_url, assertion_key, pki.card_settings(CARD_ORIGIN))
    client = app.test_client()
    try:
        assert client.get("/.gateway/readyz").status_code == 200
        response = _card_login(client, card.read_bytes())
        assert response.status_code == 303, response.headers.get("X-Gateway-Reason")
    finally:
        gateway_of(app).crl_store.stop()  # type: ignore[union-attr]


# --- Lock-out abuse: a card's public certificate (or a copy of its serial) must not lock its owner out -----

ATTACKER, OWNER = "203.0.113.9", "198.51.100.20"
STRICT = {"ban_after": 3, "ban_window": "10m", "ban_duration": "15m"}


@pytest.fixture
def strict_app(tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki) -> Iterator[Flask]:
    # The test client's peer (127.0.0.1) plays nginx: TLS terminator, and the proxy whose X-Forwarded-For
    # names the client, as the card host sets it.
    server = {"tls_terminators": ["127.0.0.1/32"], "trusted_proxies": ["127.0.0.1/32"]}
    extra = {"server": server, "card": card_settings(dev_pki, CARD_ORIGIN), "limits": STRICT}
    with gateway_app(tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, extra=extra) as app:
        yield app
        gateway_of(app).crl_store.stop()  # type: ignore[union-attr]


def _challenge_body(client: FlaskClient, certificate: x509.Certificate, sign: bool, address: str) -> dict:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.serialization import Encoding

    from gateway.authn.card.challenge import challenge_message

    nonce = client.post("/.gateway/card/challenge", json={}, headers={"X-Forwarded-For": address}).get_json()[
        "nonce"
    ]
    message = challenge_message("http://127.0.0.1:8080", nonce)
    signature = card_key().sign(message, padding.PKCS1v15(), hashes.SHA256()) if sign else b"forged"
    return {
        "nonce": nonce,
        "certificate": certificate.public_bytes(Encoding.PEM).decode(),
        "signature": base64.b64encode(signature).decode(),
    }


def test_bogus_signatures_with_a_cards_certificate_ban_the_sender_not_the_card(
    strict_app: Flask, dev_pki: DevPki, tmp_path: Path
) -> None:
    client = strict_app.test_client()
    owners_card = software_card(dev_pki)  # its certificate is public; its key (card_key()) is not
    reasons = []
    for _ in range(4):
        body = _challenge_body(client, owners_card, sign=False, address=ATTACKER)
        verify = client.post("/.gateway/card/verify", json=body, headers={"X-Forwarded-For": ATTACKER})
        reasons.append(verify.get_json()["error"])
    assert reasons == ["signature_invalid"] * 3 + ["banned"]
    (ban,) = [e for e in _audit(tmp_path) if e["event"] == "ban"]
    assert (ban["banned_ip"], ban["banned_identity"]) == (ATTACKER, None)
    # The card's owner, elsewhere, logs in at once.
    body = _challenge_body(client, owners_card, sign=True, address=OWNER)
    login = client.post("/.gateway/card/verify", json=body, headers={"X-Forwarded-For": OWNER})
    assert login.status_code == 200 and login.get_json() == {"subject": "810002813839"}


def test_a_certificate_copying_a_cards_serial_and_issuer_never_bans_the_card(
    strict_app: Flask, dev_pki: DevPki, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    client = strict_app.test_client()
    owners_card = software_card(dev_pki)
    own_key = ec.generate_private_key(ec.SECP256R1())  # the forger proves possession of THIS key
    builder = (
        x509.CertificateBuilder()
        .subject_name(owners_card.subject)
        .issuer_name(owners_card.issuer)
        .serial_number(owners_card.serial_number)
        .public_key(own_key.public_key())
        .not_valid_before(owners_card.not_valid_before_utc)
        .not_valid_after(owners_card.not_valid_after_utc)
    )
    for extension in owners_card.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    copy = builder.sign(own_key, hashes.SHA256())
    forged = {**_forwarded(copy.public_bytes(Encoding.PEM)), "X-Forwarded-For": ATTACKER}
    binding = f"/.gateway/login/card?binding={'b' * 43}"
    reasons = [client.get(binding, headers=forged).headers["X-Gateway-Reason"] for _ in range(4)]
    assert reasons == ["card_untrusted"] * 3 + ["banned"]
    (ban,) = [e for e in _audit(tmp_path) if e["event"] == "ban"]
    assert (ban["banned_ip"], ban["banned_identity"]) == (ATTACKER, None)
    genuine = {**_forwarded(owners_card.public_bytes(Encoding.PEM)), "X-Forwarded-For": OWNER}
    assert client.get(binding, headers=genuine).status_code == 303  # on to the main host


def test_a_revoked_cards_own_failures_ban_it_everywhere(
    strict_app: Flask, dev_pki: DevPki, tmp_path: Path
) -> None:
    # Proven (the handshake) and chained to the anchors: counted against the card, whatever the address.
    from cryptography.hazmat.primitives.serialization import Encoding

    client = strict_app.test_client()
    revoked = software_card(dev_pki, variant="revoked")
    assert gateway_of(strict_app).crl_store.refresh() == []  # type: ignore[union-attr]
    pem = revoked.public_bytes(Encoding.PEM)
    addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]
    binding = f"/.gateway/login/card?binding={'b' * 43}"
    reasons = [
        client.get(binding, headers={**_forwarded(pem), "X-Forwarded-For": address}).headers[
            "X-Gateway-Reason"
        ]
        for address in addresses
    ]
    assert reasons == ["card_revoked"] * 3 + ["banned"]
    (ban,) = [e for e in _audit(tmp_path) if e["event"] == "ban"]
    assert ban["banned_ip"] is None and ban["banned_identity"].startswith(
        format_serial(revoked.serial_number)
    )


def test_a_session_used_after_its_card_was_revoked_ends_there(
    tmp_path: Path, upstream_url: str, assertion_key: Path, own_tool_pki: OpensslPki
) -> None:
    # Two gateway instances sharing Redis: A opens the session; the card is revoked; B starts with a CRL that
    # already lists it, so no refresh of B ever sees the revocation happen. The session's next use ends it.
    pki = own_tool_pki
    card = pki.software_card("cps", "0x0D21", tmp_path / "card.pem")
    with redis_server() as redis:
        limits_and_sessions = {"sessions": {"store": redis.url}}

        def instance(name: str) -> Flask:
            config = write_config(
                tmp_path / name,
                upstream_url=upstream_url,
                assertion_key=assertion_key,
                extra={
                    "server": {"tls_terminators": ["127.0.0.1/32"]},
                    "card": pki.card_settings(CARD_ORIGIN),
                    **limits_and_sessions,
                },
            )
            return create_app(load_settings(config))

        first = instance("a")
        client = first.test_client()
        handoff = _card_login(client, card.read_bytes(), "/echo/protected/x")
        complete = client.get(handoff.headers["Location"].replace("http://127.0.0.1:8080", ""))
        assert complete.status_code == 303
        assert client.get("/echo/protected/x").status_code == 200
        gateway_of(first).crl_store.stop()  # type: ignore[union-attr]

        pki.people.revoke(card)
        pki.people.write_crl(pki.people_crl)
        second = instance("b")
        other = second.test_client()
        other.set_cookie(
            "__Host-gateway-session",
            client.get_cookie("__Host-gateway-session").value,  # type: ignore[union-attr]
        )
        try:
            refused = other.get("/echo/protected/x", headers={"Accept": "text/html"})
            again = other.get("/echo/protected/x", headers={"Accept": "text/html"})
        finally:
            gateway_of(second).crl_store.stop()  # type: ignore[union-attr]
    assert refused.status_code != 200 and refused.headers["X-Gateway-Reason"] == "unauthenticated"
    assert again.status_code != 200
    (ended,) = [e for e in _audit(tmp_path / "b") if e["event"] == "card_revocation"]
    assert (ended["card_serial"], ended["detected"], ended["sessions_ended"]) == ("0D21", "session_use", 1)
    assert ended["reasons"] == ["card_revoked"] and ended["idnat"] == "810002813839"


def test_a_revoked_intermediate_ends_the_sessions_of_every_card_under_it(
    tmp_path: Path, upstream_url: str, assertion_key: Path, own_tool_pki: OpensslPki
) -> None:
    pki = own_tool_pki
    app = _app(tmp_path / "gw", upstream_url, assertion_key, pki.card_settings(CARD_ORIGIN))
    clients = [app.test_client(), app.test_client()]
    try:
        for number, client in enumerate(clients):
            card = pki.software_card("cps", f"0x0D3{number}", tmp_path / f"card-{number}.pem")
            handoff = _card_login(client, card.read_bytes())
            client.get(handoff.headers["Location"].replace("http://127.0.0.1:8080", ""))
            assert client.get("/echo/protected/x").status_code == 200
        pki.root.revoke(pki.people.cert_path)  # the root's CRL now lists the card-issuing intermediate
        pki.root.write_crl(pki.root_crl)
        store = gateway_of(app).crl_store
        assert store is not None and store.refresh() == []  # what the background refresh does
        assert [client.get("/echo/protected/x").status_code for client in clients] == [401, 401]
    finally:
        gateway_of(app).crl_store.stop()  # type: ignore[union-attr]
    (ended,) = [e for e in _audit(tmp_path / "gw") if e["event"] == "card_revocation"]
    assert (ended["card_serial"], ended["sessions_ended"]) == (printed_serial(pki.people.cert_path), 2)
    assert "TEST AC RACINE IGC-SANTE STANDARD" in ended["card_issuer"]


def test_cross_site_posts_to_the_card_endpoints_are_refused_and_never_counted(
    strict_app: Flask, dev_pki: DevPki, tmp_path: Path
) -> None:
    """A page of another site, seen from a hospital NAT: text/plain forms and cross-site fetches to
    /.gateway/card/verify never reach the login logic, so they can neither ban the address nor use its budget."""
    client = strict_app.test_client()
    nat = {"X-Forwarded-For": OWNER}
    for _ in range(6):  # ban_after is 3
        plain = client.post(
            "/.gateway/card/verify", data='{"nonce": "x"}', headers={**nat, "Content-Type": "text/plain"}
        )
        assert (plain.status_code, plain.get_json()["error"]) == (403, "cross_site_request")
        fetched = client.post(
            "/.gateway/card/verify",
            json={"nonce": "x"},
            headers={**nat, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        )
        assert (fetched.status_code, fetched.get_json()["error"]) == (403, "cross_site_request")
    assert not [e for e in _audit(tmp_path) if e["event"] in ("ban", "rate_limited")]
    body = _challenge_body(client, software_card(dev_pki), sign=True, address=OWNER)
    assert client.post("/.gateway/card/verify", json=body, headers=nat).status_code == 200
