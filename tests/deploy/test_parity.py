"""The parity suite: the proxy-mode security cases, run against BOTH data planes, with real processes.

- ``proxy``: client -> gateway (``gateway serve``) -> portal;
- ``forward_auth``: client -> nginx (deploy/nginx/forward-auth.conf verbatim, placeholders filled) -> portal,
  nginx asking the same gateway process (/.gateway/auth).

The gateway runs the example policies (policies/portal.yaml) with sessions in Redis; the portal is a
recording stand-in (tests/support/recording_upstream.py), so every case proves what reached the portal and
what never did. Whatever differs between the two planes (the forward-auth plane refuses a URI that is not in
normal form where the proxy forwards the normal form) is asserted by its effect on the portal.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import posixpath
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urljoin, urlsplit
from uuid import uuid4

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.devtools.pki import DevPki
from gateway.identity import Identity, LoginMethod
from gateway.policy.paths import BadPath, normalise_target
from gateway.sessions import RedisSessionStore
from tests.support.audit import audit_records
from tests.support.card_stack import card_settings
from tests.support.config import write_config
from tests.support.ecps import (
    DOCTOR,
    ECPS_SECRETS,
    IDENTITIES,
    Browser,
    ecps_settings,
    gateway_registration,
)
from tests.support.gateways import serve_argv
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, running_nginx
from tests.support.processes import REPO_ROOT, free_port, running, wait_until
from tests.support.psc import PscServer, running_psc
from tests.support.raw_http import CLIENT_ADDRESS, RawResponse, raw_request
from tests.support.recording_upstream import CASE_HEADER, received
from tests.support.redis import RedisServer, redis_server
from tests.support.upstream import gunicorn_argv

COOKIE = "__Host-gateway-session"
NIR = "180017512345678"
EXAMPLE_POLICIES = (REPO_ROOT / "policies" / "portal.yaml").read_text()
#: Resources the example policies protect: reaching one without the right session is a bypass.
PROTECTED = ("/patients/", "/account", "/admin")


@dataclass(frozen=True)
class Plane:
    mode: str
    port: int
    recording: Path
    audit_file: Path
    store: RedisSessionStore
    gateway_url: str
    portal_address: str
    redis: RedisServer

    def send(
        self,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        method: str = "GET",
        host: str | None = None,
        body: bytes = b"",
    ) -> tuple[RawResponse, list[dict[str, Any]]]:
        """The response, and what the portal received for this request."""
        case = uuid4().hex
        sent = [(CASE_HEADER, case), *(headers or [])]
        response = raw_request(self.port, target, sent, method=method, host=host, body=body)
        return response, received(self.recording, case)

    def login(self, method: LoginMethod = LoginMethod.CARD, idnat: str = "810001234567") -> str:
        identity = Identity(
            idnat=idnat,
            method=method,
            auth_time=time.time(),
            professions=("10",),
            auth_mode="CARD" if method is LoginMethod.CARD else "MOBILE",
        )
        return self.store.create(identity, time.time()).id

    def audit(self) -> list[dict[str, Any]]:
        return audit_records(self.audit_file)


@contextlib.contextmanager
def running_planes(
    directory: Path,
    assertion_key: Path,
    extra: dict[str, dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
    gateway_port: int | None = None,
    nginx_http: str = "",
) -> Iterator[dict[str, Plane]]:
    """The portal stand-in, Redis, one gateway on the example policies (settings ``extra`` merged section
    by section) and nginx with the shipped template in front of it (``nginx_http``: the operator's own
    http-level directives around it): both planes."""
    recording = directory / "portal-requests.jsonl"
    portal_port, gateway_port = free_port(), gateway_port or free_port()
    portal = f"127.0.0.1:{portal_port}"
    access_log = directory / "nginx" / "access.log"
    portal_env = {
        "RECORDING_FILE": str(recording),
        "PORTAL_ORIGIN": f"http://{portal}",
        "PATH": "/usr/bin:/bin",
    }
    # A portal that reads X_Name as X-Name, as many frameworks do (gunicorn drops such fields by default).
    portal_argv = [
        *gunicorn_argv(portal_port, threads=4, app="tests.support.recording_upstream:app"),
        "--header-map",
        "dangerous",
    ]
    with (
        redis_server() as redis,
        running(portal_argv, portal_port, env=portal_env, log=directory / "portal.log"),
    ):
        settings: dict[str, dict[str, Any]] = {
            # The hosts of public_origin only (127.0.0.1): the default.
            "server": {"allowed_hosts": []},
            "sessions": {"store": redis.url, "local_cache_seconds": 0},
            # As deployed: the gateway reads nginx's access stream (nginx may cache protected answers).
            "forward_auth": {
                "trusted_nginx": ["127.0.0.1/32"],
                "access_log": str(access_log),
                # The template's __CACHE_DIR__/ended-sessions (running_nginx's cache directory: its prefix).
                "ended_sessions": str(directory / "nginx" / "ended-sessions"),
            },
            "limits": {"login_requests_per_ip": "10000/minute"},
        }
        for section, values in (extra or {}).items():
            settings[section] = {**settings.get(section, {}), **values}
        config = write_config(
            directory / "gateway",
            upstream_url=f"http://{portal}",
            assertion_key=assertion_key,
            policies=EXAMPLE_POLICIES,
            listen=f"127.0.0.1:{gateway_port}",
            extra=settings,
        )
        gateway_env = {**os.environ, **env} if env else None
        with running(serve_argv(config), gateway_port, env=gateway_env, log=directory / "gateway.log"):
            values = {"GATEWAY": f"127.0.0.1:{gateway_port}", "PORTAL": portal, "ACCESS_LOG": str(access_log)}
            with running_nginx(directory / "nginx", FORWARD_AUTH_TEMPLATE, values, http=nginx_http) as nginx:
                common = {
                    "recording": recording,
                    "audit_file": directory / "gateway" / "audit.log",
                    "store": RedisSessionStore(redis.url),
                    "gateway_url": f"http://127.0.0.1:{gateway_port}",
                    "portal_address": portal,
                    "redis": redis,
                }
                yield {
                    "proxy": Plane("proxy", gateway_port, **common),
                    "forward_auth": Plane("forward_auth", nginx.port, **common),
                }


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory, assertion_key: Path) -> Iterator[dict[str, Plane]]:
    with running_planes(tmp_path_factory.mktemp("parity"), assertion_key) as both:
        yield both


#: Login budgets small enough that a few counted requests show: 3 failures ban, 6 attempts a minute.
LOGIN_LIMITS = {"login_requests_per_ip": "12/minute", "login_attempts_per_ip": "6/minute", "ban_after": 3}
CARD_ORIGIN = "https://card.example:8443"


@pytest.fixture(scope="module")
def login_planes(
    tmp_path_factory: pytest.TempPathFactory, assertion_key: Path, dev_pki: DevPki
) -> Iterator[tuple[dict[str, Plane], PscServer]]:
    """Both planes of a gateway with card and e-CPS login (the PSC stand-in) and small login budgets."""
    directory = tmp_path_factory.mktemp("parity-login")
    gateway_port = free_port()
    registration = gateway_registration(f"http://127.0.0.1:{gateway_port}")
    with running_psc(directory, [registration], identities=IDENTITIES) as psc:
        extra = {
            "card": card_settings(dev_pki, CARD_ORIGIN),
            "ecps": ecps_settings(psc, f"http://127.0.0.1:{gateway_port}"),
            "limits": LOGIN_LIMITS,
        }
        with running_planes(directory, assertion_key, extra, ECPS_SECRETS, gateway_port) as both:
            yield both, psc


@pytest.fixture(params=["proxy", "forward_auth"])
def login_plane(request: pytest.FixtureRequest, login_planes: tuple[dict[str, Plane], PscServer]) -> Plane:
    return login_planes[0][request.param]


@pytest.fixture
def psc(login_planes: tuple[dict[str, Plane], PscServer]) -> PscServer:
    return login_planes[1]


@pytest.fixture(params=["proxy", "forward_auth"])
def plane(request: pytest.FixtureRequest, planes: dict[str, Plane]) -> Plane:
    return planes[request.param]


def judged(target: str) -> str | None:
    """The request target as the gateway judges it (its normal form), None when it refuses it."""
    try:
        return normalise_target(target).path_and_query
    except BadPath:
        return None


def portal_views(raw_uri: str) -> set[str]:
    """The paths portals could serve for ``raw_uri``: percent-decoded once, dot segments resolved per RFC 3986
    (empty segments kept) or after merging slashes, backslashes read as slashes or not; lower-cased."""
    path = unquote(raw_uri.partition("?")[0])
    views = set()
    for candidate in (path, path.replace("\\", "/")):
        views.add(urljoin("http://portal", candidate).removeprefix("http://portal").lower())
        views.add(posixpath.normpath("/" + candidate).lower())
    return views


def reaches(records: list[dict[str, Any]], prefixes: tuple[str, ...]) -> list[str]:
    """The raw URIs the portal received that some portal would serve as a resource under ``prefixes``."""
    return [r["raw_uri"] for r in records if any(v.startswith(prefixes) for v in portal_views(r["raw_uri"]))]


# --- Bypass targets -----------------------------------------------------------------------------------------

BYPASS_TARGETS = [
    f"/patients/{NIR}//..//..",  # judged "/" (public); an RFC 3986 portal serves /patients/<nir>/
    f"/static/%2e%2e/patients/{NIR}",
    f"/static/%2E%2E/patients/{NIR}",
    f"/static/./../patients/{NIR}",
    f"/static/..%2fpatients/{NIR}",
    f"/static/..%5cpatients/{NIR}",
    f"/static/x/..\\..\\patients/{NIR}",
    f"/static/%c0%ae%c0%ae/patients/{NIR}",
    f"/static/%00/../patients/{NIR}",
    f"/static;x/../patients/{NIR}",
    f"/static/%252e%252e/patients/{NIR}",
    f"//patients/{NIR}",
    f"/PATIENTS/{NIR}",
    f"/Patients/{NIR}/.",
    f"/patients./{NIR}",
    f"/admin/../patients/{NIR}",
    "/account/rib//..",
    "/static/../account/rib",
    "/admin/%2e%2e/static/x",
]


@pytest.mark.parametrize("target", BYPASS_TARGETS)
def test_a_bypass_target_never_reaches_a_protected_resource(plane: Plane, target: str) -> None:
    response, records = plane.send(target)
    assert reaches(records, PROTECTED) == [], response.status
    # And whatever reached the portal is exactly what the gateway judged.
    assert [r["raw_uri"] for r in records] in ([], [judged(target)])


@pytest.mark.parametrize(
    "target", ["/account/rib//..", "/account/x/../rib", "/account//rib", "/ACCOUNT/RIB/."]
)
def test_the_card_only_step_up_cannot_be_skipped_with_an_ecps_session(plane: Plane, target: str) -> None:
    session = plane.login(LoginMethod.ECPS)
    response, records = plane.send(target, [("Cookie", f"{COOKIE}={session}")])
    assert reaches(records, ("/account/rib",)) == [], response.status
    assert [r["raw_uri"] for r in records] in ([], [judged(target)])


@pytest.mark.parametrize("target", ["/account/r%C4%B1b", "/account/r%C5%82b", "/account/ri%C6%80"])
def test_a_latin_letter_a_best_fit_portal_folds_into_the_card_only_path_is_refused(
    plane: Plane, target: str
) -> None:
    """Dotless i, l and b with stroke have no decomposition, yet an IIS (best-fit) portal serves /account/rib for them: the
    ``account`` rule would judge what the card-only ``bank-details`` rule guards."""
    session = plane.login(LoginMethod.ECPS)
    response, records = plane.send(target, [("Cookie", f"{COOKIE}={session}"), ("Accept", "text/html")])
    assert (response.status, records) == (400, [])
    assert response.header("X-Gateway-Reason") == "bad_request_path"
    assert "Adresse invalide" in response.body.decode()  # the gateway's page, in both planes
    refused = [e for e in plane.audit() if e["event"] == "bad_request" and "ASCII" in e.get("detail", "")]
    assert refused and refused[-1]["reasons"] == ["bad_request_path"]


@pytest.mark.parametrize("query", ["a" * 3000, "%C3%A9" * 500])
def test_a_long_query_on_a_protected_route_still_leads_to_the_login(plane: Plane, query: str) -> None:
    """The login links name where to come back; past a length a login link may hold (forward-auth answered
    502 for it), the destination loses its query."""
    response, records = plane.send(f"/account/profile?q={query}", [("Accept", "text/html")])
    assert records == []
    # The gateway's own page, with the login choices, in both planes.
    assert response.status == 401 and response.header("X-Gateway-Reason") == "unauthenticated"


def test_a_target_in_normal_form_reaches_the_portal_exactly(plane: Plane) -> None:
    target = "/static/a%20b/~c/app.js?x=%2F..&y=/../"
    response, records = plane.send(target)
    assert response.status == 200
    assert [r["raw_uri"] for r in records] == [target]


def test_a_query_with_bytes_that_are_not_printable_ascii_never_reaches_the_portal(plane: Plane) -> None:
    """No request target may hold them (RFC 9112 3.2): proxy mode's parser refuses the request line, nginx
    takes it, so the decision refuses it (a portal could read those bytes its own way)."""
    case = uuid4().hex
    head = (
        f"GET /patients/{NIR}?q=\xc0\xae\xff HTTP/1.1\r\nHost: 127.0.0.1:{plane.port}\r\n"
        f"Cookie: {COOKIE}={plane.login()}\r\n{CASE_HEADER}: {case}\r\nConnection: close\r\n\r\n"
    )
    address = ("127.0.0.1", plane.port)
    with socket.create_connection(address, timeout=5, source_address=(CLIENT_ADDRESS, 0)) as connection:
        connection.sendall(head.encode("latin-1"))
        answer = b"".join(iter(lambda: connection.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 400 ") and received(plane.recording, case) == []
    if plane.mode == "forward_auth":  # refused by the decision (the stand-in portal would refuse it too)
        assert b"\r\nX-Gateway-Reason: bad_request_path\r\n" in answer.partition(b"\r\n\r\n")[0]


def test_requests_with_a_body_reach_the_portal_whole_one_after_the_other(plane: Plane) -> None:
    session = plane.login()
    headers = [("Cookie", f"{COOKIE}={session}"), ("Sec-Fetch-Site", "same-origin")]
    for body in ("first=1", "second=22"):
        sent = [
            *headers,
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Content-Length", str(len(body))),
        ]
        response, records = plane.send("/account/profile", sent, method="POST", body=body.encode())
        assert response.status == 200, response.body
        assert [(r["method"], r["body"]) for r in records] == [("POST", body)]


def test_an_absolute_form_target_is_judged_by_its_path(plane: Plane) -> None:
    response, records = plane.send(f"http://127.0.0.1:{plane.port}/patients/{NIR}")
    assert response.status in (302, 400, 401) and records == []


# --- Spoofed and override headers ---------------------------------------------------------------------------

FORGED = [
    ("X-Gateway-Subject", "810009999999"),
    ("X-Gateway-Auth-Method", "card"),
    ("X-Gateway-Professions", "10"),
    ("X-Gateway-Auth-Time", "9999999999"),
    ("X-Gateway-Assertion", "forged.jwt.value"),
    ("X-Gateway-Rule", "admin"),
    ("X-Gateway-Session", "forged"),
    ("X-Gateway-Retry-After", "1"),
    ("X-Gateway-Session-Ended", "1"),
    ("X-SSL-Client-Cert", "-----BEGIN%20CERTIFICATE-----forged"),
    ("X-SSL-Client-Verify", "SUCCESS"),
    ("X-SSL-Client-S-DN", "CN=810009999999"),
    ("X-Card-Host-Secret", "guessed"),
    ("X-Card-Headers-Cleared", "1"),
    ("X-Original-URL", "/admin/"),
    ("X-Original-URI", "/admin/"),
    ("X-Rewrite-URL", "/admin/"),
    ("X-Forwarded-Uri", "/admin/"),
    ("X-Forwarded-Path", "/admin/"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("Forwarded", "for=10.9.9.9;host=evil.example;proto=https"),
    ("X-Real-IP", "10.9.9.9"),
    ("X-Client-IP", "10.9.9.9"),
    ("True-Client-IP", "10.9.9.9"),
    ("X-Forwarded-Port", "8443"),
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Request-Id", "chosen-by-the-client"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-For", "10.9.9.9"),
    ("X-Forwarded-Proto", "https"),
    # Client addresses, hosts and client certificates other frameworks and terminators read.
    ("Client-IP", "10.9.9.9"),
    ("X-Cluster-Client-IP", "10.9.9.9"),
    ("CF-Connecting-IP", "10.9.9.9"),
    ("X-Forwarded", "for=10.9.9.9"),
    ("Forwarded-For", "10.9.9.9"),
    ("X-Original-Forwarded-For", "10.9.9.9"),
    ("X-Host", "evil.example"),
    ("X-Forwarded-Server", "evil.example"),
    ("X-Original-Host", "evil.example"),
    ("X-Forwarded-Tls-Client-Cert", "MIIforged"),
    ("X-Forwarded-Client-Cert", 'Hash=forged;Subject="CN=810009999999"'),
    ("X-ARR-ClientCert", "MIIforged"),
    ("Client-Cert", ":MIIforged:"),
    ("X-SSL-Client-Not-After", "Dec 31 23:59:59 2099 GMT"),
    ("X-SSL-Client-Subject", "CN=810009999999"),
    ("Proxy-Authorization", "Basic Zm9yZ2VkOmZvcmdlZA=="),
    # Underscores: WSGI servers file X_Gateway_Subject under the same key as X-Gateway-Subject.
    ("X_Gateway_Subject", "810009999999"),
    ("X_SSL_Client_Cert", "-----BEGIN%20CERTIFICATE-----forged"),
]
#: Set by the gateway (or its nginx) from what it saw: present, but never the client's value.
REBUILT = {"x-request-id", "x-forwarded-host", "x-forwarded-for", "x-forwarded-proto"}
IDENTITY = {"x-gateway-subject", "x-gateway-auth-method", "x-gateway-professions", "x-gateway-auth-time"}


def _check_forwarded_facts(plane: Plane, headers: dict[str, str]) -> None:
    never = {name.lower() for name, _ in FORGED} - REBUILT - IDENTITY - {"x-gateway-assertion"}
    assert sorted(never & set(headers)) == []
    assert headers["x-forwarded-for"] == CLIENT_ADDRESS
    assert headers["x-forwarded-host"].partition(":")[0] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-request-id"] and headers["x-request-id"] != "chosen-by-the-client"


def test_forged_headers_never_reach_the_portal_on_a_public_route(plane: Plane) -> None:
    response, records = plane.send("/static/app.js", FORGED)
    assert response.status == 200
    (record,) = records
    assert record["method"] == "GET" and record["raw_uri"] == "/static/app.js"
    _check_forwarded_facts(plane, record["headers"])
    assert sorted((IDENTITY | {"x-gateway-assertion"}) & set(record["headers"])) == []


def test_forged_headers_never_reach_the_portal_on_a_protected_route(plane: Plane) -> None:
    session = plane.login()
    response, records = plane.send("/account/profile", [*FORGED, ("Cookie", f"{COOKIE}={session}")])
    assert response.status == 200
    (record,) = records
    headers = record["headers"]
    _check_forwarded_facts(plane, headers)
    assert headers["x-gateway-subject"] == "810001234567" and headers["x-gateway-auth-method"] == "card"
    keys = KeySet.import_key_set(requests.get(plane.gateway_url + "/.gateway/jwks.json", timeout=5).json())
    claims = jwt.decode(headers["x-gateway-assertion"], keys, algorithms=["ES256"]).claims
    assert claims["sub"] == "810001234567" and claims["rule"] == "account"


def test_an_identity_header_alone_opens_nothing(plane: Plane) -> None:
    forged = [
        (name, value) for name, value in FORGED if name.lower().startswith(("x-gateway-", "x-ssl-client-"))
    ]
    response, records = plane.send(f"/patients/{NIR}", forged)
    assert response.status in (302, 401) and records == []


# --- Cookies -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cookies",
    [
        ["portal=kept; {sid}; __Host-gateway-login=login-state"],
        ["portal=kept", "{sid}", "__Host-gateway-login=login-state"],  # split over several Cookie headers
        ["{sid}", "portal=kept; __Host-gateway-login=login-state"],
        ["{sid}; portal=kept; __host-gateway-session=other"],
        ["__Host-gateway-login =a; portal=kept; \t__HOST-gateway-session\t=b"],
        # A browser holding all three of the gateway's cookies (session, e-CPS login, card hand-off).
        ["{sid}; __Host-gateway-login=login-state; portal=kept; __Host-gateway-card=binding"],
        ["__Host-gateway-card=binding; __Host-gateway-login=login-state; {sid}; portal=kept"],
    ],
)
def test_the_gateway_cookies_never_reach_the_portal(plane: Plane, cookies: list[str]) -> None:
    session = plane.login()
    headers = [("Cookie", value.replace("{sid}", f"{COOKIE}={session}")) for value in cookies]
    response, records = plane.send("/static/app.js", headers)
    assert response.status == 200
    (record,) = records
    sent = record["headers"].get("cookie", "")
    assert "gateway" not in sent.lower() and session not in str(record)
    assert "portal=kept" in sent


def test_a_cookie_header_naming_the_gateway_cookies_again_and_again_never_reaches_the_portal(
    plane: Plane,
) -> None:
    cookies = "; ".join(f"__Host-gateway-session=s{n}" for n in range(4)) + "; portal=kept"
    response, records = plane.send("/static/app.js", [("Cookie", cookies)])
    for record in records:  # stripped (proxy) or refused (forward-auth: browsers never send this)
        assert "gateway" not in record["headers"].get("cookie", "").lower()
    assert response.status in (200, 400) and len(records) == (response.status == 200)


def test_a_browser_holding_all_three_gateway_cookies_reaches_protected_pages(plane: Plane) -> None:
    session = plane.login()
    cookies = f"__Host-gateway-card=b; {COOKIE}={session}; portal=kept; __Host-gateway-login=l"
    response, records = plane.send("/account/profile", [("Cookie", cookies)])
    assert response.status == 200
    (record,) = records
    assert record["headers"]["x-gateway-subject"] == "810001234567"
    assert record["headers"]["cookie"].strip("; ") == "portal=kept"


def test_the_session_cookie_still_opens_the_session(plane: Plane) -> None:
    session = plane.login()
    response, records = plane.send("/account/profile", [("Cookie", f"portal=kept; {COOKIE}={session}")])
    assert response.status == 200
    (record,) = records
    assert record["headers"]["x-gateway-subject"] == "810001234567"
    assert record["headers"]["cookie"].rstrip("; ") == "portal=kept"


@pytest.mark.parametrize("separator", [" ", "\t"])
def test_a_decision_is_never_served_to_another_user(plane: Plane, separator: str) -> None:
    session = plane.login()
    path = f"/account/cached-{uuid4().hex}"
    plane.send(path, [("Cookie", f"{COOKIE}{separator}={session}")])
    response, records = plane.send(path)  # anonymous, same method, host and URI, within the cache lifetime
    assert response.status in (302, 401) and records == []


#: A cookie value no browser sends as UTF-8 (the raw bytes 0xFF 0xFE): werkzeug cannot decode it.
NOT_UTF8 = "\xff\xfe"


@pytest.mark.parametrize("language", ["fr", "en"])
def test_a_session_cookie_that_is_not_utf8_is_refused_with_a_page_and_audited(
    plane: Plane, language: str
) -> None:
    headers = [("Cookie", f"{COOKIE}={NOT_UTF8}"), ("Accept", "text/html"), ("Accept-Language", language)]
    response, records = plane.send("/account/profile", headers)
    assert (response.status, records) == (400, [])
    assert response.header("X-Gateway-Reason") == "bad_request_header"
    if plane.mode == "proxy":  # nginx answers the forward-auth plane's 400s with its own page
        title = {"fr": "Requête mal formée", "en": "Malformed request"}[language]
        assert title in response.body.decode() and "Traceback" not in response.body.decode()
    refused = [e for e in plane.audit() if e["event"] == "bad_request" and "UTF-8" in e.get("detail", "")]
    assert refused and refused[-1]["reasons"] == ["bad_request_header"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_cookie_header_that_is_not_utf8_gets_a_page_from_the_gateway_own_endpoints(
    plane: Plane, method: str
) -> None:
    cookie = f"portal={NOT_UTF8}; {COOKIE}={plane.login()}"
    headers = [("Cookie", cookie), ("Accept", "text/html"), ("Sec-Fetch-Site", "same-origin")]
    body = b"csrf_token=x" if method == "POST" else b""
    if body:
        headers += [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(body)))]
    response, _ = plane.send("/.gateway/logout", headers, method=method, body=body)
    assert response.status == 400
    assert response.header("X-Gateway-Reason") == "bad_request_header"
    assert "Requête mal formée" in response.body.decode()


def test_a_portal_cookie_that_is_not_utf8_never_gets_a_server_error(plane: Plane) -> None:
    """Proxy mode reads the whole Cookie header (and refuses it); forward-auth's nginx hands the gateway the
    session id alone, and the portal the rest: its own cookies are its own business."""
    headers = [("Cookie", f"portal={NOT_UTF8}; {COOKIE}={plane.login()}")]
    response, records = plane.send("/account/profile", headers)
    if plane.mode == "proxy":
        assert (response.status, records) == (400, [])
    else:
        assert response.status == 200 and len(records) == 1


@pytest.mark.parametrize(("language", "message"), [("fr", "mal formé"), ("en", "malformed")])
def test_json_nested_too_deeply_for_the_parser_is_refused_and_audited(
    login_plane: Plane, language: str, message: str
) -> None:
    body = b"[" * 3000 + b"]" * 3000
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Accept-Language", language),
    ]
    response, _ = login_plane.send("/.gateway/card/verify", headers, method="POST", body=body)
    assert response.status == 400 and response.header("Content-Type") == "application/json"
    payload = json.loads(response.body)
    assert payload["error"] == "bad_request_body" and message in payload["message"]
    refused = [e for e in login_plane.audit() if e["event"] == "bad_request"]
    assert (
        refused[-1]["reasons"] == ["bad_request_body"] and refused[-1]["detail"] == "JSON nested too deeply"
    )


def _unsigned_token(header: bytes) -> str:
    return ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode() for part in (header, b"{}", b"x"))


@pytest.mark.parametrize(
    "header",
    [b'{"alg":"ES256","crit":5}', b"[" * 700 + b"]" * 700, b'{"alg":"ES256","kid":' * 400],
    ids=["crit-not-a-list", "nested", "nested-objects"],
)
def test_a_logout_token_with_a_malformed_header_is_refused_and_audited(
    login_plane: Plane, header: bytes
) -> None:
    body = urlencode({"logout_token": _unsigned_token(header)}).encode()
    headers = [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(body)))]
    response, _ = login_plane.send("/.gateway/ecps/backchannel-logout", headers, method="POST", body=body)
    assert response.status == 400
    event = [e for e in login_plane.audit() if e["event"] == "logout"][-1]
    assert event["reasons"] == ["token_invalid"]


@pytest.mark.parametrize("ended_by", ["logout", "quota"])
def test_a_cached_decision_is_never_served_after_the_session_ended(plane: Plane, ended_by: str) -> None:
    idnat = "8" + str(uuid4().int)[:11]
    session = plane.login(idnat=idnat)
    cookie = [("Cookie", f"{COOKIE}={session}"), ("Accept", "text/html")]
    path = f"/patients/{NIR}"
    for _ in range(2):  # the second one from nginx's decision cache (forward-auth)
        assert plane.send(path, cookie)[0].status == 200
    if ended_by == "logout":
        _log_out(plane, session)
    else:  # 30 other patients: the breach revokes the session (on_exceed: revoke_session)
        for n in range(31):
            plane.send(f"/patients/1800175123{n:05d}", cookie)
    assert plane.store.get(session, time.time()) is None
    response, records = plane.send(path, cookie)  # within the cache lifetime: the same session id, replayed
    assert (response.status, records) == (401, [])


def _log_out(plane: Plane, session: str) -> None:
    live = plane.store.get(session, time.time())
    assert live is not None
    form = f"csrf_token={live.csrf_token}".encode()
    headers = [
        ("Cookie", f"{COOKIE}={session}"),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Sec-Fetch-Site", "same-origin"),
        ("Content-Length", str(len(form))),
    ]
    ended, _ = plane.send("/.gateway/logout", headers, method="POST", body=form)
    assert ended.status == 303


#: What an operator may well have in nginx's http block (it speeds up static files), "no such file" included.
OPEN_FILE_CACHE = (
    "open_file_cache max=1000 inactive=60s; open_file_cache_valid 60s; open_file_cache_errors on;"
)


def test_a_logout_ends_cached_access_at_once_whatever_open_file_cache_nginx_has(
    tmp_path: Path, assertion_key: Path
) -> None:
    """The template's ended-session check (if -f) must not read nginx's cached "no such mark" of before the
    logout: the session's cached allows would be served on until they expire."""
    with running_planes(tmp_path, assertion_key, nginx_http=OPEN_FILE_CACHE) as both:
        plane = both["forward_auth"]
        session = plane.login()
        cookie = [("Cookie", f"{COOKIE}={session}")]
        for _ in range(2):  # the second one from nginx's decision cache
            assert plane.send(f"/patients/{NIR}", cookie)[0].status == 200
        _log_out(plane, session)
        response, records = plane.send(f"/patients/{NIR}", cookie)
        assert (response.status, records) == (401, [])


#: What an operator may well have in nginx's http block for the portal's caching: stale answers when the
#: upstream fails.
USE_STALE = "proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504 http_403;"


def test_an_expired_cached_allow_is_never_served_when_the_gateway_refuses_whatever_nginx_http_has(
    tmp_path: Path, assertion_key: Path
) -> None:
    """Fail closed: once a cached allow expired, the gateway's refusal (here 503, the session store down) is
    what the client gets, never the stale allow an http-level proxy_cache_use_stale would serve."""
    extra = {"forward_auth": {"cache_seconds": 1}}
    with running_planes(tmp_path, assertion_key, extra, nginx_http=USE_STALE) as both:
        plane = both["forward_auth"]
        cookie = [("Cookie", f"{COOKIE}={plane.login()}")]
        for _ in range(2):  # the second one from nginx's decision cache
            assert plane.send(f"/patients/{NIR}", cookie)[0].status == 200
        plane.redis.stop()
        try:
            # Served from the cache until the allow expires (X-Accel-Expires: 1, nginx counts whole seconds).
            deadline = time.monotonic() + 3
            while (response := plane.send(f"/patients/{NIR}", cookie)[0]).status == 200:
                assert time.monotonic() < deadline, "a stale allow served while the gateway refuses"
                time.sleep(0.1)
        finally:
            plane.redis.start()
        assert response.status == 503  # the store (or the trail, which counts quotas there) unavailable


def test_a_cached_allow_lives_no_longer_than_the_gateway_says_whatever_nginx_http_has(
    tmp_path: Path, assertion_key: Path
) -> None:
    """The gateway bounds each cached allow (X-Accel-Expires: cache_seconds, never past the login's max_age or
    the session's end); an http-level proxy_ignore_headers must not stretch it to the template's fallback."""
    extra = {"forward_auth": {"cache_seconds": 1}}
    with running_planes(
        tmp_path, assertion_key, extra, nginx_http="proxy_ignore_headers X-Accel-Expires;"
    ) as both:
        plane = both["forward_auth"]
        session = plane.login()
        cookie = [("Cookie", f"{COOKIE}={session}")]
        for _ in range(2):  # the second one from nginx's decision cache
            assert plane.send(f"/patients/{NIR}", cookie)[0].status == 200
        plane.store.delete(session)  # from the store alone: no ended-session mark, the cache's bound applies
        deadline = time.monotonic() + 3  # 1 s, counted in whole seconds by nginx
        while plane.send(f"/patients/{NIR}", cookie)[0].status == 200:
            assert time.monotonic() < deadline, "a cached allow served past the gateway's bound"
            time.sleep(0.1)


def test_the_requests_per_client_limit_holds_whatever_nginx_http_has(
    tmp_path: Path, assertion_key: Path
) -> None:
    """One client's share of the access stream is bounded (limit_req): an http-level limit_req_dry_run (set
    while trying limits out elsewhere) must not lift it, or one client could make the audit trail lag for all."""
    with running_planes(tmp_path, assertion_key, nginx_http="limit_req_dry_run on;") as both:
        plane = both["forward_auth"]
        crafted = [("Cookie", "; ".join(["__Host-gateway-login=a"] * 5))]  # refused by nginx itself (400)
        for target in (f"/patients/{NIR}", "/"):
            statuses = [
                raw_request(plane.port, target, crafted if target == "/" else []).status for _ in range(130)
            ]
            assert 429 in statuses  # no session: 20 a second, bursts of 100


def test_one_professional_page_is_never_served_to_another_whatever_nginx_http_has(
    tmp_path: Path, assertion_key: Path
) -> None:
    """Proxy mode caches no answer of the portal: nor does forward-auth, even under an http-level proxy_cache
    (the same URI, /account/profile, is each professional's own page)."""
    operator_cache = (
        f"proxy_cache_path {tmp_path}/operator-cache keys_zone=operator:1m; proxy_cache operator;"
    )
    with running_planes(
        tmp_path, assertion_key, nginx_http=operator_cache + " proxy_cache_valid 200 1m;"
    ) as both:
        plane = both["forward_auth"]
        for idnat in ("810000000001", "810000000002"):
            response, records = plane.send(
                "/account/profile", [("Cookie", f"{COOKIE}={plane.login(idnat=idnat)}")]
            )
            assert response.status == 200 and len(records) == 1
            assert json.loads(response.body)["headers"]["x-gateway-subject"] == idnat


def test_the_decision_is_never_skipped_whatever_nginx_http_has(tmp_path: Path, assertion_key: Path) -> None:
    """An http-level "satisfy any" with an allow rule (internal networks) must not let those clients past the
    gateway's decision: every protected request is judged."""
    with running_planes(tmp_path, assertion_key, nginx_http="satisfy any; allow 127.0.0.0/8;") as both:
        response, records = both["forward_auth"].send(f"/patients/{NIR}")
        assert (response.status, records) == (401, [])


def test_a_forged_identity_header_spelt_with_underscores_never_reaches_the_portal_whatever_nginx_http_has(
    tmp_path: Path, assertion_key: Path
) -> None:
    """Many portals read X_Gateway_Subject as X-Gateway-Subject; proxy mode never forwards such a field, and
    the template's server drops them whatever the http level says (underscores_in_headers on there)."""
    with running_planes(tmp_path, assertion_key, nginx_http="underscores_in_headers on;") as both:
        for plane in both.values():
            forged = [("X_Gateway_Subject", "810000000666"), ("X_Original_URI", "/admin")]
            response, records = plane.send(
                f"/patients/{NIR}", [("Cookie", f"{COOKIE}={plane.login()}"), *forged]
            )
            assert response.status == 200 and len(records) == 1
            assert records[0]["headers"]["x-gateway-subject"] == "810001234567"  # plane.login()'s
            assert "x-original-uri" not in records[0]["headers"]


def test_the_portal_cannot_send_nginx_to_a_resource_the_gateway_did_not_judge(plane: Plane) -> None:
    """X-Accel-Redirect from the portal (protected downloads often answer it) would make nginx serve another
    URI than the one judged, under the first one's decision: a back-office page never reachable otherwise."""
    cookie = [("Cookie", f"{COOKIE}={plane.login()}")]
    response, records = plane.send("/account/accel-redirect?to=/admin/users", cookie)
    assert response.status == 200
    assert [r["raw_uri"] for r in records] == ["/account/accel-redirect?to=/admin/users"]


def _stored_by_a_browser(set_cookie: str) -> str | None:
    """The cookie name a browser would store for a __Host- cookie of the gateway, None when it must refuse it:
    the __Host- prefix demands Secure, Path=/ and no Domain (RFC 6265bis, cookie name prefixes)."""
    name, _, rest = set_cookie.partition("=")
    attributes = [a.strip().lower() for a in rest.split(";")[1:]]
    if not name.strip().lower().startswith("__host-gateway-"):
        return None
    secure = "secure" in attributes
    root = "path=/" in attributes
    domain = any(a.startswith("domain=") for a in attributes)
    return name.strip() if secure and root and not domain else None


def test_the_portal_cannot_set_the_gateway_cookies(plane: Plane) -> None:
    response, records = plane.send("/static/set-cookie")
    assert response.status == 200 and len(records) == 1
    set_cookies = response.all("Set-Cookie")
    assert [c for c in set_cookies if _stored_by_a_browser(c)] == []
    assert "portal=ok; Path=/; Secure" in set_cookies


# --- Hosts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost"])
def test_a_host_the_gateway_does_not_serve_is_refused_and_audited(plane: Plane, host: str) -> None:
    response, records = plane.send("/static/app.js", host=host)
    assert response.status == 400 and records == []
    assert response.header("X-Gateway-Reason") == "host_not_allowed"
    refused = [e for e in plane.audit() if e["event"] == "bad_request" and e.get("host") == host]
    assert refused and refused[-1]["reasons"] == ["host_not_allowed"]


def test_a_malformed_host_is_refused(plane: Plane) -> None:
    response, records = plane.send("/static/app.js", host="bad host!")
    assert response.status == 400 and records == []


# --- What the portal says back, and the request id -----------------------------------------------------------


#: How a portal may name its internal address (``{portal}``: its host:port) in Location / Content-Location.
INTERNAL_URLS = [
    "",  # the default: http://{portal}/landing?from=portal
    "HTTP://{portal}/landing?from=portal",
    "//{portal}/landing?from=portal",
    "Http://{portal}/landing?from=portal",
]


@pytest.mark.parametrize("named", INTERNAL_URLS)
def test_the_portal_redirects_to_its_internal_address_are_rewritten(plane: Plane, named: str) -> None:
    query = f"?to={quote(named)}" if named else ""
    response, records = plane.send(f"/static/redirect-internal{query}")
    assert response.status == 302 and len(records) == 1
    location = response.header("Location") or ""
    assert plane.portal_address not in location and location == "/landing?from=portal"


@pytest.mark.parametrize("named", INTERNAL_URLS)
def test_a_content_location_on_the_internal_address_is_rewritten(plane: Plane, named: str) -> None:
    query = f"?to={quote(named)}" if named else ""
    response, records = plane.send(f"/static/content-location{query}")
    assert response.status == 200 and len(records) == 1
    assert response.header("Content-Location") == "/landing?from=portal"


def test_a_redirect_elsewhere_is_left_alone(plane: Plane) -> None:
    response, _ = plane.send(f"/static/redirect-internal?to={quote('https://other.example/x')}")
    assert response.header("Location") == "https://other.example/x"


def test_the_portal_and_the_audit_trail_share_the_request_id(plane: Plane) -> None:
    session = plane.login()
    response, records = plane.send(f"/patients/{NIR}", [("Cookie", f"{COOKIE}={session}")])
    assert response.status == 200
    request_id = records[0]["headers"]["x-request-id"]
    # Proxy mode audits its decision before forwarding; nginx's access stream is recorded as it is read.
    event = "decision" if plane.mode == "proxy" else "access"

    def recorded() -> list[dict[str, Any]]:
        return [e for e in plane.audit() if e["event"] == event and e["request_id"] == request_id]

    wait_until(lambda: bool(recorded()), timeout=10, what="the access recorded")
    assert [(e["path"], e["decision"]) for e in recorded()] == [(f"/patients/{NIR}", "allow")]


def test_n_accesses_are_n_audit_records(plane: Plane) -> None:
    """Issue 14 goal 2 in both planes: every access to a record, served from nginx's decision cache or not,
    is one record of the hash-chained trail, naming the request the portal received."""
    session = plane.login(idnat="8" + str(uuid4().int)[:11])
    cookie = [("Cookie", f"{COOKIE}={session}")]
    targets = (
        [f"/patients/{NIR}"] * 12 + [f"/patients/2800175{n:08d}" for n in range(6)] + [f"/patients/{NIR}"] * 4
    )
    request_ids = []
    for target in targets:
        response, records = plane.send(target, cookie)
        assert response.status == 200, (target, response.status)
        request_ids.append(records[0]["headers"]["x-request-id"])
    assert len(set(request_ids)) == len(targets)
    event = "decision" if plane.mode == "proxy" else "access"

    def recorded() -> list[dict[str, Any]]:
        wanted = set(request_ids)
        return [e for e in plane.audit() if e["event"] == event and e["request_id"] in wanted]

    wait_until(lambda: len(recorded()) >= len(targets), timeout=10, what="every access recorded")
    time.sleep(0.3)  # what came more would be a duplicate
    records = recorded()
    assert sorted(r["request_id"] for r in records) == sorted(request_ids)
    assert [r["path"] for r in sorted(records, key=lambda r: request_ids.index(r["request_id"]))] == targets
    assert {r["decision"] for r in records} == {"allow"}
    if plane.mode == "forward_auth":
        assert any(r["cached"] for r in records)  # nginx served repeated reads itself, and they are recorded


def test_one_access_is_one_audit_record_whatever_nginx_http_has(tmp_path: Path, assertion_key: Path) -> None:
    """An http-level log_subrequest on must not log nginx's decision sub-requests in the access stream too:
    each access would be recorded twice (and counted twice against the professional's quota)."""
    with running_planes(tmp_path, assertion_key, nginx_http="log_subrequest on;") as both:
        plane = both["forward_auth"]
        cookie = [("Cookie", f"{COOKIE}={plane.login()}")]
        request_ids = [
            plane.send(f"/patients/{NIR}", cookie)[1][0]["headers"]["x-request-id"] for _ in range(3)
        ]
        wait_until(
            lambda: len([e for e in plane.audit() if e["event"] == "access"]) >= 3,
            timeout=10,
            what="the accesses",
        )
        time.sleep(0.3)  # what came more would be a duplicate
        assert sorted(e["request_id"] for e in plane.audit() if e["event"] == "access") == sorted(request_ids)


# --- Login budgets: what another site's page can make a browser send ----------------------------------------

#: How a page of another site can load a URL without navigating the tab to it.
EMBEDDED = {
    "iframe": [
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-Dest", "iframe"),
    ],
    "image": [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors"), ("Sec-Fetch-Dest", "image")],
    "prefetch": [
        ("Sec-Purpose", "prefetch"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-Dest", "document"),
    ],
}
#: A link on another site's page (or PSC's redirect back), followed in the tab itself.
TOP_LEVEL = [
    ("Sec-Fetch-Site", "cross-site"),
    ("Sec-Fetch-Mode", "navigate"),
    ("Sec-Fetch-Dest", "document"),
    ("Accept", "text/html"),
]
LOGIN_STARTS = ("/.gateway/login/ecps?next=/account/profile", "/.gateway/card/start?next=/account/profile")


def _set_cookies(response: RawResponse) -> dict[str, str]:
    """The cookies a browser keeps from ``response`` (name -> value; "" for one it must delete)."""
    kept = {}
    for header in response.all("Set-Cookie"):
        name, _, rest = header.partition("=")
        value, _, attributes = rest.partition(";")
        kept[name] = "" if "max-age=0" in attributes.lower().replace(" ", "") else value
    return kept


def _login_events(plane: Plane, reason: str) -> list[dict[str, Any]]:
    return [e for e in plane.audit() if e["event"] == "login" and e.get("reasons") == [reason]]


def test_another_site_framing_the_login_starts_spends_no_login_budget(
    login_plane: Plane, psc: PscServer
) -> None:
    """48 login starts from a hospital NAT, every one loaded by another site's page (frames, images,
    prefetches): each refused uncounted, four times over every budget; a real login starts after them."""
    refused_before = len(_login_events(login_plane, "cross_site_request"))
    for _ in range(8):
        for kind, headers in EMBEDDED.items():
            for start in LOGIN_STARTS:
                response, _ = login_plane.send(start, [*headers, ("Accept", "text/html")])
                assert (response.status, response.header("X-Gateway-Reason")) == (
                    403,
                    "cross_site_request",
                ), kind
    assert len(_login_events(login_plane, "cross_site_request")) - refused_before == 48
    # The professional behind the same address follows a link to the login: PSC is asked, the card host too.
    ecps, _ = login_plane.send(LOGIN_STARTS[0], TOP_LEVEL)
    assert ecps.status == 302 and (ecps.header("Location") or "").startswith(psc.issuer)
    card, _ = login_plane.send(LOGIN_STARTS[1], TOP_LEVEL)
    assert card.status == 303 and (card.header("Location") or "").startswith(CARD_ORIGIN)


def test_forged_state_callbacks_never_ban_and_end_the_login_they_aim_at(
    login_plane: Plane, psc: PscServer
) -> None:
    started, _ = login_plane.send(LOGIN_STARTS[0], TOP_LEVEL)
    assert started.status == 302
    login_cookie = "; ".join(f"{k}={v}" for k, v in _set_cookies(started).items())
    approved = urlsplit(psc.approve(started.header("Location") or "", DOCTOR))
    # Another site sends the browser (its login cookie with it) back with states of its own, again and again.
    forged = [*TOP_LEVEL, ("Cookie", login_cookie)]
    for _ in range(5):
        response, _ = login_plane.send("/.gateway/ecps/callback?code=stolen&state=guessed", forged)
        assert (response.status, response.header("X-Gateway-Reason")) == (400, "state_mismatch")
        assert _set_cookies(response).get("__Host-gateway-login") == ""  # the pending login ends
    # PSC's real answer to that login is refused now, even with a copy of the old login cookie.
    late, _ = login_plane.send(f"{approved.path}?{approved.query}", forged)
    assert (late.status, late.header("X-Gateway-Reason")) == (400, "state_mismatch")
    assert not [e for e in login_plane.audit() if e["event"] == "ban"]
    # The address is neither banned nor out of budget: the professional logs in.
    again, _ = login_plane.send(LOGIN_STARTS[0], TOP_LEVEL)
    assert again.status == 302, again.header("X-Gateway-Reason")
    callback = urlsplit(psc.approve(again.header("Location") or "", DOCTOR))
    cookie = "; ".join(f"{k}={v}" for k, v in _set_cookies(again).items())
    done, _ = login_plane.send(f"{callback.path}?{callback.query}", [*TOP_LEVEL, ("Cookie", cookie)])
    assert done.status == 303 and _set_cookies(done).get(COOKIE)


# --- HSTS ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["/static/app.js", "/static/redirect-internal", f"/patients/{NIR}", "/admin/"]
)
def test_every_forward_auth_answer_carries_hsts_once(planes: dict[str, Plane], target: str) -> None:
    # Proxy mode adds it for its https origins (tests/test_wsgi.py); this plane's nginx on every answer, as it
    # terminates TLS in production.
    response, _ = planes["forward_auth"].send(target)
    assert response.all("Strict-Transport-Security") == ["max-age=31536000"], response.status


# --- Refusals: the same status, page and Retry-After in both planes ------------------------------------------

_REQUEST_ID_IN_PAGE = re.compile(r"<code>[0-9A-Za-z-]{8,64}</code>|\"request_id\": ?\"[^\"]*\"")


def _refusal(response: RawResponse) -> tuple[int, str | None, str]:
    """Status, reason and page of a refusal, the request id (different for every request) left out."""
    body = _REQUEST_ID_IN_PAGE.sub("<id>", response.body.decode())
    return response.status, response.header("X-Gateway-Reason"), body


def _both(planes: dict[str, Plane], *args: Any, **kwargs: Any) -> dict[str, RawResponse]:
    return {mode: plane.send(*args, **kwargs)[0] for mode, plane in planes.items()}


@pytest.mark.parametrize(
    ("target", "method", "session", "status", "reason"),
    [
        ("/admin/", "GET", LoginMethod.CARD, 403, "denied_by_rule"),
        ("/static/app.js", "DELETE", None, 403, "no_matching_rule"),
        ("/static/a%2fb", "GET", None, 400, "bad_request_path"),
        (f"/patients/{NIR}", "GET", None, 401, "unauthenticated"),
        # The card-only step-up: the page says why an e-CPS login is not enough.
        ("/account/rib", "GET", LoginMethod.ECPS, 401, "login_method_not_accepted"),
    ],
)
@pytest.mark.parametrize(
    "accept",
    [
        [("Accept", "text/html")],
        [("Accept", "text/html"), ("Accept-Language", "en")],
        [("Accept", "application/json")],
    ],
)
def test_a_refusal_is_the_same_page_in_both_planes(
    planes: dict[str, Plane],
    target: str,
    method: str,
    session: LoginMethod | None,
    status: int,
    reason: str,
    accept: list[tuple[str, str]],
) -> None:
    cookie = [("Cookie", f"{COOKIE}={planes['proxy'].login(session)}")] if session else []
    responses = _both(planes, target, [*accept, *cookie], method=method)
    pages = {mode: _refusal(response) for mode, response in responses.items()}
    assert pages["proxy"][:2] == (status, reason)
    assert pages["forward_auth"] == pages["proxy"]
    english = ("Accept-Language", "en") in accept
    html = responses["forward_auth"].header("Content-Type") or ""
    assert html.startswith("application/json" if ("Accept", "application/json") in accept else "text/html")
    assert ('lang="en"' in pages["forward_auth"][2]) is (english and html.startswith("text/html"))


def test_a_spent_quota_is_429_with_retry_after_and_no_logout_link_in_both_planes(
    planes: dict[str, Plane],
) -> None:
    pages = {}
    for mode, plane in planes.items():
        idnat = "8" + str(uuid4().int)[:11]
        cookie = [("Cookie", f"{COOKIE}={plane.login(idnat=idnat)}"), ("Accept", "text/html")]
        for n in range(30):  # the example policy's max_distinct: 30 patients an hour
            assert plane.send(f"/patients/1800175123{n:05d}", cookie)[0].status == 200
        response, records = plane.send("/patients/180017512399999", cookie)
        assert records == []
        assert int(response.header("Retry-After") or 0) > 3000, mode  # the hour's window, give or take
        pages[mode] = _refusal(response)
        # The breach revoked the session (on_exceed: revoke_session): a logout link would lead nowhere.
        assert 'id="logout-link"' not in pages[mode][2] and 'id="home"' in pages[mode][2]
        assert plane.send(f"/patients/{NIR}", cookie)[0].status == 401
    assert pages["proxy"][:2] == (429, "quota_exceeded")
    assert pages["forward_auth"] == pages["proxy"]


def test_a_session_store_outage_is_503_in_both_planes(planes: dict[str, Plane]) -> None:
    plane = planes["proxy"]
    cookie = [("Cookie", f"{COOKIE}={plane.login()}"), ("Accept", "text/html")]
    plane.redis.stop()
    try:
        responses = _both(planes, "/account/profile", cookie)
    finally:
        plane.redis.start()
    pages = {mode: _refusal(response) for mode, response in responses.items()}
    assert pages["proxy"][:2] == (503, "session_store_unavailable")
    assert pages["forward_auth"] == pages["proxy"]


def test_clients_never_ask_for_a_refusal_page_themselves(planes: dict[str, Plane]) -> None:
    response, _ = planes["forward_auth"].send(
        "/.gateway/refused", [("X-Gateway-Reason", "quota_exceeded"), ("X-Gateway-Retry-After", "9")]
    )
    assert response.status == 404


@pytest.mark.parametrize("target", ["/.gateway//auth", "/.gateway/x/..//auth", "/.gateway//refused"])
def test_clients_never_reach_the_decision_or_refusal_page_whatever_nginx_http_has(
    tmp_path_factory: pytest.TempPathFactory, assertion_key: Path, target: str
) -> None:
    """Through nginx's /.gateway/ location the gateway sees nginx as its peer: were a client to reach these
    two there (an http-level merge_slashes off: "/.gateway//auth" is not "= /.gateway/auth" then, and the
    gateway's normal form drops the empty segment), it would choose the session and URI judged, get the
    signed identity headers, or any refusal page."""
    with running_planes(
        tmp_path_factory.mktemp("slashes"), assertion_key, nginx_http="merge_slashes off;"
    ) as both:
        plane = both["forward_auth"]
        headers = [
            ("X-Original-URI", f"/patients/{NIR}"),
            ("X-Gateway-Session", plane.login()),
            ("X-Gateway-Reason", "quota_exceeded"),
        ]
        response, _ = plane.send(target, headers)
        assert response.status == 404 and response.header("X-Gateway-Assertion") is None


@pytest.mark.parametrize(
    ("target", "session", "reason", "card", "ecps"),
    [
        (f"/patients/{NIR}", None, "unauthenticated", True, True),
        # The card-only step-up: why an e-CPS login is not enough, and only the card offered.
        ("/account/rib", LoginMethod.ECPS, "login_method_not_accepted", True, False),
    ],
)
def test_a_login_page_says_why_and_offers_the_accepted_methods_in_both_planes(
    login_planes: tuple[dict[str, Plane], PscServer],
    target: str,
    session: LoginMethod | None,
    reason: str,
    card: bool,
    ecps: bool,
) -> None:
    planes = login_planes[0]
    cookie = [("Cookie", f"{COOKIE}={planes['proxy'].login(session)}")] if session else []
    responses = _both(planes, target, [("Accept", "text/html"), *cookie])
    pages = {mode: _refusal(response) for mode, response in responses.items()}
    assert pages["proxy"][:2] == (401, reason)
    assert pages["forward_auth"] == pages["proxy"]
    page = pages["forward_auth"][2]
    assert ('id="login-card"' in page) is card
    assert ('id="login-ecps"' in page) is ecps


def test_a_refused_request_with_a_body_gets_the_same_page_in_both_planes(planes: dict[str, Plane]) -> None:
    body = b"iban=FR7630001007941234567890185"
    cookie = ("Cookie", f"{COOKIE}={planes['proxy'].login()}")
    headers = [
        cookie,
        ("Accept", "text/html"),
        ("Origin", "https://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Content-Length", str(len(body))),
    ]
    responses = {
        mode: plane.send("/account/profile", headers, method="POST", body=body)
        for mode, plane in planes.items()
    }
    pages = {mode: _refusal(response) for mode, (response, _) in responses.items()}
    assert [records for _, records in responses.values()] == [[], []]
    assert pages["proxy"][:2] == (403, "cross_site_request")
    assert pages["forward_auth"] == pages["proxy"]


@pytest.fixture(scope="module")
def ecps_planes(
    tmp_path_factory: pytest.TempPathFactory, assertion_key: Path
) -> Iterator[tuple[dict[str, Plane], PscServer]]:
    """Both planes of a gateway with e-CPS login (the PSC stand-in), with the default login budgets."""
    directory = tmp_path_factory.mktemp("parity-ecps")
    gateway_port = free_port()
    registration = gateway_registration(f"http://127.0.0.1:{gateway_port}")
    with running_psc(directory, [registration], identities=IDENTITIES) as psc:
        extra = {"ecps": ecps_settings(psc, f"http://127.0.0.1:{gateway_port}")}
        with running_planes(directory, assertion_key, extra, ECPS_SECRETS, gateway_port) as both:
            yield both, psc


@pytest.mark.parametrize("mode", ["proxy", "forward_auth"])
def test_a_backchannel_logout_ends_cached_access_at_once(
    ecps_planes: tuple[dict[str, Plane], PscServer], mode: str
) -> None:
    """PSC ends the professional's session: the gateway ends it by tag (it knows no session id then), and
    nginx stops serving the reads it had cached for it."""
    planes, psc = ecps_planes
    base = f"http://127.0.0.1:{planes[mode].port}"
    browser, path = Browser(), f"/patients/{NIR}"
    start = browser.get(f"{base}/.gateway/login/ecps?next={path}")
    assert start.status_code in (302, 303), start.status_code
    assert browser.get(psc.approve(start.headers["Location"], DOCTOR)).status_code == 303
    for _ in range(2):  # the second one from nginx's decision cache (forward-auth)
        assert browser.get(base + path).status_code == 200
    deliveries = psc.backchannel_logout(sid=str(psc.sessions(DOCTOR)[-1]["sid"]))
    assert [d["status"] for d in deliveries] == [200]
    assert browser.get(base + path).status_code == 401  # within the cache lifetime


@pytest.mark.parametrize("status", [401, 403, 500])
def test_the_portal_own_errors_reach_the_client_whatever_nginx_http_has(
    tmp_path: Path, assertion_key: Path, status: int
) -> None:
    """Proxy mode forwards the portal's own refusals and errors as they are: so does forward-auth, even under
    an http-level proxy_intercept_errors (the template's error_page lines are for the gateway's refusals)."""
    with running_planes(tmp_path, assertion_key, nginx_http="proxy_intercept_errors on;") as both:
        for plane in both.values():
            cookie = [("Cookie", f"{COOKIE}={plane.login()}")]
            response, records = plane.send(f"/static/status-{status}", cookie)
            assert (response.status, len(records)) == (status, 1), plane.mode
            assert b"its own answer" in response.body, plane.mode
