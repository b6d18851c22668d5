"""The Pro Santé Connect stand-in, as a real process, spoken to with plain HTTP (no gateway code)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.support.processes import PYTHON, free_port, running
from tests.support.psc import PscServer, query_of, running_psc

CLIENT_ID = "portal"
SECRET = "portal-secret"
REDIRECT_URI = "https://portal.test/callback"
DOCTOR = "810001234567"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PscServer]:
    clients = [{"client_id": CLIENT_ID, "client_secret": SECRET, "redirect_uris": [REDIRECT_URI]}]
    with running_psc(Path(tmp_path_factory.mktemp("psc")), clients) as psc:
        yield psc


@pytest.fixture
def psc(server: PscServer) -> Iterator[PscServer]:
    server.reset()
    yield server
    server.reset()


def metadata(psc: PscServer) -> dict[str, Any]:
    return dict(requests.get(psc.metadata_url, timeout=5).json())


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorization_url(psc: PscServer, **overrides: str | None) -> str:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid scope_all",
        "state": secrets.token_urlsafe(8),
        "nonce": secrets.token_urlsafe(8),
    }
    params.update(overrides)
    request = requests.Request("GET", metadata(psc)["authorization_endpoint"], params=params).prepare()
    return str(request.url)


def code_for(psc: PscServer, challenge: str, **overrides: str | None) -> str:
    callback = psc.approve(
        authorization_url(psc, code_challenge=challenge, code_challenge_method="S256", **overrides), DOCTOR
    )
    return query_of(callback)["code"]


def exchange(psc: PscServer, code: str, verifier: str | None) -> requests.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    if verifier:
        data["code_verifier"] = verifier
    return requests.post(metadata(psc)["token_endpoint"], data=data, auth=(CLIENT_ID, SECRET), timeout=5)


def tokens(psc: PscServer, **overrides: str | None) -> dict[str, Any]:
    verifier, challenge = pkce_pair()
    answer = exchange(psc, code_for(psc, challenge, **overrides), verifier)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def jwks(psc: PscServer) -> KeySet:
    return KeySet.import_key_set(requests.get(metadata(psc)["jwks_uri"], timeout=5).json())


def test_discovery_at_psc_non_standard_path(psc: PscServer) -> None:
    document = metadata(psc)
    assert document["issuer"] == psc.issuer
    assert document["issuer"].endswith("/auth/realms/esante-wallet")
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["backchannel_logout_supported"] is True
    assert {"client_secret_basic", "private_key_jwt"} <= set(
        document["token_endpoint_auth_methods_supported"]
    )
    for key in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "end_session_endpoint"):
        assert document[key].startswith(psc.issuer)
    standard = requests.get(psc.issuer + "/.well-known/openid-configuration", timeout=5).json()
    assert standard == document


def test_pkce_is_required_even_for_a_confidential_client(psc: PscServer) -> None:
    answer = requests.get(authorization_url(psc), allow_redirects=False, timeout=5)
    assert answer.status_code == 302
    assert query_of(answer.headers["Location"])["error"] == "invalid_request"

    _, challenge = pkce_pair()
    refused = exchange(psc, code_for(psc, challenge), verifier=None)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_request"

    wrong_verifier, _ = pkce_pair()
    mismatched = exchange(psc, code_for(psc, challenge), wrong_verifier)
    assert mismatched.json()["error"] == "invalid_grant"


def test_plain_pkce_is_refused(psc: PscServer) -> None:
    url = authorization_url(psc, code_challenge="a" * 43, code_challenge_method="plain")
    answer = requests.get(url, allow_redirects=False, timeout=5)
    assert query_of(answer.headers["Location"])["error"] == "invalid_request"


def test_id_token_carries_scope_all_claims_nonce_acr_and_auth_time(psc: PscServer) -> None:
    before = int(time.time())
    issued = tokens(psc, nonce="n-123", acr_values="eidas2")
    claims = jwt.decode(issued["id_token"], jwks(psc)).claims
    assert claims["iss"] == psc.issuer and claims["aud"] == CLIENT_ID
    assert claims["nonce"] == "n-123" and claims["acr"] == "eidas2"
    assert before - 1 <= claims["auth_time"] <= int(time.time()) + 1
    assert claims["sub"].startswith("f:") and claims["sub"].endswith(":" + DOCTOR)
    assert claims["SubjectNameID"] == claims["preferred_username"] == DOCTOR
    exercice = claims["SubjectRefPro"]["exercices"][0]
    assert exercice["codeProfession"] == "10" and exercice["activities"]
    assert claims["authMode"] == "MOBILE"


def test_userinfo_is_a_signed_jwt(psc: PscServer) -> None:
    issued = tokens(psc)
    answer = requests.get(
        metadata(psc)["userinfo_endpoint"],
        headers={"Authorization": "Bearer " + issued["access_token"]},
        timeout=5,
    )
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/jwt"
    claims = jwt.decode(answer.text, jwks(psc)).claims
    assert claims["iss"] == psc.issuer and claims["aud"] == CLIENT_ID
    assert claims["SubjectNameID"] == DOCTOR
    no_token = requests.get(metadata(psc)["userinfo_endpoint"], timeout=5)
    assert no_token.status_code == 401


def test_approval_page_lists_identities_and_refusal_returns_access_denied(psc: PscServer) -> None:
    url = authorization_url(psc, code_challenge=pkce_pair()[1], code_challenge_method="S256", state="s1")
    page = requests.get(url, timeout=5)
    assert page.status_code == 200
    for text in (DOCTOR, "DUPONT", "810009876543", "CARD", "Approuver", "Refuser"):
        assert text in page.text
    refused = requests.post(url, data={"decision": "deny", "idnat": DOCTOR}, allow_redirects=False, timeout=5)
    denial = query_of(refused.headers["Location"])
    assert (denial["error"], denial["state"]) == ("access_denied", "s1")
    approved = requests.post(
        url, data={"decision": "approve", "idnat": DOCTOR}, allow_redirects=False, timeout=5
    )
    assert "code" in query_of(approved.headers["Location"])


def test_faults_bend_tokens_and_outage_answers_503(psc: PscServer) -> None:
    psc.set_faults(wrong_issuer=True, wrong_audience=True, expired_token=True)
    claims = jwt.decode(tokens(psc)["id_token"], jwks(psc)).claims
    assert claims["iss"] != psc.issuer and claims["aud"] != CLIENT_ID and claims["exp"] < time.time()

    psc.reset()
    psc.set_faults(bad_signature=True)
    with pytest.raises(Exception, match="signature"):
        jwt.decode(tokens(psc)["id_token"], jwks(psc))

    psc.set_faults(unavailable=True)
    assert requests.get(psc.metadata_url, timeout=5).status_code == 503
    psc.reset()
    assert requests.get(psc.metadata_url, timeout=5).status_code == 200


def test_unknown_fault_is_rejected(psc: PscServer) -> None:
    answer = requests.post(psc.base_url + "/_test/faults", json={"typo": True}, timeout=5)
    assert answer.status_code == 400


def test_command_line_client_and_identities(tmp_path: Path) -> None:
    identities = tmp_path / "identities.yaml"
    identities.write_text(
        yaml.safe_dump(
            {
                "identities": [
                    {
                        "idnat": "810007777777",
                        "family_name": "LEROY",
                        "given_name": "ANNE",
                        "profession": "60",
                        "auth_mode": "MOBILE",
                    }
                ]
            }
        ),
        encoding="utf-8",
    )
    port = free_port()
    argv = [PYTHON, "-m", "gateway.devtools.psc", "--port", str(port), "--issuer-path", "/realms/other"]
    argv += ["--identities", str(identities), "--client-id", "cli", "--client-secret", "x"]
    argv += ["--redirect-uri", REDIRECT_URI, "--userinfo-format", "json"]
    with running(argv, port):
        issuer = f"http://127.0.0.1:{port}/realms/other"
        document = requests.get(issuer + "/.well-known/wallet-openid-configuration", timeout=5).json()
        assert document["issuer"] == issuer
        params = {
            "response_type": "code",
            "client_id": "cli",
            "redirect_uri": REDIRECT_URI,
            "scope": "openid scope_all",
            "nonce": "n",
            "code_challenge": pkce_pair()[1],
            "code_challenge_method": "S256",
        }
        page = requests.get(document["authorization_endpoint"], params=params, timeout=5)
        assert "810007777777" in page.text and "LEROY" in page.text and DOCTOR not in page.text
