"""Forward-auth (/.gateway/auth): in-process decisions, then a real nginx with auth_request in front."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from gateway.access_stream import DecisionToken, Position, position_file
from gateway.identity import Identity, LoginMethod
from gateway.runtime import gateway_of
from gateway.sessions import RedisSessionStore
from gateway.wsgi import RAW_ROUTES_ATTRIBUTE
from tests.support.apps import gateway_app
from tests.support.audit import audit_records
from tests.support.config import TEST_POLICIES, write_config
from tests.support.faults import immutable
from tests.support.gateways import serve_argv
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, running_nginx
from tests.support.processes import free_port, running, wait_until
from tests.support.redis import redis_server

COOKIE = "__Host-gateway-session"
NGINX = "127.0.0.5"
POLICIES = TEST_POLICIES + (
    "  - name: counted\n    match: { path: /echo/counted/** }\n    action: authenticate\n"
    "    quota: { window: 1h, max_requests: 1000 }\n"
)


def identity(**fields: object) -> Identity:
    values: dict = {
        "idnat": "810001234567",
        "method": LoginMethod.CARD,
        "auth_time": time.time(),
        "professions": ("10",),
        "auth_mode": "CARD",
    }
    values.update(fields)
    return Identity(**values)


@pytest.fixture
def app(tmp_path: Path, upstream_url: str, assertion_key: Path) -> Iterator[Flask]:
    """As deployed: nginx's access stream read by the gateway (forward_auth.access_log)."""
    nginx = {"trusted_nginx": ["127.0.0.0/29"], "access_log": str(tmp_path / "access.log")}
    with gateway_app(
        tmp_path,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        policies=POLICIES,
        extra={"forward_auth": nginx},
    ) as application:
        yield application


@pytest.fixture
def app_without_stream(tmp_path: Path, upstream_url: str, assertion_key: Path) -> Iterator[Flask]:
    with gateway_app(
        tmp_path,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        policies=POLICIES,
        extra={"forward_auth": {"trusted_nginx": ["127.0.0.0/29"]}},
    ) as application:
        yield application


def ask(
    client: FlaskClient,
    uri: str,
    *,
    method: str = "GET",
    peer: str = NGINX,
    session: str | None = None,
    **headers: str,
):
    """The sub-request the shipped template sends: ``session`` is the id nginx read from the cookie."""
    sent = {"X-Original-Method": method, "X-Original-URI": uri, "X-Forwarded-Host": "portal.test", **headers}
    if session is not None:
        sent["X-Gateway-Session"] = session
    return client.get("/.gateway/auth", headers=sent, environ_base={"REMOTE_ADDR": peer})


def audit_events(tmp_path: Path) -> list[dict]:
    return audit_records(tmp_path / "audit.log")


def test_public_route_is_allowed_and_cacheable(app: Flask) -> None:
    response = ask(app.test_client(), "/hello")
    assert response.status_code == 200
    assert response.headers["X-Gateway-Rule"] == "public-hello"
    assert (response.headers["X-Gateway-Cacheable"], response.headers["X-Accel-Expires"]) == ("1", "5")
    assert "X-Gateway-Subject" not in response.headers
    # nginx does not log public requests: the token says the route is public.
    assert response.headers["X-Gateway-Decision"].startswith("public ")


def test_the_decision_token_carries_what_the_access_record_needs(app: Flask) -> None:
    session = gateway_of(app).sessions.create(identity(), time.time())
    request_id = "0123456789abcdef0123456789abcdef"
    response = ask(app.test_client(), "/echo/counted/x", session=session.id, **{"X-Request-Id": request_id})
    token = DecisionToken.decode(response.headers["X-Gateway-Decision"])
    assert token == DecisionToken(
        "allow",
        request_id,
        rule="counted",
        reasons=("authenticated",),
        idnat="810001234567",
        method="card",
        auth_mode="CARD",
    )
    refused = DecisionToken.decode(ask(app.test_client(), "/echo/forbidden/x").headers["X-Gateway-Decision"])
    assert refused is not None and (refused.outcome, refused.reasons) == ("deny", ("denied_by_rule",))


def test_with_the_stream_the_access_is_recorded_from_it_not_by_the_decision(
    app: Flask, tmp_path: Path
) -> None:
    session = gateway_of(app).sessions.create(identity(), time.time())
    for uri in ("/echo/protected/x", "/echo/forbidden/x"):
        assert ask(app.test_client(), uri, session=session.id).status_code in (200, 403)
    assert audit_records(tmp_path / "audit.log", "decision") == []


def test_without_the_stream_no_protected_answer_is_cached_and_each_decision_is_audited(
    app_without_stream: Flask, tmp_path: Path
) -> None:
    app = app_without_stream
    session = gateway_of(app).sessions.create(identity(), time.time())
    response = ask(app.test_client(), "/echo/protected/x", session=session.id)
    assert response.status_code == 200
    assert (response.headers["X-Gateway-Cacheable"], response.headers["X-Accel-Expires"]) == ("0", "0")
    assert ask(app.test_client(), "/hello").headers["X-Gateway-Cacheable"] == "1"  # public: nothing to audit
    (record,) = audit_records(tmp_path / "audit.log", "decision")
    assert (record["path"], record["decision"], record["idnat"]) == (
        "/echo/protected/x",
        "allow",
        "810001234567",
    )


def test_a_cached_allow_never_outlives_the_login_max_age_nor_the_session(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    forward_auth = {"trusted_nginx": ["127.0.0.0/29"], "access_log": str(tmp_path / "access.log")}
    sessions = {"idle_timeout": "1m", "absolute_timeout": "1m"}
    extra = {"forward_auth": forward_auth, "sessions": sessions}
    with gateway_app(
        tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, policies=POLICIES, extra=extra
    ) as app:
        store = gateway_of(app).sessions
        # card-only: max_age 10 min; a login 9 min 58 s old may be cached 2 s, not 5.
        old_login = store.create(identity(auth_time=time.time() - 598), time.time())
        response = ask(app.test_client(), "/echo/card/x", session=old_login.id)
        assert response.status_code == 200 and response.headers["X-Accel-Expires"] in ("1", "2")
        ending = store.create(identity(), time.time() - 57)  # ends 3 s from now
        response = ask(app.test_client(), "/echo/protected/x", session=ending.id)
        assert response.status_code == 200 and response.headers["X-Accel-Expires"] in ("2", "3")


def test_a_quota_route_is_cacheable_with_the_stream(app: Flask) -> None:
    session = gateway_of(app).sessions.create(identity(), time.time())
    response = ask(app.test_client(), "/echo/counted/x", session=session.id)
    assert (response.headers["X-Gateway-Cacheable"], response.headers["X-Accel-Expires"]) == ("1", "5")


def test_no_decision_while_the_audit_trail_lags_the_stream(app: Flask, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    access_log.write_bytes(b'{"line": "nobody read yet"}\n')
    stale = time.time() - 60
    position_file(tmp_path / "audit.log").write_bytes(Position(0, 0, time.time(), stale).encode())
    session = gateway_of(app).sessions.create(identity(), time.time())
    response = ask(app.test_client(), "/echo/protected/x", session=session.id)
    assert (response.status_code, response.headers["X-Gateway-Reason"]) == (503, "audit_unavailable")
    assert "X-Gateway-Subject" not in response.headers and response.headers["X-Gateway-Cacheable"] == "0"


def test_protected_route_without_session_answers_401_with_the_reason(app: Flask) -> None:
    response = ask(app.test_client(), "/echo/protected/a%20b?x=1")
    assert response.status_code == 401
    assert response.headers["X-Gateway-Reason"] == "unauthenticated"


def test_session_gets_identity_headers(app: Flask) -> None:
    session = gateway_of(app).sessions.create(identity(), time.time())
    client = app.test_client()
    response = ask(client, "/echo/protected/x", session=session.id)
    assert response.status_code == 200
    assert response.headers["X-Gateway-Subject"] == "810001234567"
    assert response.headers["X-Gateway-Auth-Method"] == "card"
    assert response.headers["X-Gateway-Professions"] == "10"
    assert response.headers["X-Gateway-Assertion"].count(".") == 2
    assert response.headers["X-Gateway-Cacheable"] == "1"


def test_only_the_session_nginx_keyed_on_counts_never_the_cookie(app: Flask) -> None:
    session = gateway_of(app).sessions.create(identity(), time.time())
    client = app.test_client()
    # nginx's cache key reads "__Host-gateway-session=<id>" only: with a blank before '=' it keys the request
    # as anonymous, and so must the gateway judge it, or its allow would be served to the next anonymous user.
    for cookie in (f"{COOKIE} ={session.id}", f"{COOKIE}={session.id}"):
        response = ask(client, "/echo/protected/x", Cookie=cookie)
        assert response.status_code == 401, cookie
        assert "X-Gateway-Subject" not in response.headers


def test_unsafe_methods_are_never_cacheable(app: Flask) -> None:
    session = gateway_of(app).sessions.create(identity(), time.time())
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = ask(app.test_client(), "/echo/protected/x", method=method, session=session.id)
        assert response.status_code == 200, method
        assert response.headers["X-Gateway-Cacheable"] == "0" and response.headers["X-Accel-Expires"] == "0"
    head = ask(app.test_client(), "/echo/protected/x", method="HEAD", session=session.id)
    assert head.headers["X-Gateway-Cacheable"] == "1"


def test_deny_is_403_with_the_reason_and_judges_the_original_method(app: Flask) -> None:
    assert ask(app.test_client(), "/echo/forbidden/x").headers["X-Gateway-Reason"] == "denied_by_rule"
    session = gateway_of(app).sessions.create(identity(), time.time())
    client = app.test_client()
    assert ask(client, "/patients/1", method="GET", session=session.id).status_code == 200
    refused = ask(client, "/patients/1", method="DELETE", session=session.id)  # the rule names GET only
    assert refused.status_code == 403 and refused.headers["X-Gateway-Reason"] == "no_matching_rule"


def test_bad_original_uri_is_400(app: Flask) -> None:
    response = ask(app.test_client(), "/echo/public/..%2F..%2Fetc")
    assert response.status_code == 400
    assert response.headers["X-Gateway-Reason"] == "bad_request_path"
    assert ask(app.test_client(), "").status_code == 400


@pytest.mark.parametrize(
    "uri",
    [
        "/patients/180017512345678//..//..",  # judged "/" (public); an RFC 3986 portal serves the record
        "/echo/card/x//..",  # judged by another rule than the one a portal would apply
        "/echo/public/../protected/x",
        "/echo/public/./x",
        "/echo/public//x",
        "/echo/public/%7Ex",  # an encoded unreserved character
        "/echo/public/%2a",  # a lower-case escape
        "/echo/public/%2e%2e/%2e%2e/echo/protected/x",
    ],
)
def test_an_original_uri_not_in_normal_form_is_400_and_audited(app: Flask, tmp_path: Path, uri: str) -> None:
    session = gateway_of(app).sessions.create(identity(), time.time())
    response = ask(app.test_client(), uri + "?q=1", session=session.id)
    assert (response.status_code, response.headers["X-Gateway-Reason"]) == (400, "bad_request_path")
    event = audit_events(tmp_path)[-1]
    assert (event["event"], event["reasons"]) == ("bad_request", ["bad_request_path"])
    assert event["detail"]  # "not in normal form", or why the normalisation itself refuses it


def test_an_original_uri_in_normal_form_is_judged_with_its_query(app: Flask) -> None:
    for uri in ("/echo/public/a%20b/~c/", "/echo/public/x?q=%2F..&q=/../", "/hello"):
        assert ask(app.test_client(), uri).status_code == 200, uri


def test_a_host_the_gateway_does_not_serve_is_400_and_audited(app: Flask, tmp_path: Path) -> None:
    response = ask(app.test_client(), "/hello", **{"X-Forwarded-Host": "evil.example"})
    assert (response.status_code, response.headers["X-Gateway-Reason"]) == (400, "host_not_allowed")
    event = audit_events(tmp_path)[-1]
    assert (event["event"], event["reasons"], event["host"]) == (
        "bad_request",
        ["host_not_allowed"],
        "evil.example",
    )
    malformed = ask(app.test_client(), "/hello", **{"X-Forwarded-Host": "bad host!"})
    assert (malformed.status_code, malformed.headers["X-Gateway-Reason"]) == (400, "bad_host")


def test_the_audit_trail_uses_nginx_request_id(app_without_stream: Flask, tmp_path: Path) -> None:
    app = app_without_stream
    ask(app.test_client(), "/echo/forbidden/x", **{"X-Request-Id": "0123456789abcdef0123456789abcdef"})
    assert audit_events(tmp_path)[-1]["request_id"] == "0123456789abcdef0123456789abcdef"
    ask(app.test_client(), "/echo/forbidden/x", **{"X-Request-Id": "not an id; really"})
    assert audit_events(tmp_path)[-1]["request_id"] != "not an id; really"


def test_original_headers_from_an_untrusted_peer_are_refused_and_audited(app: Flask, tmp_path: Path) -> None:
    response = ask(app.test_client(), "/hello", peer="198.51.100.7")
    assert response.status_code == 403
    assert response.headers["X-Gateway-Reason"] == "spoofed_header"
    event = audit_events(tmp_path)[-1]
    assert event["event"] == "spoofed_header" and event["client_ip"] == "198.51.100.7"
    assert event["headers"] == ["X-Original-Method", "X-Original-URI"]


# --- A real nginx with auth_request in front of the portal ------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path) -> Iterator[dict]:
    directory = tmp_path_factory.mktemp("forward-auth")
    gateway_port, access_log = free_port(), directory / "nginx" / "access.log"
    with redis_server() as redis:
        config = write_config(
            directory,
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            policies=POLICIES,
            listen=f"127.0.0.1:{gateway_port}",
            # No per-process session cache: the tests revoke sessions from outside and expect it at once.
            extra={
                "sessions": {"store": redis.url, "local_cache_seconds": 0},
                "forward_auth": {"trusted_nginx": ["127.0.0.1/32"], "access_log": str(access_log)},
            },
        )
        argv = serve_argv(config)
        with running(argv, gateway_port, log=directory / "gateway.log"):
            values = {
                "GATEWAY": f"127.0.0.1:{gateway_port}",
                "PORTAL": upstream_url.removeprefix("http://"),
                "ACCESS_LOG": str(access_log),
            }
            with running_nginx(directory / "nginx", FORWARD_AUTH_TEMPLATE, values) as nginx:
                store = RedisSessionStore(redis.url)
                yield {"nginx": nginx, "store": store, "directory": directory}


def test_nginx_public_route_passes(stack: dict) -> None:
    response = requests.get(stack["nginx"].base_url + "/hello", timeout=5)
    assert response.status_code == 200 and b"hello from the portal" in response.content


def test_nginx_protected_route_without_session_answers_the_login_page(stack: dict) -> None:
    response = requests.get(
        stack["nginx"].base_url + "/echo/protected/x?y=1",
        timeout=5,
        allow_redirects=False,
        headers={"Accept": "text/html"},
    )
    # The gateway's page, as in proxy mode: why a login is needed (and the login choices, when configured).
    assert response.status_code == 401 and response.headers["X-Gateway-Reason"] == "unauthenticated"
    assert "Identification" in response.text


def test_nginx_session_reaches_the_portal_with_identity_headers(stack: dict) -> None:
    session = stack["store"].create(identity(), time.time())
    cookies = f"portal=kept; {COOKIE}={session.id}"
    forged = {"X-Gateway-Subject": "800000000000", "Cookie": cookies}
    response = requests.get(stack["nginx"].base_url + "/echo/protected/x", headers=forged, timeout=5)
    assert response.status_code == 200
    seen = response.json()["headers"]
    assert seen["x-gateway-subject"] == "810001234567"
    assert seen["x-gateway-auth-method"] == "card" and seen["x-gateway-professions"] == "10"
    assert seen["x-gateway-assertion"].count(".") == 2
    assert COOKIE not in seen["cookie"] and "portal=kept" in seen["cookie"]


def test_nginx_denied_route_is_403_and_the_decision_endpoint_is_not_exposed(stack: dict) -> None:
    base = stack["nginx"].base_url
    denied = requests.get(base + "/echo/forbidden/x", timeout=5)
    assert denied.status_code == 403 and denied.headers["X-Gateway-Reason"] == "denied_by_rule"
    direct = requests.get(base + "/.gateway/auth", headers={"X-Original-URI": "/echo/protected/x"}, timeout=5)
    assert direct.status_code == 404


def test_nginx_serves_repeated_reads_from_its_decision_cache_quota_routes_included(stack: dict) -> None:
    store = stack["store"]
    session = store.create(identity(), time.time())
    headers = {"Cookie": f"{COOKIE}={session.id}"}
    base = stack["nginx"].base_url
    for path in ("/echo/protected/cached", "/echo/counted/x"):
        assert requests.get(base + path, headers=headers, timeout=5).status_code == 200
    store.delete(session.id)  # logout: the gateway now says 401, nginx's cache a few seconds more
    for path in ("/echo/protected/cached", "/echo/counted/x"):
        cached = requests.get(base + path, headers=headers, timeout=5, allow_redirects=False)
        assert cached.status_code == 200, path
    fresh = requests.get(base + "/echo/counted/y", headers=headers, timeout=5, allow_redirects=False)
    assert fresh.status_code == 401  # a new resource always asks the gateway


def test_nginx_refuses_a_cross_site_post_and_never_caches_a_state_changing_answer(stack: dict) -> None:
    session = stack["store"].create(identity(), time.time())
    cookie = {"Cookie": f"{COOKIE}={session.id}"}
    url = stack["nginx"].base_url + "/echo/protected/form"
    same_site = requests.post(
        url, headers={**cookie, "Sec-Fetch-Site": "same-origin"}, data=b"x=1", timeout=5
    )
    assert same_site.status_code == 200 and same_site.json()["method"] == "POST"
    # Right after an allowed POST to the same URI: a cached "allow" would let the forged one through.
    forged_headers = {**cookie, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    forged = requests.post(url, headers=forged_headers, data=b"x=2", timeout=5, allow_redirects=False)
    assert forged.status_code == 403 and forged.headers["X-Gateway-Reason"] == "cross_site_request"

    def accesses() -> list[dict]:
        records = audit_records(stack["directory"] / "audit.log", "access")
        return [e for e in records if e["path"] == "/echo/protected/form"]

    wait_until(lambda: len(accesses()) == 2, timeout=10, what="both accesses recorded")
    assert [(e["http_method"], e["status"], e["reasons"]) for e in accesses()] == [
        ("POST", 200, ["authenticated"]),
        ("POST", 403, ["cross_site_request"]),
    ]


def test_the_raw_route_answers_a_failure_as_the_usual_way_does(
    app_without_stream: Flask, tmp_path: Path
) -> None:
    """The worker's raw route (gateway/worker.py) for a refusal that cannot be audited: 503, as through WSGI."""
    route = getattr(app_without_stream, RAW_ROUTES_ATTRIBUTE)["/.gateway/auth"]
    environ = {
        "REMOTE_ADDR": NGINX,
        "HTTP_HOST": "cps_gateway",
        "HTTP_X_ORIGINAL_URI": "/echo/./protected/x",  # refused as malformed, which is audited
        "HTTP_X_FORWARDED_HOST": "portal.test",
    }
    assert route(dict(environ))[0] == 400
    with immutable(tmp_path / "audit.log"):
        status, headers = route(dict(environ))
        usual = ask(app_without_stream.test_client(), environ["HTTP_X_ORIGINAL_URI"])
    assert (status, dict(headers)["X-Gateway-Reason"]) == (503, "audit_unavailable")
    assert (usual.status_code, usual.headers["X-Gateway-Reason"]) == (503, "audit_unavailable")


@pytest.mark.parametrize("retry_after", ["9" * 5000, "\u00b2", "-1", "1e3", ""])
def test_the_refusal_page_never_fails_on_the_retry_after_nginx_relays(app: Flask, retry_after: str) -> None:
    page = app.test_client().get(
        "/.gateway/refused",
        headers={"X-Gateway-Reason": "quota_exceeded", "X-Gateway-Retry-After": retry_after},
        environ_base={"REMOTE_ADDR": NGINX},
    )
    assert (page.status_code, page.headers["X-Gateway-Reason"]) == (429, "quota_exceeded")
    assert "Retry-After" not in page.headers


@pytest.mark.parametrize(
    "path", ["/.gateway//auth", "/.gateway/./auth", "/.gateway//refused", "/.gateway/x/../refused"]
)
def test_the_decision_and_refusal_page_answer_only_their_very_path(app: Flask, path: str) -> None:
    """nginx asks exactly /.gateway/auth and /.gateway/refused; another spelling of them is a client's, which
    got past the template's 404 (an nginx that does not merge slashes): it would choose what is judged."""
    session = gateway_of(app).sessions.create(identity(), time.time()).id
    headers = {
        "X-Original-URI": "/patients/1",
        "X-Gateway-Session": session,
        "X-Gateway-Reason": "quota_exceeded",
    }
    response = app.test_client().get(path, headers=headers, environ_base={"REMOTE_ADDR": NGINX})
    assert response.status_code == 404 and "X-Gateway-Assertion" not in response.headers
