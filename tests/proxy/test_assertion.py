"""X-Gateway-Assertion bound to the request (htm, htu, jti, nbf), its reuse rules, and what the portal gets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flask import Flask
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.identity import Identity, LoginMethod
from gateway.proxy.assertion import AssertionSigner
from gateway.runtime import gateway_of

IDENTITY = Identity("810001234567", LoginMethod.CARD, 1_700_000_000.0, professions=("10",), auth_mode="CARD")
NOW = 1_700_000_100.0


@pytest.fixture
def signer(assertion_key: Path) -> AssertionSigner:
    return AssertionSigner(assertion_key.read_bytes(), issuer="cps-gateway", audience="portal", lifetime=60)


def claims_of(signer: AssertionSigner, token: str) -> dict:
    keys = KeySet.import_key_set(signer.jwks)
    return dict(jwt.decode(token, keys, algorithms=["ES256"]).claims)


def test_the_assertion_names_the_request_it_was_minted_for(signer: AssertionSigner) -> None:
    token = signer.assertion(IDENTITY, "s1", "records", NOW, method="GET", path="/patients/1")
    claims = claims_of(signer, token)
    assert (claims["htm"], claims["htu"], claims["rule"]) == ("GET", "/patients/1", "records")
    assert claims["nbf"] == claims["iat"] == int(NOW) and claims["exp"] == int(NOW) + 60
    assert len(claims["jti"]) >= 20


def test_safe_requests_reuse_a_token_per_session_rule_method_and_path(signer: AssertionSigner) -> None:
    first = signer.assertion(IDENTITY, "s1", "records", NOW, method="GET", path="/patients/1")
    assert signer.assertion(IDENTITY, "s1", "records", NOW + 29, method="GET", path="/patients/1") == first
    others = {
        signer.assertion(IDENTITY, "s1", "records", NOW, method="GET", path="/patients/2"),
        signer.assertion(IDENTITY, "s1", "records", NOW, method="HEAD", path="/patients/1"),
        signer.assertion(IDENTITY, "s2", "records", NOW, method="GET", path="/patients/1"),
        signer.assertion(IDENTITY, "s1", "other", NOW, method="GET", path="/patients/1"),
        # past half its lifetime, a token is not handed out again
        signer.assertion(IDENTITY, "s1", "records", NOW + 31, method="GET", path="/patients/1"),
    }
    jtis = {claims_of(signer, token)["jti"] for token in others | {first}}
    assert len(jtis) == 6


def test_state_changing_requests_get_a_fresh_token_each_time(signer: AssertionSigner) -> None:
    tokens = [
        signer.assertion(IDENTITY, "s1", "bank-details", NOW, method="POST", path="/account/rib")
        for _ in range(3)
    ]
    assert len({claims_of(signer, token)["jti"] for token in tokens}) == 3


def test_the_portal_receives_the_method_and_the_normalised_path_without_query(app: Flask) -> None:
    client = app.test_client()
    session = gateway_of(app).sessions.create(IDENTITY, time.time())
    client.set_cookie("__Host-gateway-session", session.id, domain="localhost")
    keys = KeySet.import_key_set(client.get("/.gateway/jwks.json").json)
    echoed = client.post("/echo/protected/./a/../form?next=1", data={"x": "1"}).json
    assert echoed["path"] == "/echo/protected/form"
    claims = jwt.decode(echoed["headers"]["x-gateway-assertion"], keys, algorithms=["ES256"]).claims
    assert (claims["htm"], claims["htu"], claims["rule"]) == (
        "POST",
        "/echo/protected/form",
        "echo-protected",
    )
