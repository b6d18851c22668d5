"""e-CPS login with tls_client_auth (RFC 8705): a real gateway process against the PSC stand-in behind a real
nginx that requires the client certificate on its mTLS listener; pushed authorization requests required."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.ecps import (
    CLIENT_ID,
    DOCTOR,
    IDENTITIES,
    Browser,
    EcpsWorld,
    gateway_registration,
    running_ecps_gateway,
)
from tests.support.processes import free_port
from tests.support.psc import query_of
from tests.support.psc_mtls import MtlsPki, MtlsPsc, mtls_pki, running_psc_behind_mtls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> MtlsPki:
    return mtls_pki(tmp_path_factory.mktemp("mtls-pki"))


#: A deployment's environment may name the system's CA bundle for requests: ecps.server_ca_file must still win.
SYSTEM_CA_BUNDLE = {"REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"}


def tls_client_auth(pki: MtlsPki, certificate: str = "gateway") -> dict[str, Any]:
    """The gateway's ``ecps`` settings for tls_client_auth with one of the PKI's client certificates."""
    cert, key = pki.client(certificate)
    return {
        "client_auth": "tls_client_auth",
        "client_secret": None,
        "client_certificate_file": str(cert),
        "client_certificate_key_file": str(key),
        "server_ca_file": str(pki.server_ca),
    }


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pki: MtlsPki, upstream_url: str, assertion_key: Path
) -> Iterator[tuple[MtlsPsc, EcpsWorld]]:
    directory = tmp_path_factory.mktemp("ecps-mtls")
    port = free_port()
    client = gateway_registration(
        f"http://127.0.0.1:{port}",
        client_secret="",
        token_endpoint_auth_method="tls_client_auth",
        tls_client_auth_subject_dn=pki.subject("gateway"),
    )
    with (
        running_psc_behind_mtls(directory, pki, [client], IDENTITIES, psc_args=["--require-par"]) as provider,
        running_ecps_gateway(
            directory / "gateway",
            provider.psc,
            port=port,
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            ecps=tls_client_auth(pki),
            env=SYSTEM_CA_BUNDLE,
        ) as world,
    ):
        yield provider, world


def test_login_with_the_client_certificate_a_pushed_request_and_a_certificate_bound_token(
    stack: tuple[MtlsPsc, EcpsWorld],
) -> None:
    provider, world = stack
    browser = Browser()
    start = browser.get(world.gateway_url + "/.gateway/login/ecps", params={"next": "/echo/protected/x"})
    assert start.status_code == 302, start.text[:300]
    authorization_url = start.headers["Location"]
    # PAR: the browser carries only a reference to what the gateway pushed (with its certificate).
    assert set(query_of(authorization_url)) == {"client_id", "request_uri"}
    answer = browser.get(provider.psc.approve(authorization_url, DOCTOR))
    # The token request and userinfo (the token bound to the certificate) went to the mTLS listener:
    # the public one hands no certificate to the provider, where tls_client_auth would fail.
    assert answer.status_code == 303, answer.headers.get("X-Gateway-Reason")
    page = browser.follow(answer)
    assert page.json()["headers"]["x-gateway-subject"] == DOCTOR


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def test_the_provider_requires_the_certificate_and_binds_its_tokens_to_it(
    stack: tuple[MtlsPsc, EcpsWorld],
) -> None:
    """What makes the test above meaningful, checked by hand with requests: no certificate, no connection to
    the mTLS listener; an access token issued there is refused at userinfo without that certificate."""
    provider, world = stack
    metadata = requests.get(provider.psc.metadata_url, verify=provider.pki.server_ca, timeout=5).json()
    aliases = metadata["mtls_endpoint_aliases"]
    assert urlsplit(aliases["token_endpoint"]).netloc == urlsplit(provider.mtls_url).netloc
    with pytest.raises(requests.exceptions.SSLError):  # TLS 1.3: the refusal may come as an alert...
        answer = requests.post(aliases["token_endpoint"], data={}, verify=provider.pki.server_ca, timeout=5)
        assert (
            answer.status_code == 400 and "No required SSL certificate" in answer.text
        )  # ...or as nginx's 400
        raise requests.exceptions.SSLError("refused by nginx with 400")

    certificate = provider.pki.client("gateway")
    tls = {"cert": certificate, "verify": str(provider.pki.server_ca), "timeout": 5}
    verifier, challenge = pkce()
    redirect_uri = world.gateway_url + "/.gateway/ecps/callback"
    pushed = requests.post(
        aliases["pushed_authorization_request_endpoint"],
        data={
            "client_id": CLIENT_ID,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": "openid scope_all",
            "nonce": "n",
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
        **tls,
    )
    assert pushed.status_code == 201, pushed.text
    authorization = f"{metadata['authorization_endpoint']}?client_id={CLIENT_ID}&request_uri={pushed.json()['request_uri']}"
    code = query_of(provider.psc.approve(authorization, DOCTOR))["code"]
    exchange = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    token = requests.post(
        aliases["token_endpoint"], data={**exchange, "client_id": CLIENT_ID, "code_verifier": verifier}, **tls
    )
    assert token.status_code == 200, token.text
    bearer = {"Authorization": "Bearer " + token.json()["access_token"]}
    assert requests.get(aliases["userinfo_endpoint"], headers=bearer, **tls).status_code == 200
    stolen = requests.get(
        metadata["userinfo_endpoint"], headers=bearer, verify=provider.pki.server_ca, timeout=5
    )
    assert stolen.status_code == 401  # the same token without the certificate


def test_a_certificate_the_provider_does_not_know_is_a_refused_login_not_an_error(
    stack: tuple[MtlsPsc, EcpsWorld], tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    provider, world = stack
    with running_ecps_gateway(
        tmp_path,
        provider.psc,
        port=free_port(),
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        ecps=tls_client_auth(provider.pki, "other-service"),
        env=SYSTEM_CA_BUNDLE,
        public_url=world.gateway_url,  # PSC knows this client by the first gateway's address
    ) as other:
        browser = Browser()
        start = browser.get(other.gateway_url + "/.gateway/login/ecps", params={"next": "/echo/protected/x"})
        # Its certificate is valid (the mTLS listener lets it in) but names another service: PAR refused.
        assert start.status_code == 502
        assert start.headers["X-Gateway-Reason"] == "idp_error"
        assert other.last_audit("login")["detail"] == "pushed authorization request refused: invalid_client"
