"""The e-CPS client against a real Pro Santé Connect stand-in process, over real HTTP."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.authn.ecps import EcpsError, ProviderState
from gateway.identity import UNKNOWN_AUTH_TIME, LoginMethod
from gateway.policy.decision import Reason
from tests.authn.ecps.conftest import (
    DOCTOR_APP,
    DOCTOR_CARD,
    ES256_CLIENT,
    JSON_USERINFO_CLIENT,
    JWT_CLIENT,
    JWT_KEY_ID,
    PHARMACIST_APP,
    POST_LOGOUT_URI,
    PscWorld,
    follow_callback,
    make_rp,
    pem_pair,
    start_login,
)
from tests.support.processes import free_port
from tests.support.psc import PscServer, query_of, running_psc


def login(psc: PscServer, idnat: str = DOCTOR_APP, **rp_settings: Any) -> Any:
    app, _ = make_rp(psc.metadata_url, **rp_settings)
    client = app.test_client()
    callback = psc.approve(start_login(client), idnat)
    return follow_callback(client, callback)


def assert_refused(answer: Any, reason: Reason) -> None:
    assert answer.status_code == 403, answer.get_data(as_text=True)
    assert answer.get_json()["reason"] == reason.value, answer.get_json()


def test_a_doctor_approving_in_the_app_gets_an_identity(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    started = time.time()
    authorization_url = start_login(client, "/dossier?id=3")
    sent = query_of(authorization_url)
    assert sent["code_challenge_method"] == "S256" and sent["code_challenge"]
    assert sent["state"] and sent["nonce"] and sent["acr_values"] == "eidas1"
    assert sent["scope"] == "openid scope_all"
    assert "max_age" not in sent and "prompt" not in sent
    cookie = client.get_cookie("__Host-gateway-login", domain="localhost")
    assert cookie is not None and cookie.secure and cookie.http_only and cookie.same_site == "Lax"

    answer = follow_callback(client, psc.approve(authorization_url, DOCTOR_APP))

    assert answer.status_code == 200, answer.get_data(as_text=True)
    body = answer.get_json()
    identity = body["identity"]
    assert identity["idnat"] == DOCTOR_APP
    assert identity["method"] == LoginMethod.ECPS.value
    assert (identity["surname"], identity["given_name"]) == ("DUPONT", "JEAN")
    assert identity["professions"] == ["10"]
    assert identity["auth_mode"] == "MOBILE"
    assert identity["acr"] == "eidas1"
    assert started - 2 <= identity["auth_time"] <= time.time() + 1
    assert identity["extra"]["sub"].startswith("f:") and identity["extra"]["sub"].endswith(DOCTOR_APP)
    assert body["next_path"] == "/dossier?id=3"
    assert body["sid"]


def test_card_at_psc_and_pharmacist_are_told_apart(psc: PscServer) -> None:
    card = login(psc, DOCTOR_CARD).get_json()["identity"]
    pharmacist = login(psc, PHARMACIST_APP).get_json()["identity"]
    assert card["auth_mode"] == "CARD" and card["professions"] == ["10"]
    assert pharmacist["auth_mode"] == "MOBILE" and pharmacist["professions"] == ["21"]


def test_userinfo_as_plain_json_is_accepted(psc: PscServer) -> None:
    answer = login(psc, client_id=JSON_USERINFO_CLIENT)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["identity"]["idnat"] == DOCTOR_APP


def test_private_key_jwt_client_authentication(psc: PscServer, world: PscWorld) -> None:
    answer = login(
        psc,
        client_id=JWT_CLIENT,
        client_auth="private_key_jwt",
        client_secret=None,
        private_key_pem=world.private_key_pem,
        key_id=JWT_KEY_ID,
    )
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["identity"]["idnat"] == DOCTOR_APP


def test_next_path_cannot_leave_the_site(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    callback = psc.approve(start_login(client, "//evil.example/x"), DOCTOR_APP)
    assert follow_callback(client, callback).get_json()["next_path"] == "/"


def test_refusing_on_the_phone_is_a_cancelled_login(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    callback = psc.refuse(start_login(client))
    assert query_of(callback)["error"] == "access_denied"
    assert_refused(follow_callback(client, callback), Reason.LOGIN_CANCELLED)


def test_callback_from_another_browser_is_a_state_mismatch(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    victim, attacker = app.test_client(), app.test_client()
    start_login(victim)
    attacker_callback = psc.approve(start_login(attacker), DOCTOR_APP)
    # Login CSRF: the attacker's callback URL lands in the victim's browser.
    assert_refused(follow_callback(victim, attacker_callback), Reason.STATE_MISMATCH)


def test_callback_without_state_is_a_state_mismatch(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    start_login(client)
    assert_refused(follow_callback(client, "/.gateway/ecps/callback?code=x"), Reason.STATE_MISMATCH)


def test_replayed_callback_is_a_state_mismatch_even_with_the_old_cookie(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    authorization_url = start_login(client)
    old_cookie = client.get_cookie("__Host-gateway-login", domain="localhost")
    assert old_cookie is not None
    callback = psc.approve(authorization_url, DOCTOR_APP)
    assert follow_callback(client, callback).status_code == 200
    assert_refused(follow_callback(client, callback), Reason.STATE_MISMATCH)

    replayer = app.test_client()
    replayer.set_cookie(old_cookie.key, old_cookie.value, domain="localhost", secure=True)
    assert_refused(follow_callback(replayer, callback), Reason.STATE_MISMATCH)


@pytest.mark.parametrize(
    "fault", ["wrong_issuer", "wrong_audience", "bad_signature", "expired_token", "wrong_nonce"]
)
def test_untrustworthy_id_tokens_are_refused(psc: PscServer, fault: str) -> None:
    psc.set_faults(**{fault: True})
    answer = login(psc)
    assert_refused(answer, Reason.TOKEN_INVALID)
    assert "eyJ" not in answer.get_json()["detail"]  # no token material in errors


@pytest.mark.parametrize("faults", [{"acr": "eidas0"}, {"omit_acr": True}])
def test_acr_outside_the_allow_list_is_refused(psc: PscServer, faults: dict[str, Any]) -> None:
    psc.set_faults(**faults)
    assert_refused(login(psc), Reason.ACR_NOT_ACCEPTED)


def test_a_missing_acr_can_be_tolerated_by_configuration(psc: PscServer) -> None:
    psc.set_faults(omit_acr=True)
    answer = login(psc, accept_missing_acr=True)
    assert answer.status_code == 200
    assert answer.get_json()["identity"]["acr"] == ""


def test_an_acr_allow_list_can_demand_more(psc: PscServer) -> None:
    assert_refused(login(psc, accepted_acr={"eidas2", "eidas3"}), Reason.ACR_NOT_ACCEPTED)


def test_unreachable_provider_fails_closed_then_recovers(psc: PscServer) -> None:
    app, _ = make_rp(f"http://127.0.0.1:{free_port()}/auth/realms/esante-wallet/.well-known/x")
    answer = app.test_client().get("/.gateway/login/ecps", base_url="https://localhost")
    assert_refused(answer, Reason.IDP_UNAVAILABLE)

    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    psc.set_faults(unavailable=True)
    assert_refused(client.get("/.gateway/login/ecps", base_url="https://localhost"), Reason.IDP_UNAVAILABLE)
    psc.set_faults(unavailable=False)
    authorization_url = start_login(client)  # the same client retries discovery
    callback = psc.approve(authorization_url, DOCTOR_APP)
    psc.set_faults(unavailable=True)  # PSC falls over between the approval and the code exchange
    assert_refused(follow_callback(client, callback), Reason.IDP_UNAVAILABLE)


def test_step_up_asks_for_a_fresh_authentication(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    first = follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)).get_json()["identity"]
    time.sleep(1.1)
    authorization_url = start_login(client, max_age=60)
    sent = query_of(authorization_url)
    assert sent["max_age"] == "60" and sent["prompt"] == "login"
    answer = follow_callback(client, psc.approve(authorization_url, DOCTOR_APP))
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["identity"]["auth_time"] > first["auth_time"]


def test_step_up_refuses_an_old_authentication(psc: PscServer) -> None:
    # The gateway's clock says the professional authenticated 10 minutes before the step-up was asked.
    app, _ = make_rp(psc.metadata_url, clock=lambda: time.time() + 600, leeway=400)
    client = app.test_client()
    answer = follow_callback(client, psc.approve(start_login(client, max_age=60), DOCTOR_APP))
    assert_refused(answer, Reason.TOKEN_INVALID)


def test_back_channel_logout_token_is_verified(psc: PscServer, world: PscWorld) -> None:
    app, ecps = make_rp(psc.metadata_url)
    client = app.test_client()
    body = follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)).get_json()
    world.receiver.tokens.clear()

    deliveries = psc.backchannel_logout(idnat=DOCTOR_APP)

    assert [d["status"] for d in deliveries] == [200]
    [token] = world.receiver.tokens
    logout = ecps.verify_logout_token(token)
    assert logout.sid == body["sid"]
    assert logout.idnat == DOCTOR_APP
    assert logout.sub == body["identity"]["extra"]["sub"]
    with pytest.raises(EcpsError) as replay:
        ecps.verify_logout_token(token)
    assert replay.value.reason is Reason.TOKEN_INVALID


def test_an_id_token_is_not_a_logout_token(psc: PscServer) -> None:
    app, ecps = make_rp(psc.metadata_url)
    captured: dict[str, str] = {}

    @app.get("/capture")
    def capture() -> str:
        result = ecps.complete_login()
        captured["id_token"] = result.id_token
        return "ok"

    client = app.test_client()
    callback = psc.approve(start_login(client), DOCTOR_APP).replace("/.gateway/ecps/callback", "/capture")
    assert follow_callback(client, callback).status_code == 200
    with pytest.raises(EcpsError) as refused:
        ecps.verify_logout_token(captured["id_token"])
    assert refused.value.reason is Reason.TOKEN_INVALID
    with pytest.raises(EcpsError):
        ecps.verify_logout_token("not-a-jwt")


def test_rp_initiated_logout_url_is_accepted_by_the_provider(psc: PscServer) -> None:
    app, ecps = make_rp(psc.metadata_url)
    captured: dict[str, str] = {}

    @app.get("/capture")
    def capture() -> str:
        captured["id_token"] = ecps.complete_login().id_token
        return "ok"

    client = app.test_client()
    callback = psc.approve(start_login(client), DOCTOR_APP).replace("/.gateway/ecps/callback", "/capture")
    follow_callback(client, callback)
    with app.test_request_context():
        url = ecps.end_session_url(captured["id_token"], state="bye")
    assert url is not None
    answer = requests.get(url, allow_redirects=False, timeout=5)
    assert answer.status_code == 302
    assert answer.headers["Location"] == POST_LOGOUT_URI + "?state=bye"


def test_a_rotated_provider_key_is_fetched_again(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    assert follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)).status_code == 200
    psc.rotate_keys()  # the cached JWKS no longer knows the kid of the next tokens
    answer = follow_callback(client, psc.approve(start_login(client), DOCTOR_APP))
    assert answer.status_code == 200, answer.get_data(as_text=True)


def test_private_key_jwt_with_an_unregistered_key_is_refused(psc: PscServer) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    answer = login(
        psc,
        client_id=JWT_CLIENT,
        client_auth="private_key_jwt",
        client_secret=None,
        private_key_pem=other_pem,
    )
    assert_refused(answer, Reason.TOKEN_INVALID)


def test_logout_token_for_another_audience_is_refused(psc: PscServer, world: PscWorld) -> None:
    app, ecps = make_rp(psc.metadata_url)
    client = app.test_client()
    follow_callback(client, psc.approve(start_login(client), DOCTOR_APP))
    world.receiver.tokens.clear()
    psc.set_faults(wrong_audience=True)
    psc.backchannel_logout(idnat=DOCTOR_APP)
    [token] = world.receiver.tokens
    with pytest.raises(EcpsError) as refused:
        ecps.verify_logout_token(token)
    assert refused.value.reason is Reason.TOKEN_INVALID


def test_abandoned_logins_do_not_grow_the_login_cookie(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    for _ in range(3):
        start_login(client)
    size_after_three = len(client.get_cookie("__Host-gateway-login", domain="localhost").value)
    abandoned = [start_login(client) for _ in range(20)]
    cookie = client.get_cookie("__Host-gateway-login", domain="localhost")
    assert len(cookie.value) <= size_after_three + 64
    # The most recent login still completes; a long-abandoned one no longer does.
    assert follow_callback(client, psc.approve(abandoned[-1], DOCTOR_APP)).status_code == 200
    assert_refused(follow_callback(client, psc.approve(abandoned[0], DOCTOR_APP)), Reason.STATE_MISMATCH)


def test_a_provider_that_hangs_is_unavailable_after_the_timeout(psc: PscServer) -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        app, _ = make_rp(f"http://127.0.0.1:{port}/.well-known/wallet-openid-configuration", timeout=0.5)
        started = time.monotonic()
        answer = app.test_client().get("/.gateway/login/ecps", base_url="https://localhost")
    assert_refused(answer, Reason.IDP_UNAVAILABLE)
    assert time.monotonic() - started < 3


def test_a_callback_naming_another_issuer_is_refused(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    callback = psc.approve(start_login(client), DOCTOR_APP) + "&iss=https%3A%2F%2Fevil.example"
    assert_refused(follow_callback(client, callback), Reason.TOKEN_INVALID)


def test_provider_errors_are_reduced_to_a_code(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    state = query_of(start_login(client))["state"]
    answer = follow_callback(client, f"/.gateway/ecps/callback?state={state}&error=bad%0Aline%20injected")
    assert_refused(answer, Reason.IDP_ERROR)
    assert answer.get_json()["detail"] == "provider error unrecognised_error"


def test_unknown_key_ids_do_not_make_the_gateway_hammer_the_jwks(psc: PscServer) -> None:
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    assert follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)).status_code == 200
    psc.rotate_keys()
    assert follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)).status_code == 200
    psc.rotate_keys()  # a second rotation within jwks_refetch_interval: refused until the interval passes
    assert_refused(
        follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)), Reason.TOKEN_INVALID
    )


def es256_client(world: PscWorld) -> dict[str, Any]:
    """The relying party's settings for private_key_jwt with its EC P-256 key."""
    return {
        "client_id": ES256_CLIENT,
        "client_auth": "private_key_jwt",
        "client_secret": None,
        "private_key_pem": world.ec_private_key_pem,
        "key_id": "gateway-ec-1",
    }


def test_private_key_jwt_with_an_ec_p256_key_signs_es256(psc: PscServer, world: PscWorld) -> None:
    app, ecps = make_rp(psc.metadata_url, **es256_client(world))
    client = app.test_client()
    answer = follow_callback(client, psc.approve(start_login(client), DOCTOR_APP))
    # The stand-in verified the assertion with the registered EC key: only an ES256 signature passes.
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["identity"]["idnat"] == DOCTOR_APP
    assert ecps.client_assertion_alg == "ES256"


@pytest.mark.parametrize("key", ["ec-p384", "rsa-public"])
def test_keys_that_cannot_sign_a_client_assertion_are_refused_at_construction(key: str) -> None:
    if key == "ec-p384":
        pem, _ = pem_pair(ec.generate_private_key(ec.SECP384R1()))
    else:
        _, pem = pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(ValueError):
        make_rp("http://127.0.0.1:9/x", client_auth="private_key_jwt", private_key_pem=pem)


def test_a_provider_not_advertising_the_key_s_algorithm_refuses_logins_with_a_reason(
    tmp_path: Path, world: PscWorld
) -> None:
    client = {
        "client_id": ES256_CLIENT,
        "token_endpoint_auth_method": "private_key_jwt",
        "public_key_pem": pem_pair(ec.generate_private_key(ec.SECP256R1()))[1],
        "redirect_uris": ["https://localhost/.gateway/ecps/callback"],
    }
    with running_psc(tmp_path, [client], args=["--client-assertion-alg", "RS256"]) as rs256_only:
        app, ecps = make_rp(rs256_only.metadata_url, **es256_client(world))
        answer = app.test_client().get("/.gateway/login/ecps", base_url="https://localhost")
    assert_refused(answer, Reason.IDP_ERROR)
    assert "ES256" in answer.get_json()["detail"]
    assert ecps.status().state is ProviderState.MISCONFIGURED


def test_without_max_age_an_id_token_may_omit_auth_time(psc: PscServer) -> None:
    psc.set_faults(omit_auth_time=True)
    answer = login(psc)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    # Unknown: as old as can be, so that any rule with a max_age asks for a fresh login.
    assert answer.get_json()["identity"]["auth_time"] == UNKNOWN_AUTH_TIME


def test_with_max_age_an_id_token_without_auth_time_is_refused(psc: PscServer) -> None:
    psc.set_faults(omit_auth_time=True)
    app, _ = make_rp(psc.metadata_url)
    client = app.test_client()
    answer = follow_callback(client, psc.approve(start_login(client, max_age=60), DOCTOR_APP))
    assert_refused(answer, Reason.TOKEN_INVALID)


def forged_logout_token(kid: str) -> str:
    """Signed with a key PSC never had, under a key id it never published: anyone can make one."""
    key = RSAKey.generate_key(2048, {"kid": kid})
    claims = {"iss": "x", "aud": "y", "iat": int(time.time()), "jti": kid, "sub": "f:x:1"}
    return jwt.encode({"alg": "RS256", "kid": kid}, claims, key)


def test_forged_logout_tokens_cannot_spend_the_jwks_refetch_a_login_needs(psc: PscServer) -> None:
    app, ecps = make_rp(psc.metadata_url)
    client = app.test_client()
    assert follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)).status_code == 200
    for attempt in range(3):  # the back-channel logout endpoint is open to anyone
        with pytest.raises(EcpsError):
            ecps.verify_logout_token(forged_logout_token(f"unknown-{attempt}"))
    psc.rotate_keys()  # PSC rotates its keys just then: the next login's id_token has a new kid
    answer = follow_callback(client, psc.approve(start_login(client), DOCTOR_APP))
    assert answer.status_code == 200, answer.get_data(as_text=True)


def test_the_provider_s_state_follows_what_it_answers(psc: PscServer) -> None:
    changes: list[ProviderState] = []
    app, ecps = make_rp(psc.metadata_url, on_state_change=changes.append)
    assert ecps.status().state is ProviderState.STARTING
    client = app.test_client()
    authorization_url = start_login(client)  # discovery
    assert ecps.status().state is ProviderState.UP
    callback = psc.approve(authorization_url, DOCTOR_APP)
    psc.set_faults(unavailable=True)
    assert_refused(follow_callback(client, callback), Reason.IDP_UNAVAILABLE)
    status = ecps.status()
    assert status.state is ProviderState.DOWN and "token request" in status.detail
    psc.set_faults(unavailable=False)
    assert follow_callback(client, psc.approve(start_login(client), DOCTOR_APP)).status_code == 200
    assert ecps.status().state is ProviderState.UP
    assert changes == [ProviderState.UP, ProviderState.DOWN, ProviderState.UP]


def test_discovery_is_retried_in_the_background_until_the_provider_answers(
    tmp_path: Path, world: PscWorld
) -> None:
    port = free_port()
    _, ecps = make_rp(
        f"http://127.0.0.1:{port}/auth/realms/esante-wallet/.well-known/wallet-openid-configuration"
    )
    ecps.start_background_discovery()
    try:
        deadline = time.monotonic() + 10
        while ecps.status().state is not ProviderState.DOWN:
            assert time.monotonic() < deadline, ecps.status()
            time.sleep(0.05)
        with running_psc(tmp_path, [], port=port):
            while ecps.status().state is not ProviderState.UP:  # nobody logs in: the thread found it
                assert time.monotonic() < deadline + 20, ecps.status()
                time.sleep(0.1)
    finally:
        ecps.stop_background_discovery()
