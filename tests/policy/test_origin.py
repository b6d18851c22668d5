"""The cross-site (CSRF) check on authenticate rules: the pure decision, then the gateway in front of a real
upstream (the portal echoes what reached it), then the policy grammar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from gateway.config_source import ConfigErrors
from gateway.policy.loader import load_policies
from gateway.policy.origin import is_cross_site, is_embedded_by_another_site
from tests.support.apps import gateway_app, logged_in
from tests.support.audit import audit_records
from tests.support.config import TEST_POLICIES

PORTAL = "https://portail.example.fr"
TRUSTED = frozenset({PORTAL, "https://partenaire.example.fr"})


@pytest.mark.parametrize(
    ("method", "origin", "site", "refused"),
    [
        ("POST", "https://evil.example", None, True),
        ("POST", "https://evil.example", "cross-site", True),
        ("POST", "https://carte.example.fr", "same-site", True),  # a sibling sub-domain is another site
        ("POST", "null", None, True),  # sandboxed frames, data: URLs
        ("POST", None, "cross-site", True),
        ("DELETE", "https://evil.example", None, True),
        ("PUT", "https://evil.example", None, True),
        ("PATCH", "https://evil.example", None, True),
        ("POST", PORTAL, None, False),
        ("POST", "HTTPS://PORTAIL.example.fr", None, False),
        ("POST", PORTAL, "same-origin", False),
        ("POST", None, "same-origin", False),
        ("POST", None, "none", False),  # typed or bookmarked: the user's own doing
        ("POST", "https://partenaire.example.fr", "cross-site", False),  # in server.allowed_origins
        ("POST", None, None, False),  # no browser (curl, a script with a cookie jar)
        ("GET", "https://evil.example", "cross-site", False),
        ("HEAD", "https://evil.example", "cross-site", False),
        ("OPTIONS", "https://evil.example", "cross-site", False),
    ],
)
def test_is_cross_site(method: str, origin: str | None, site: str | None, refused: bool) -> None:
    assert is_cross_site(method, origin, site, TRUSTED) is refused


@pytest.mark.parametrize(
    ("site", "mode", "dest", "purpose", "embedded"),
    [
        ("cross-site", "navigate", "document", None, False),  # a link followed, PSC's redirect back
        ("same-site", "navigate", "document", None, False),  # the card host sending the browser back
        ("cross-site", "navigate", None, None, False),  # Chrome before 80: no Sec-Fetch-Dest yet
        ("cross-site", "navigate", "iframe", None, True),
        ("cross-site", "navigate", "frame", None, True),
        ("same-site", "navigate", "iframe", None, True),  # a sibling sub-domain is another site
        ("cross-site", "navigate", "object", None, True),
        ("cross-site", "navigate", "embed", None, True),
        ("cross-site", "no-cors", "image", None, True),
        ("cross-site", "cors", "empty", None, True),
        ("cross-site", None, None, None, True),  # browsers send the two together
        ("cross-site", "navigate", "document", "prefetch", True),  # speculation rules
        ("same-origin", "navigate", "document", "prefetch;prerender", True),
        ("same-origin", "navigate", "iframe", None, False),  # the portal's own page
        ("none", "navigate", "document", None, False),  # typed or bookmarked
        (None, None, None, None, False),  # no browser
    ],
)
def test_is_embedded_by_another_site(
    site: str | None, mode: str | None, dest: str | None, purpose: str | None, embedded: bool
) -> None:
    assert is_embedded_by_another_site(site, mode, dest, purpose) is embedded


POLICIES = TEST_POLICIES + (
    "  - name: partner-callback\n    match: { path: /echo/partner/** }\n    action: authenticate\n"
    "    origin_check: false\n"
)


@pytest.fixture
def app(tmp_path: Path, upstream_url: str, assertion_key: Path) -> Iterator[Flask]:
    allowed = {"public_origin": PORTAL, "allowed_origins": ["https://partenaire.example.fr/"]}
    with gateway_app(
        tmp_path,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        policies=POLICIES,
        extra={"server": allowed},
    ) as application:
        yield application


def test_a_cross_site_post_with_a_valid_session_is_refused_audited_and_not_forwarded(
    app: Flask, tmp_path: Path
) -> None:
    client = logged_in(app)
    headers = {"Origin": "https://evil.example", "Accept": "text/html"}
    refused = client.post("/echo/card/rib", data={"iban": "FR76"}, headers=headers)
    assert refused.status_code == 403
    assert refused.headers["X-Gateway-Reason"] == "cross_site_request"
    assert "autre site" in refused.get_data(as_text=True)
    assert "method" not in refused.get_data(as_text=True)  # a gateway page, not the portal's echo
    (event,) = [e for e in audit_records(tmp_path / "audit.log", "decision") if e["rule"] == "card-only"]
    assert event["reasons"] == ["cross_site_request"] and event["http_method"] == "POST"


def test_same_origin_posts_and_cross_site_reads_go_through(app: Flask) -> None:
    client = logged_in(app)
    for headers in ({"Origin": PORTAL}, {"Sec-Fetch-Site": "same-origin"}, {}):
        echoed = client.post("/echo/protected/form", data={"x": "1"}, headers=headers)
        assert echoed.status_code == 200 and echoed.json["method"] == "POST", headers
    read = client.get("/echo/protected/page", headers={"Origin": "https://evil.example"})
    assert read.status_code == 200
    allowed = client.post("/echo/protected/form", headers={"Origin": "https://partenaire.example.fr"})
    assert allowed.status_code == 200


def test_a_rule_may_turn_the_check_off(app: Flask) -> None:
    client = logged_in(app)
    response = client.post("/echo/partner/hook", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200 and response.json["method"] == "POST"


def test_origin_check_only_applies_to_authenticate_rules() -> None:
    policy = "rules:\n  - name: open\n    match: { path: /x }\n    action: public\n    origin_check: false\n"
    with pytest.raises(ConfigErrors, match="'origin_check' only applies to action 'authenticate'"):
        load_policies({"p.yaml": policy})
