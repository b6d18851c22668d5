"""Refusal pages as a browser gets them: the login methods the destination accepts, a way forward, when access
returns, wording from the catalogs in the browser's language (in-process gateway, real upstream process)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.app import create_app
from gateway.devtools.pki import DevPki
from gateway.i18n import wording
from gateway.identity import LoginMethod
from gateway.responses import MAX_NEXT_PATH, bounded_next_path, duration_in_words
from gateway.runtime import gateway_of
from gateway.settings import load_settings
from tests.support.card_stack import card_settings
from tests.support.config import write_config
from tests.support.pki import dev_pki  # noqa: F401 - fixture
from tests.support.sessions import COOKIE, login

CARD_ORIGIN = "https://card.example:8443"
CONTACT = "l'assistance au 01 23 45 67 89"
POLICIES = """\
rules:
  - name: home
    match: { path: /, methods: [GET] }
    action: public
  - name: records
    match: { path: /patients/*, methods: [GET] }
    action: authenticate
    health_data: true
    login: { professions: [10] }
    quota: { window: 1h, max_distinct: 2, resource: { path_segment: 2 } }
  - name: bank-details
    match: { path: /account/rib }
    action: authenticate
    login: { methods: [card], max_age: 10m }
  - name: app-only
    match: { path: /app-only/** }
    action: authenticate
    login: { methods: [ecps] }
  - name: account
    match: { path: /account/** }
    action: authenticate
  - name: admin
    match: { path: /admin/** }
    action: deny
"""


@pytest.fixture
def app(tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki) -> Iterator[Flask]:  # noqa: F811
    """Both login methods configured (nothing of PSC is asked to draw a page), the support contact set."""
    config = write_config(
        tmp_path,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        policies=POLICIES,
        extra={
            "server": {"support_contact": CONTACT},
            "card": card_settings(dev_pki, CARD_ORIGIN),
            "ecps": {
                "metadata_url": "http://127.0.0.1:9/.well-known/wallet-openid-configuration",
                "client_id": "portal",
                "client_secret": "not-used-here",
                "redirect_uri": "http://127.0.0.1:8080/.gateway/ecps/callback",
                "login_cookie_secret": "a-secret-of-at-least-32-characters-not-used-here",
            },
        },
    )
    application = create_app(load_settings(config))
    yield application
    gateway = gateway_of(application)
    gateway.upstream.close()
    assert gateway.crl_store is not None
    gateway.crl_store.stop()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


class Page(HTMLParser):
    """A page's visible text, its links by id, and its reference line apart."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.links: dict[str, str] = {}
        self._parts: list[str] = []
        self._reference: list[str] = []
        self._in_reference = 0
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if "id" in named and named.get("href"):
            self.links[str(named["id"])] = str(named["href"])
        if self._in_reference or "reference" in (named.get("class") or "").split():
            self._in_reference += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_reference = max(0, self._in_reference - 1)

    def handle_data(self, data: str) -> None:
        (self._reference if self._in_reference else self._parts).append(data)

    @property
    def text(self) -> str:
        """Everything but the reference line, on one line."""
        return re.sub(r"[ \t\n]+", " ", " ".join(self._parts)).strip()

    @property
    def reference(self) -> str:
        return re.sub(r"[ \t\n]+", " ", " ".join(self._reference)).strip()


def page(client: FlaskClient, path: str, language: str = "fr", status: int | None = None) -> Page:
    response = client.get(path, headers={"Accept": "text/html", "Accept-Language": language})
    if status is not None:
        assert response.status_code == status, (
            response.status_code,
            response.headers.get("X-Gateway-Reason"),
        )
    return Page(response.get_data(as_text=True))


# --------------------------------------------------------------------------- item 4: only what the rule accepts


def test_a_card_only_page_offers_only_the_card_and_says_so(client: FlaskClient) -> None:
    refused = page(client, "/account/rib", status=401)
    assert "login-card" in refused.links and "login-ecps" not in refused.links
    assert "Cette page exige une identification par carte CPS." in refused.text
    assert "données de santé" not in refused.text  # bank details are not health data


def test_an_app_only_page_offers_only_the_ecps(client: FlaskClient) -> None:
    refused = page(client, "/app-only/x", "en", status=401)
    assert "login-ecps" in refused.links and "login-card" not in refused.links
    assert "This page requires an e-CPS login (Pro Santé Connect)." in refused.text


def test_a_page_open_to_both_offers_both_without_naming_one(client: FlaskClient) -> None:
    refused = page(client, "/account/profile", status=401)
    assert {"login-card", "login-ecps"} <= set(refused.links)
    assert "exige" not in refused.text


def test_only_a_rule_marked_health_data_claims_it(client: FlaskClient) -> None:
    assert "Cette page contient des données de santé." in page(client, "/patients/1", status=401).text
    assert "health data" in page(client, "/patients/1", "en").text
    assert "santé." not in page(client, "/account/profile").text


def test_an_ecps_session_on_a_card_only_page_is_offered_the_card_alone(
    app: Flask, client: FlaskClient
) -> None:
    login(app, client, method=LoginMethod.ECPS, auth_mode="MOBILE")
    refused = page(client, "/account/rib", status=401)
    assert "login-ecps" not in refused.links  # it would log in the same way and come back here
    assert refused.links["login-card"] == "/.gateway/card/start?next=/account/rib"
    assert "Cette page exige une identification par carte CPS." in refused.text


def test_a_step_up_says_how_recent_the_login_must_be(app: Flask, client: FlaskClient) -> None:
    login(app, client, auth_time=time.time() - 3600)
    assert (
        "Elle exige une identification de moins de 10 minutes."
        in page(client, "/account/rib", status=401).text
    )
    assert "It requires a login less than 10 minutes old." in page(client, "/account/rib", "en").text


def test_the_login_page_of_forward_auth_offers_what_the_destination_accepts(client: FlaskClient) -> None:
    response = client.get("/.gateway/login?next=/account/rib", headers={"Accept": "text/html"})
    assert response.status_code == 200
    choices = Page(response.get_data(as_text=True))
    assert "login-card" in choices.links and "login-ecps" not in choices.links


def test_api_clients_are_offered_only_the_accepted_methods(client: FlaskClient) -> None:
    answer = client.get("/account/rib", headers={"Accept": "application/json"}).json
    assert answer is not None and set(answer["login"]) == {"card"}
    assert "carte CPS" in answer["message"]


# --------------------------------------------------------------------------- item 5: a way forward


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/nothing/here", 403),
        ("/admin/users", 403),
        ("/account/rib", 401),
        ("/patients/%2F", 400),
        ("/.gateway/nothing/here", 404),
    ],
)
def test_every_refusal_page_leads_home_and_names_whom_to_contact(
    client: FlaskClient, path: str, status: int
) -> None:
    refused = page(client, path, status=status)
    assert refused.links["home"] == "http://127.0.0.1:8080/"
    assert f"Assistance\u00a0: {CONTACT}" in refused.text
    assert "logout-link" not in refused.links  # no session: nothing to log out of


def test_a_logged_in_professional_is_offered_the_logout(app: Flask, client: FlaskClient) -> None:
    login(app, client, professions=("60",))
    refused = page(client, "/patients/180017512345678", status=403)
    assert refused.links["logout-link"] == "http://127.0.0.1:8080/.gateway/logout"
    assert refused.links["home"] == "http://127.0.0.1:8080/"


@pytest.mark.parametrize("path", ["/nothing/here", "/admin/x", "/account/rib", "/patients/1"])
@pytest.mark.parametrize("language", ["fr", "en"])
def test_internal_wording_stays_in_the_reference_line(client: FlaskClient, path: str, language: str) -> None:
    response = client.get(path, headers={"Accept": "text/html", "Accept-Language": language})
    refused = Page(response.get_data(as_text=True))
    reason = response.headers["X-Gateway-Reason"]
    assert reason in refused.reference
    assert reason not in refused.text
    assert not re.search(r"\b(rule|règle|policy|politique)", refused.text, re.IGNORECASE), refused.text


def test_the_quota_page_says_when_access_returns_and_whom_to_contact_without_login(
    app: Flask, client: FlaskClient
) -> None:
    login(app, client)
    for patient in ("1", "2"):
        client.get(f"/patients/{patient}")
    response = client.get("/patients/3", headers={"Accept": "text/html"})
    assert response.status_code == 429
    refused = Page(response.get_data(as_text=True))
    in_words = duration_in_words(wording("fr"), int(response.headers["Retry-After"]))
    assert f"Vous retrouverez l'accès dans {in_words}." in refused.text
    assert f"Assistance\u00a0: {CONTACT}" in refused.text
    assert not {"login-card", "login-ecps"} & set(refused.links)
    assert "logout-link" in refused.links and "home" in refused.links
    english = client.get("/patients/4", headers={"Accept": "text/html", "Accept-Language": "en"})
    in_words = duration_in_words(wording("en"), int(english.headers["Retry-After"]))
    assert f"Access returns in {in_words}." in Page(english.get_data(as_text=True)).text


@pytest.mark.parametrize(
    ("seconds", "french", "english"),
    [
        (0.2, "1 seconde", "1 second"),
        (45, "45 secondes", "45 seconds"),
        (60, "1 minute", "1 minute"),
        (61, "2 minutes", "2 minutes"),
        (3600, "1 heure", "1 hour"),
        (3660, "1 heure et 1 minute", "1 hour and 1 minute"),
        (7199, "2 heures", "2 hours"),
        (9000, "2 heures et 30 minutes", "2 hours and 30 minutes"),
    ],
)
def test_durations_in_words_round_up(seconds: float, french: str, english: str) -> None:
    assert duration_in_words(wording("fr"), seconds) == french
    assert duration_in_words(wording("en"), seconds) == english


def test_logout_confirms_it_happened(app: Flask, client: FlaskClient) -> None:
    login(app, client)
    form = client.get("/.gateway/logout").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token is not None
    done = client.post("/.gateway/logout", data={"csrf_token": token.group(1)})
    assert done.status_code == 303 and done.headers["Location"] == "/.gateway/logout/done"
    confirmation = page(client, done.headers["Location"], status=200)
    assert "Vous êtes déconnecté" in confirmation.text
    assert confirmation.links["home"] == "http://127.0.0.1:8080/"
    assert "Your session is closed." in page(client, "/.gateway/logout/done", "en").text


def test_the_logout_confirmation_never_claims_a_logout_that_did_not_happen(
    app: Flask, client: FlaskClient
) -> None:
    login(app, client)
    response = client.get("/.gateway/logout/done", headers={"Accept-Language": "en"})
    assert "You are logged out" not in response.get_data(as_text=True)
    assert 'id="logout"' in response.get_data(as_text=True)  # the question, with its form
    assert client.get_cookie(COOKIE) is not None


# --------------------------------------------------------------------------- item 6: typography


def test_english_pages_carry_no_french_typography(client: FlaskClient) -> None:
    refused = page(client, "/patients/180017512345678", "en")
    assert refused.reference.startswith("Reference:")
    assert not re.search(r"\s[:;?!]", refused.text + refused.reference), refused.text


def test_french_pages_keep_their_punctuation_on_the_line(client: FlaskClient) -> None:
    refused = page(client, "/patients/180017512345678", "fr")
    assert refused.reference.startswith("Référence\u00a0:")
    assert not re.search(r" [:;?!]", refused.text + refused.reference), refused.text


def test_a_destination_too_long_for_a_login_link_loses_its_query_then_its_path() -> None:
    assert bounded_next_path("/a?" + "q" * 100) == "/a?" + "q" * 100
    assert bounded_next_path("/a?" + "q" * MAX_NEXT_PATH) == "/a"
    assert bounded_next_path("/" + "p" * MAX_NEXT_PATH + "?q") == "/"
