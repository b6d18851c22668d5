"""The demo portal behind a real gateway process (the example policies, sessions in a real Redis): it shows who
is logged in and a logout link, verified with gateway.portal; straight to the portal, protected pages are 401."""

from __future__ import annotations

import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from gateway.identity import Identity, LoginMethod
from gateway.sessions import RedisSessionStore
from tests.support.portal_stack import portal_behind_gateway
from tests.support.processes import REPO_ROOT

COOKIE = "__Host-gateway-session"


class Links(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "a" and named.get("id"):
            self.by_id[str(named["id"])] = str(named.get("href"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, assertion_key: Path) -> Iterator[tuple[str, str, str]]:
    """(gateway URL, portal URL, redis URL): the demo portal behind a gateway with the example policies."""
    with portal_behind_gateway(
        tmp_path_factory.mktemp("demo-portal"),
        assertion_key,
        lambda gateway: f"gateway.devtools.demo_portal:create_portal('{gateway}')",
        extra={"policies": [str(REPO_ROOT / "policies")]},
    ) as stack:
        yield stack.gateway, stack.portal, stack.redis_url


def session(redis_url: str, method: LoginMethod = LoginMethod.CARD) -> dict[str, str]:
    identity = Identity(
        "810002813839", method, time.time(), surname="DUPONT", given_name="JEAN", professions=("10",)
    )
    return {COOKIE: RedisSessionStore(redis_url).create(identity, time.time()).id}


def test_the_demo_portal_shows_who_is_logged_in_and_how_to_log_out(demo: tuple[str, str, str]) -> None:
    gateway, _, redis_url = demo
    page = requests.get(f"{gateway}/patients/180017512345678", cookies=session(redis_url), timeout=5)
    assert page.status_code == 200, page.text[:300]
    assert "JEAN DUPONT (810002813839) · Médecin" in page.text and "carte CPS, connecté à" in page.text
    assert Links(page.text).by_id["logout"] == "/.gateway/logout"
    account = requests.get(f"{gateway}/account", cookies=session(redis_url, LoginMethod.ECPS), timeout=5)
    assert "Identifiant national : 810002813839" in account.text and "par e-CPS" in account.text


def test_public_pages_of_the_demo_portal_lead_to_the_professionals_space(demo: tuple[str, str, str]) -> None:
    gateway, _, _ = demo
    home = requests.get(f"{gateway}/", timeout=5)
    assert home.status_code == 200 and Links(home.text).by_id["my-space"] == "/account"
    assert requests.get(f"{gateway}/favicon.ico", timeout=5).status_code == 204
    assert requests.get(f"{gateway}/static/portal.css", timeout=5).status_code == 200


def test_the_demo_portal_refuses_what_did_not_come_through_the_gateway(demo: tuple[str, str, str]) -> None:
    _, portal, _ = demo
    forged = {"X-Gateway-Subject": "810002813839", "X-Gateway-Assertion": "forged"}
    assert requests.get(f"{portal}/patients/180017512345678", headers=forged, timeout=5).status_code == 401
    assert requests.get(f"{portal}/account/rib", timeout=5).status_code == 401
    assert requests.get(f"{portal}/", timeout=5).status_code == 200
