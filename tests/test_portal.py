"""gateway.portal against a real gateway process: a portal process (Flask extension and WSGI middleware, see
tests/support/portal_apps.py) behind a gateway process sharing sessions through a real Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from werkzeug.test import Client

from gateway.identity import Identity, LoginMethod
from gateway.portal import (
    AssertionMiddleware,
    AssertionRefused,
    AssertionVerifier,
    GatewayKeys,
    Professional,
)
from gateway.proxy.assertion import AssertionSigner
from gateway.sessions import RedisSessionStore
from tests.support.portal_stack import PortalStack, portal_behind_gateway
from tests.support.processes import REPO_ROOT, free_port

COOKIE = "__Host-gateway-session"
VARIANTS = ["flask", "wsgi"]
POLICIES = """\
rules:
  - name: portal-public
    match: { paths: [/flask/public, /wsgi/public] }
    action: public
  - name: portal
    match: { paths: [/flask/**, /wsgi/**] }
    action: authenticate
"""
DOCTOR = Identity(
    "810002813839",
    LoginMethod.CARD,
    auth_time=float(int(time.time()) - 120),
    surname="DUPONT",
    given_name="JEAN",
    professions=("10", "21"),
    auth_mode="CARD",
)


class World:
    def __init__(self, stack: PortalStack) -> None:
        self.gateway = stack.gateway
        self.portal = stack.portal
        self.sessions = RedisSessionStore(stack.redis_url)

    @property
    def jwks_url(self) -> str:
        return f"{self.gateway}/.gateway/jwks.json"

    def session(self, identity: Identity = DOCTOR) -> str:
        return self.sessions.create(identity, time.time()).id

    def through_gateway(self, method: str, path: str, session: str | None = None) -> requests.Response:
        cookies = {COOKIE: session} if session else {}
        return requests.request(
            method, self.gateway + path, cookies=cookies, timeout=5, allow_redirects=False
        )

    def direct(self, method: str, path: str, token: str | None = None) -> requests.Response:
        """Straight to the portal, as a hop that bypasses the gateway would."""
        headers = {"X-Gateway-Assertion": token} if token else {}
        return requests.request(method, self.portal + path, headers=headers, timeout=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, assertion_key: Path) -> Iterator[World]:
    with portal_behind_gateway(
        tmp_path_factory.mktemp("portal"),
        assertion_key,
        lambda gateway: "tests.support.portal_apps:app",
        policies=POLICIES,
        portal_env=lambda gateway: {"PORTAL_GATEWAY_JWKS": f"{gateway}/.gateway/jwks.json"},
    ) as stack:
        yield World(stack)


def professional_of(answer: requests.Response) -> dict[str, Any]:
    assert answer.status_code == 200, (answer.status_code, answer.text[:300])
    return answer.json()["professional"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_view_gets_the_professional_the_gateway_let_in(world: World, variant: str) -> None:
    seen = professional_of(world.through_gateway("GET", f"/{variant}/patients/1", world.session()))
    assert seen["idnat"] == DOCTOR.idnat
    assert seen["professions"] == ["10", "21"]
    assert seen["method"] == "card"
    assert seen["login_time"] == DOCTOR.auth_time
    assert (seen["given_name"], seen["family_name"], seen["rule"]) == ("JEAN", "DUPONT", "portal")


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_request_that_bypasses_the_gateway_gets_401(world: World, variant: str) -> None:
    assert world.direct("GET", f"/{variant}/patients/1").status_code == 401
    forged_headers = {"X-Gateway-Subject": DOCTOR.idnat, "X-Gateway-Auth-Method": "card"}
    answer = requests.get(f"{world.portal}/{variant}/patients/1", headers=forged_headers, timeout=5)
    assert answer.status_code == 401
    assert "WWW-Authenticate" not in answer.headers  # nothing the browser could answer itself


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_assertion_lifted_from_one_request_is_worthless_on_another(world: World, variant: str) -> None:
    lifted = world.through_gateway("GET", f"/{variant}/patients/1", world.session()).json()["token"]
    assert world.direct("GET", f"/{variant}/patients/2", lifted).status_code == 401
    assert world.direct("POST", f"/{variant}/patients/1", lifted).status_code == 401
    # The very same read may come again (the gateway itself reuses read tokens).
    assert professional_of(world.direct("GET", f"/{variant}/patients/1", lifted))["idnat"] == DOCTOR.idnat


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_state_changing_request_is_accepted_once(world: World, variant: str) -> None:
    sent = world.through_gateway("POST", f"/{variant}/account/rib", world.session())
    assert professional_of(sent)["idnat"] == DOCTOR.idnat
    assert world.direct("POST", f"/{variant}/account/rib", sent.json()["token"]).status_code == 401


@pytest.mark.parametrize("variant", VARIANTS)
def test_public_pages_need_no_assertion_but_refuse_a_bad_one(world: World, variant: str) -> None:
    assert professional_of(world.through_gateway("GET", f"/{variant}/public", world.session())) is None
    assert world.direct("GET", f"/{variant}/public", "not-a-token").status_code == 401


def signer(key: Path | bytes, **overrides: Any) -> AssertionSigner:
    pem = key.read_bytes() if isinstance(key, Path) else key
    settings = {"issuer": "cps-gateway", "audience": "portal", "lifetime": 60.0, **overrides}
    return AssertionSigner(pem, **settings)


def token(
    key: Path | bytes, *, now: float | None = None, method: str = "GET", path: str = "/x", **kw: Any
) -> str:
    moment = time.time() if now is None else now
    return signer(key, **kw).assertion(DOCTOR, "session", "portal", moment, method=method, path=path)


def verify(world: World, value: str, *, now: float | None = None, **settings: Any) -> Professional:
    clock = (lambda: now) if now is not None else time.time
    verifier = AssertionVerifier(GatewayKeys(world.jwks_url), clock=clock, **settings)
    return verifier.verify(value, method="GET", path="/x")


def refusal_code(world: World, value: str, **settings: Any) -> str:
    with pytest.raises(AssertionRefused) as refused:
        verify(world, value, **settings)
    return refused.value.code


def test_the_gateways_own_token_verifies(world: World, assertion_key: Path) -> None:
    professional = verify(world, token(assertion_key))
    assert (professional.idnat, professional.method, professional.professions) == (
        DOCTOR.idnat,
        "card",
        ("10", "21"),
    )
    assert professional.login_time.timestamp() == DOCTOR.auth_time


def test_a_token_signed_with_another_key_is_refused(world: World, assertion_key: Path) -> None:
    other = ECKey.generate_key("P-256")
    other_pem = other.as_pem(private=True)
    assert refusal_code(world, token(other_pem)) == "invalid"  # unknown kid
    genuine_kid = jwt.decode(
        token(assertion_key), KeySet.import_key_set(requests.get(world.jwks_url, timeout=5).json())
    ).header["kid"]
    claims = jwt.decode(
        token(assertion_key), KeySet.import_key_set(requests.get(world.jwks_url, timeout=5).json())
    ).claims
    impostor = jwt.encode({"alg": "ES256", "kid": genuine_kid}, claims, other)
    assert refusal_code(world, impostor) == "invalid"  # the gateway's kid, not its key


def test_time_issuer_and_audience_are_checked(world: World, assertion_key: Path) -> None:
    now = time.time()
    assert refusal_code(world, token(assertion_key, now=now - 70), now=now) == "expired"
    assert refusal_code(world, token(assertion_key, now=now + 30), now=now) == "invalid_claims"  # nbf, iat
    assert (
        verify(world, token(assertion_key, now=now + 3), now=now).idnat == DOCTOR.idnat
    )  # within the leeway
    assert refusal_code(world, token(assertion_key, audience="another-portal")) == "invalid_claims"
    assert refusal_code(world, token(assertion_key, issuer="someone-else")) == "invalid_claims"
    assert verify(world, token(assertion_key, audience="billing"), audience="billing").idnat == DOCTOR.idnat


def test_a_token_without_request_binding_is_refused_unless_the_portal_opts_out(
    world: World, assertion_key: Path
) -> None:
    keys = KeySet.import_key_set(requests.get(world.jwks_url, timeout=5).json())
    decoded = jwt.decode(token(assertion_key), keys)
    claims = {k: v for k, v in decoded.claims.items() if k not in ("htm", "htu", "jti")}
    unbound = jwt.encode(dict(decoded.header), claims, ECKey.import_key(assertion_key.read_bytes()))
    assert refusal_code(world, unbound) == "request_mismatch"
    assert verify(world, unbound, require_request_binding=False).idnat == DOCTOR.idnat


def test_no_keys_means_503_not_a_guess(assertion_key: Path) -> None:
    dead = GatewayKeys(f"http://127.0.0.1:{free_port()}/.gateway/jwks.json", timeout=1)
    portal = AssertionMiddleware(lambda environ, start: [], AssertionVerifier(dead))
    answer = Client(portal).get("/x", headers={"X-Gateway-Assertion": token(assertion_key)})
    assert answer.status_code == 503


class _JwksServer:
    """A JWKS endpoint whose keys a test changes, counting the fetches."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = json.dumps(server.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "public, max-age=300")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/jwks.json"

    def publish(self, *keys: ECKey) -> None:
        self.document = {
            "keys": [dict(k.as_dict(private=False), kid=k.thumbprint(), alg="ES256") for k in keys]
        }


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer()
    thread = threading.Thread(target=server.http.serve_forever, daemon=True)
    thread.start()
    yield server
    server.http.shutdown()
    server.http.server_close()
    thread.join(5)


def test_keys_are_cached_refetched_for_a_new_kid_and_never_hammered(jwks_server: _JwksServer) -> None:
    old, new = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    jwks_server.publish(old)
    clock = [1000.0]
    verifier = AssertionVerifier(
        GatewayKeys(jwks_server.url, min_refetch_interval=30, clock=lambda: clock[0]),
        require_request_binding=False,
    )

    def signed(key: ECKey) -> str:
        now = int(time.time())
        claims = {
            "iss": "cps-gateway",
            "aud": "portal",
            "sub": "810002813839",
            "exp": now + 60,
            "auth_time": now,
            "amr": ["card"],
        }
        return jwt.encode({"alg": "ES256", "kid": key.thumbprint()}, claims, key)

    for _ in range(3):
        verifier.verify(signed(old), method="GET", path="/x")
    assert jwks_server.fetches == 1  # cached (max-age 300)
    jwks_server.publish(old, new)  # the gateway's key rotates
    clock[0] += 31
    verifier.verify(signed(new), method="GET", path="/x")
    assert jwks_server.fetches == 2  # an unknown kid fetched the keys again
    made_up = ECKey.generate_key("P-256")
    for _ in range(5):
        with pytest.raises(AssertionRefused):
            verifier.verify(signed(made_up), method="GET", path="/x")
    assert jwks_server.fetches == 2  # unknown kids within 30 s: no new fetch
    clock[0] += 301
    verifier.verify(signed(new), method="GET", path="/x")
    assert jwks_server.fetches == 3  # max-age over


def test_the_documented_flask_example_works(world: World, assertion_key: Path) -> None:
    text = (REPO_ROOT / "docs" / "portal.md").read_text()
    block = text.split("<!-- portal-example:start", 1)[1].split("<!-- portal-example:end", 1)[0]
    source = block.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in source.splitlines() if line.strip()]) <= 10
    namespace: dict[str, Any] = {"__name__": "portal_example"}
    exec(compile(source.replace("https://portal.example.fr", world.gateway), "portal.md", "exec"), namespace)  # noqa: S102
    client = namespace["app"].test_client()
    path = "/patients/180017512345678"
    answer = client.get(path, headers={"X-Gateway-Assertion": token(assertion_key, path=path)})
    assert answer.status_code == 200
    assert answer.get_data(as_text=True).startswith(f"{DOCTOR.idnat} (10, 21), card login at ")
    assert client.get(path).status_code == 401
