"""The gateway against an OpenID Connect provider it was not written with: panva/oidc-provider (node), as a
real process, in its own behaviour (standard discovery path, no auth_time unless max_age, userinfo as JSON,
its own login and logout pages, back-channel logout with sid). The gateway authenticates with
private_key_jwt signed ES256, then with tls_client_auth behind nginx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from tests.support.ecps import (
    CLIENT_ID,
    DOCTOR,
    IDENTITIES,
    SESSION_COOKIE,
    Browser,
    EcpsWorld,
    running_ecps_gateway,
)
from tests.support.oidc_provider import OidcProvider, running_oidc_provider
from tests.support.processes import free_port
from tests.support.psc import query_of
from tests.support.psc_mtls import mtls_pki, running_mtls_terminator

KEY_ID = "gateway-es256"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path
) -> Iterator[tuple[OidcProvider, EcpsWorld]]:
    directory = tmp_path_factory.mktemp("oidc-provider")
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = directory / "client-es256.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public_jwk = {**ECKey.import_key(key_file.read_text()).as_dict(private=False), "kid": KEY_ID}
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    client = {
        "client_id": CLIENT_ID,
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "ES256",
        "jwks": {"keys": [public_jwk]},
        "redirect_uris": [gateway_url + "/.gateway/ecps/callback"],
        "post_logout_redirect_uris": [gateway_url + "/"],
        "backchannel_logout_uri": gateway_url + "/.gateway/ecps/backchannel-logout",
        "backchannel_logout_session_required": True,
        "grant_types": ["authorization_code"],
        "response_types": ["code"],
    }
    with running_oidc_provider(directory, [client], IDENTITIES) as provider:
        ecps = {
            "metadata_url": provider.metadata_url,
            "issuer": provider.issuer,
            "client_auth": "private_key_jwt",
            "client_secret": None,
            "private_key_file": str(key_file),
            "key_id": KEY_ID,
        }
        with running_ecps_gateway(
            directory / "gateway",
            provider,
            port=port,
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            ecps=ecps,  # type: ignore[arg-type]
        ) as world:
            yield provider, world


def log_in(
    provider: OidcProvider, world: EcpsWorld, browser: Browser, at_provider: requests.Session, path: str
) -> requests.Response:
    start = browser.get(world.gateway_url + "/.gateway/login/ecps", params={"next": path})
    assert start.status_code == 302, (start.status_code, start.headers.get("X-Gateway-Reason"))
    answer = browser.get(provider.approve(at_provider, start.headers["Location"], DOCTOR))
    assert answer.status_code == 303, (answer.status_code, answer.headers.get("X-Gateway-Reason"))
    return browser.follow(answer)


def test_login_with_an_es256_client_assertion_pkce_and_json_userinfo(
    stack: tuple[OidcProvider, EcpsWorld],
) -> None:
    provider, world = stack
    page = log_in(provider, world, Browser(), requests.Session(), "/echo/protected/x")
    assert page.status_code == 200
    headers = page.json()["headers"]
    assert (headers["x-gateway-subject"], headers["x-gateway-professions"]) == (DOCTOR, "10")
    # oidc-provider says when the professional authenticated only when asked (max_age): unknown here.
    assert headers["x-gateway-auth-time"] == "0"
    login = world.last_audit("login")
    assert (login["decision"], login["acr"]) == ("allow", "eidas1")


def test_a_rule_needing_the_login_s_age_gets_a_fresh_login_with_auth_time(
    stack: tuple[OidcProvider, EcpsWorld],
) -> None:
    provider, world = stack
    browser, at_provider = Browser(), requests.Session()
    assert log_in(provider, world, browser, at_provider, "/echo/protected/x").status_code == 200
    refused = browser.get(world.gateway_url + "/echo/stepup/transfer")
    assert (refused.status_code, refused.headers["X-Gateway-Reason"]) == (401, "login_too_old")
    start = browser.get(world.gateway_url + "/.gateway/login/ecps", params={"next": "/echo/stepup/transfer"})
    assert query_of(start.headers["Location"])["max_age"] == "2"
    before = time.time()
    answer = browser.get(provider.approve(at_provider, start.headers["Location"], DOCTOR))  # logs in again
    page = browser.follow(answer)
    assert page.status_code == 200, page.headers.get("X-Gateway-Reason")
    assert int(page.json()["headers"]["x-gateway-auth-time"]) >= int(before) - 1


def test_back_channel_logout_ends_the_sessions_of_that_provider_session_only(
    stack: tuple[OidcProvider, EcpsWorld],
) -> None:
    provider, world = stack
    at_provider, elsewhere = requests.Session(), requests.Session()
    first, second, third = Browser(), Browser(), Browser()
    for browser, provider_session in ((first, at_provider), (second, at_provider), (third, elsewhere)):
        assert log_in(provider, world, browser, provider_session, "/echo/protected/x").status_code == 200

    # The first logs out: the gateway sends it to the provider's logout (RP-initiated), which ends its
    # session there and tells every client of that session (back-channel), the gateway included.
    confirmation = first.get(world.gateway_url + "/.gateway/logout")
    csrf = confirmation.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    end_session = first.post(world.gateway_url + "/.gateway/logout", data={"csrf_token": csrf})
    assert end_session.headers["Location"].startswith(provider.issuer)
    assert provider.confirm_logout(at_provider, end_session.headers["Location"]).startswith(world.gateway_url)

    deadline = time.monotonic() + 10
    while (logout := world.last_audit("logout"))["reasons"] != ["backchannel_logout"]:
        assert time.monotonic() < deadline, "no back-channel logout arrived"
        time.sleep(0.1)
    assert (logout["scope"], logout["sessions_ended"], logout["idnat"]) == ("sid", 1, DOCTOR)
    assert browser_reads(world, second) is False, "same provider session: ended"
    assert browser_reads(world, third) is True, "another provider session of the same professional"


def browser_reads(world: EcpsWorld, browser: Browser) -> bool:
    return (
        SESSION_COOKIE in browser.cookies
        and browser.get(world.gateway_url + "/echo/protected/x").status_code == 200
    )


@pytest.fixture(scope="module")
def mtls_stack(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path
) -> Iterator[tuple[OidcProvider, EcpsWorld]]:
    """oidc-provider behind nginx requiring the client certificate on its mTLS listener (the same terminator
    as the stand-in's): tls_client_auth, certificate-bound access tokens, pushed authorization requests."""
    directory = tmp_path_factory.mktemp("oidc-provider-mtls")
    pki = mtls_pki(directory / "pki")
    provider_port, port = free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    client = {
        "client_id": CLIENT_ID,
        "token_endpoint_auth_method": "tls_client_auth",
        "tls_client_auth_subject_dn": pki.subject("gateway"),
        "tls_client_certificate_bound_access_tokens": True,
        "redirect_uris": [gateway_url + "/.gateway/ecps/callback"],
        "grant_types": ["authorization_code"],
        "response_types": ["code"],
    }
    with running_mtls_terminator(directory, pki, provider_port) as terminator:
        aliases = {
            "token_endpoint": terminator.mtls_url + "/token",
            "userinfo_endpoint": terminator.mtls_url + "/me",
            "pushed_authorization_request_endpoint": terminator.mtls_url + "/request",
        }
        with running_oidc_provider(
            directory,
            [client],
            IDENTITIES,
            port=provider_port,
            public_url=terminator.public_url,
            verify=str(pki.server_ca),
            mtls=True,
            discovery={"mtls_endpoint_aliases": aliases},
        ) as provider:
            cert, key = pki.client("gateway")
            ecps = {
                "metadata_url": provider.metadata_url,
                "issuer": provider.issuer,
                "client_auth": "tls_client_auth",
                "client_secret": None,
                "client_certificate_file": str(cert),
                "client_certificate_key_file": str(key),
                "server_ca_file": str(pki.server_ca),
                "pushed_authorization_requests": True,
            }
            with running_ecps_gateway(
                directory / "gateway",
                provider,  # type: ignore[arg-type]
                port=port,
                upstream_url=upstream_url,
                assertion_key=assertion_key,
                ecps=ecps,
            ) as world:
                yield provider, world


def test_tls_client_auth_with_a_certificate_bound_token_and_a_pushed_request(
    mtls_stack: tuple[OidcProvider, EcpsWorld],
) -> None:
    provider, world = mtls_stack
    browser = Browser()
    start = browser.get(world.gateway_url + "/.gateway/login/ecps", params={"next": "/echo/protected/x"})
    assert start.status_code == 302, start.headers.get("X-Gateway-Reason")
    assert set(query_of(start.headers["Location"])) == {"client_id", "request_uri"}
    answer = browser.get(provider.approve(requests.Session(), start.headers["Location"], DOCTOR))
    assert answer.status_code == 303, answer.headers.get("X-Gateway-Reason")
    # The access token oidc-provider issued is bound to the certificate (cnf x5t#S256); its userinfo
    # answered the gateway, which presented that certificate there.
    assert browser.follow(answer).json()["headers"]["x-gateway-subject"] == DOCTOR
