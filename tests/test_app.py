"""The gateway app in-process (Flask test client) in front of a real upstream process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.app import create_app
from gateway.audit import AuditError
from gateway.identity import LoginMethod
from gateway.runtime import gateway_of
from gateway.settings import load_settings
from tests.support.audit import audit_records
from tests.support.config import write_config
from tests.support.sessions import COOKIE, login


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def audit_events(tmp_path: Path) -> list[dict]:
    return audit_records(tmp_path / "audit.log")


def test_public_route_is_forwarded(client: FlaskClient) -> None:
    response = client.get("/hello")
    assert response.status_code == 200
    assert b"hello from the portal" in response.data


def test_unmatched_request_is_denied_by_default(client: FlaskClient, tmp_path: Path) -> None:
    response = client.get("/nothing/here", headers={"Accept": "text/html"})
    assert response.status_code == 403
    assert response.headers["X-Gateway-Reason"] == "no_matching_rule"
    assert "existe pas sur ce portail" in response.get_data(as_text=True)
    assert audit_events(tmp_path)[-1]["reasons"] == ["no_matching_rule"]


def test_protected_route_without_session_answers_login_page(client: FlaskClient) -> None:
    response = client.get("/patients/180017512345678", headers={"Accept": "text/html"})
    assert response.status_code == 401
    page = response.get_data(as_text=True)
    assert "Identification requise" in page
    assert "Traceback" not in page


def test_english_when_the_browser_asks(client: FlaskClient) -> None:
    response = client.get(
        "/patients/180017512345678", headers={"Accept": "text/html", "Accept-Language": "en-GB,en;q=0.9"}
    )
    assert "Login required" in response.get_data(as_text=True)


def test_api_clients_get_json(client: FlaskClient) -> None:
    response = client.get("/patients/180017512345678", headers={"Accept": "application/json"})
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "unauthenticated"


def test_session_reaches_protected_route_with_identity_and_assertion(app: Flask, client: FlaskClient) -> None:
    login(app, client)
    response = client.get("/echo/protected/x")
    assert response.status_code == 200
    seen = response.json["headers"]
    assert seen["x-gateway-subject"] == "810001234567"
    assert seen["x-gateway-auth-method"] == "card"
    assert seen["x-gateway-professions"] == "10"
    keys = KeySet.import_key_set(client.get("/.gateway/jwks.json").json)
    claims = jwt.decode(seen["x-gateway-assertion"], keys, algorithms=["ES256"]).claims
    assert (
        claims["sub"] == "810001234567" and claims["aud"] == "portal" and claims["rule"] == "echo-protected"
    )
    assert claims["exp"] - claims["iat"] == 60


def test_gateway_session_cookie_never_reaches_the_portal(app: Flask, client: FlaskClient) -> None:
    login(app, client)
    client.set_cookie("portal", "kept", domain="localhost")
    seen = client.get("/echo/protected/x").json["headers"]
    assert "portal=kept" in seen["cookie"]
    assert COOKIE not in seen["cookie"]


def test_profession_not_allowed_is_final(app: Flask, client: FlaskClient) -> None:
    login(app, client, professions=("60",))
    response = client.get("/patients/180017512345678", headers={"Accept": "text/html"})
    assert response.status_code == 403
    assert response.headers["X-Gateway-Reason"] == "profession_not_allowed"


def test_step_up_when_login_too_old(app: Flask, client: FlaskClient) -> None:
    login(app, client, auth_time=time.time() - 3600)
    response = client.get("/echo/card/x", headers={"Accept": "text/html"})
    assert response.status_code == 401
    assert response.headers["X-Gateway-Reason"] == "login_too_old"


def test_ecps_session_on_card_only_route_must_log_in_with_card(app: Flask, client: FlaskClient) -> None:
    login(app, client, method=LoginMethod.ECPS, auth_mode="MOBILE")
    response = client.get("/echo/card/x")
    assert response.status_code == 401
    assert response.headers["X-Gateway-Reason"] == "login_method_not_accepted"


def test_deny_rule(client: FlaskClient) -> None:
    response = client.get("/echo/forbidden/x")
    assert response.status_code == 403
    assert response.headers["X-Gateway-Reason"] == "denied_by_rule"


def test_methods_outside_http_semantics_answer_405_and_never_reach_the_portal(
    client: FlaskClient, tmp_path: Path
) -> None:
    for method, path in (("TRACE", "/echo/public/x"), ("CONNECT", "/echo/public/x"), ("PROPFIND", "/x"),
                         ("TRACE", "/.gateway/login")):  # fmt: skip
        response = client.open(path, method=method, headers={"Accept": "text/html"})
        assert response.status_code == 405, method
        assert "GET" in response.headers["Allow"]
        assert b"raw_uri" not in response.data
        # The gateway's own page (French by default, a way home), and an audit record.
        assert response.headers["X-Gateway-Reason"] == "method_not_allowed"
        page = response.get_data(as_text=True)
        assert "Requête non acceptée" in page and 'id="home"' in page
        event = audit_events(tmp_path)[-1]
        assert (event["event"], event["reasons"], event["http_method"]) == (
            "bad_request",
            ["method_not_allowed"],
            method,
        )


def test_a_refused_method_that_cannot_be_audited_is_a_503_page(app: Flask, client: FlaskClient) -> None:
    def unwritable(*args: object, **kwargs: object) -> None:
        raise AuditError("disk full")

    gateway_of(app).audit.record = unwritable  # type: ignore[method-assign]
    for path in ("/echo/public/x", "/.gateway/login"):
        response = client.open(path, method="TRACE", headers={"Accept": "text/html"})
        assert response.status_code == 503 and response.headers["X-Gateway-Reason"] == "audit_unavailable"


@pytest.mark.parametrize(
    "raw",
    ["/echo/public/..%2f..%2fprotected/x", "/echo/public/%2e%2e/%2e%2e/protected/x/..%5c", "/echo/public;/x"],
)
def test_bad_paths_answer_400_and_never_reach_upstream(client: FlaskClient, raw: str) -> None:
    response = client.get(raw)
    assert response.status_code == 400
    assert response.headers["X-Gateway-Reason"] == "bad_request_path"


def test_dot_segments_are_resolved_before_matching(client: FlaskClient) -> None:
    # Resolves to /echo/protected/x: the protected rule applies, not the public one.
    response = client.get("/echo/public/%2e%2e/%2e%2e/echo/protected/x")
    assert response.status_code == 401


def test_upstream_receives_the_matched_path(client: FlaskClient) -> None:
    seen = client.get("/echo/public//a/./b/%7Ec?q=%2F..").json
    assert seen["raw_uri"] == "/echo/public/a/b/~c?q=%2F.."


def test_case_variants_match_the_protected_rule(client: FlaskClient) -> None:
    assert client.get("/ECHO/Protected/x").status_code == 401


def test_routing_override_headers_are_not_forwarded(client: FlaskClient) -> None:
    seen = client.get(
        "/echo/public/x", headers={"X-Original-URL": "/echo/protected/x", "X-Forwarded-Uri": "/admin"}
    ).json["headers"]
    assert "x-original-url" not in seen and "x-forwarded-uri" not in seen


def test_spoofed_identity_headers_are_stripped_and_audited(client: FlaskClient, tmp_path: Path) -> None:
    seen = client.get(
        "/echo/public/x",
        headers={"X-Gateway-Subject": "810009999999", "X-SSL-Client-Cert": "forged"},
    ).json["headers"]
    assert "x-gateway-subject" not in seen and "x-ssl-client-cert" not in seen
    event = audit_events(tmp_path)[-1]
    assert event["event"] == "spoofed_header"
    assert event["headers"] == ["X-Gateway-Subject", "X-Ssl-Client-Cert"]


def test_forwarded_headers_replace_untrusted_ones(client: FlaskClient) -> None:
    seen = client.get(
        "/echo/public/x",
        headers={"X-Forwarded-For": "10.9.9.9", "X-Forwarded-Host": "evil.example"},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    ).json["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-host"] == "localhost"
    assert seen["x-forwarded-proto"] == "http"


def test_portal_cannot_set_the_gateway_cookie(client: FlaskClient) -> None:
    cookies = client.get("/set-cookie").headers.getlist("Set-Cookie")
    assert cookies == ["portal=ok; Path=/"]


def test_upstream_down_gives_502_page(tmp_path: Path, assertion_key: Path) -> None:
    from tests.support.processes import free_port

    config = write_config(
        tmp_path, upstream_url=f"http://127.0.0.1:{free_port()}", assertion_key=assertion_key
    )
    client = create_app(load_settings(config)).test_client()
    response = client.get("/hello", headers={"Accept": "text/html", "Accept-Language": "en"})
    assert response.status_code == 502
    assert "The portal is not answering" in response.get_data(as_text=True)


def test_upstream_slow_gives_504_and_the_gateway_keeps_serving(client: FlaskClient) -> None:
    response = client.get("/slow/3", headers={"Accept": "text/html"})
    assert response.status_code == 504
    assert client.get("/hello").status_code == 200


def test_bad_host_header(client: FlaskClient, tmp_path: Path) -> None:
    response = client.get("/hello", headers={"Host": "bad host!"})
    assert response.status_code == 400
    assert response.headers["X-Gateway-Reason"] == "bad_host"
    event = audit_events(tmp_path)[-1]
    assert (event["event"], event["reasons"], event["host"]) == ("bad_request", ["bad_host"], "bad host!")


def test_unknown_gateway_paths_never_reach_the_portal(client: FlaskClient, tmp_path: Path) -> None:
    for method in ("GET", "DELETE"):
        response = client.open(
            "/.gateway/nothing/here", method=method, headers={"Accept": "text/html", "Accept-Language": "en"}
        )
        assert response.status_code == 404
        assert b"hello" not in response.data
        assert response.headers["X-Gateway-Reason"] == "unknown_gateway_path"
        page = response.get_data(as_text=True)
        assert "Page not found" in page and 'id="home"' in page
        event = audit_events(tmp_path)[-1]
        assert (event["event"], event["reasons"]) == ("bad_request", ["unknown_gateway_path"])


def test_an_unexpected_failure_is_a_page_never_a_stack_trace(app: Flask, client: FlaskClient) -> None:
    class BrokenStore:
        def get(self, session_id: str, now: float) -> None:
            raise RuntimeError("secret internal detail")

    gateway_of(app).sessions = BrokenStore()  # type: ignore[assignment]
    client.set_cookie(COOKIE, "anything", domain="localhost")
    response = client.get("/echo/protected/x", headers={"Accept": "text/html"})
    page = response.get_data(as_text=True)
    assert response.status_code == 500
    assert response.headers["X-Gateway-Reason"] == "internal_error"
    assert "Erreur interne" in page and "secret internal detail" not in page and "Traceback" not in page


def test_a_host_the_gateway_does_not_serve_is_refused_on_its_own_pages_too(
    client: FlaskClient, tmp_path: Path
) -> None:
    for path in ("/hello", "/.gateway/login", "/.gateway/logout"):
        response = client.get(path, headers={"Host": "evil.example", "Accept": "text/html"})
        assert (response.status_code, response.headers["X-Gateway-Reason"]) == (400, "host_not_allowed"), path
        assert "Site inconnu" in response.get_data(as_text=True)
    events = [e for e in audit_events(tmp_path) if e["event"] == "bad_request"]
    assert [e["host"] for e in events] == ["evil.example"] * 3
    # Probes and the portal's key fetch reach the gateway by internal names.
    for path in ("/.gateway/healthz", "/.gateway/jwks.json"):
        assert client.get(path, headers={"Host": "gateway.internal:8080"}).status_code == 200, path


def test_the_client_request_id_never_reaches_the_portal(client: FlaskClient) -> None:
    echoed = client.get("/echo/public/x", headers={"X-Request-Id": "chosen"}).json["headers"]
    assert "chosen" not in echoed["x-request-id"]  # one id, the gateway's (on main: "chosen,<the gateway's>")
