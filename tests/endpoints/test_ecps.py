"""e-CPS login end to end: a real gateway process, the PSC stand-in process and the test upstream process."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests

from gateway.identity import Identity, LoginMethod
from gateway.sessions import RedisSessionStore
from tests.support.ecps import (
    CLIENT_ID,
    DOCTOR,
    GENEROUS_LIMITS,
    IDENTITIES,
    LOGIN_COOKIE,
    PHARMACIST,
    PHYSIO,
    SESSION_COOKIE,
    Browser,
    EcpsWorld,
    gateway_registration,
    running_ecps_gateway,
    running_ecps_world,
)
from tests.support.metrics import login_attempts, scraped_value
from tests.support.processes import free_port
from tests.support.psc import PscServer, query_of, running_psc
from tests.support.redis import RedisServer, redis_server


@pytest.fixture(scope="module")
def world_once(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path
) -> Iterator[EcpsWorld]:
    with running_ecps_world(tmp_path_factory.mktemp("ecps"), upstream_url, assertion_key) as world:
        yield world


@pytest.fixture
def world(world_once: EcpsWorld) -> Iterator[EcpsWorld]:
    world_once.psc.reset()
    yield world_once
    world_once.psc.reset()


def start_login(world: EcpsWorld, browser: Browser, next_path: str) -> str:
    """The login page's e-CPS button; returns PSC's authorization URL."""
    answer = browser.get(world.gateway_url + "/.gateway/login/ecps", params={"next": next_path})
    assert answer.status_code == 302, answer.text[:300]
    assert answer.headers["Location"].startswith(world.psc.issuer)
    # It sets the login cookie: no cache may keep it (nor hand it to another user).
    assert "Set-Cookie" in answer.headers and answer.headers["Cache-Control"] == "no-store"
    return answer.headers["Location"]


def callback_after_approval(world: EcpsWorld, browser: Browser, next_path: str, idnat: str) -> str:
    return world.psc.approve(start_login(world, browser, next_path), idnat)


def log_in(world: EcpsWorld, browser: Browser, next_path: str, idnat: str = DOCTOR) -> requests.Response:
    """The whole login; returns the answer to the first request after it (the gateway's redirect followed)."""
    callback = callback_after_approval(world, browser, next_path, idnat)
    answer = browser.get(callback)
    assert answer.status_code == 303, (answer.status_code, answer.headers.get("X-Gateway-Reason"))
    assert "Set-Cookie" in answer.headers and answer.headers["Cache-Control"] == "no-store"
    return browser.follow(answer)


def assert_refused(answer: requests.Response, status: int, reason: str, text: str) -> None:
    assert answer.status_code == status
    assert answer.headers["X-Gateway-Reason"] == reason
    assert answer.headers["Cache-Control"] == "no-store"
    assert text in answer.text
    assert "eyJ" not in answer.text  # no token ever shown


def test_login_reaches_the_protected_page_with_the_identity(world: EcpsWorld) -> None:
    browser = Browser()
    successes = login_attempts(world.metrics_url, "ecps", "success")
    page = log_in(world, browser, "/echo/protected/dossier?x=1")
    assert page.status_code == 200
    assert login_attempts(world.metrics_url, "ecps", "success") == successes + 1
    echoed = page.json()
    assert echoed["path"] == "/echo/protected/dossier" and echoed["query"] == "x=1"
    assert echoed["headers"]["x-gateway-subject"] == DOCTOR
    assert echoed["headers"]["x-gateway-auth-method"] == "ecps"
    assert echoed["headers"]["x-gateway-professions"] == "10"
    # The portal never sees the gateway's cookies; the login cookie is gone once the session exists.
    assert "__Host-gateway" not in echoed["headers"].get("cookie", "")
    assert SESSION_COOKIE in browser.cookies and LOGIN_COOKIE not in browser.cookies
    login = world.last_audit("login")
    assert (login["decision"], login["method"], login["idnat"]) == ("allow", "ecps", DOCTOR)
    assert "eyJ" not in (world.directory / "audit.log").read_text()


def test_login_page_offers_the_ecps_button(world: EcpsWorld) -> None:
    page = Browser().get(world.gateway_url + "/echo/protected/x")
    assert page.status_code == 401
    assert 'id="login-ecps" href="/.gateway/login/ecps?next=/echo/protected/x"' in page.text


def test_open_redirects_are_refused(world: EcpsWorld) -> None:
    browser = Browser()
    callback = callback_after_approval(world, browser, "//evil.example/x", DOCTOR)
    answer = browser.get(callback)
    assert answer.status_code == 303 and answer.headers["Location"] == "/"


def test_user_refusing_on_the_phone(world: EcpsWorld) -> None:
    browser = Browser()
    cancelled = login_attempts(world.metrics_url, "ecps", "login_cancelled")
    callback = world.psc.refuse(start_login(world, browser, "/echo/protected/x?tab=2"))
    page = browser.get(callback)
    assert_refused(page, 401, "login_cancelled", "Identification annulée")
    # The next try goes where the cancelled one was going.
    assert 'id="login-ecps" href="/.gateway/login/ecps?next=/echo/protected/x%3Ftab%3D2"' in page.text
    assert world.last_audit("login")["reasons"] == ["login_cancelled"]
    assert login_attempts(world.metrics_url, "ecps", "login_cancelled") == cancelled + 1


def test_replayed_callback_is_refused(world: EcpsWorld) -> None:
    browser = Browser()
    callback = callback_after_approval(world, browser, "/echo/protected/x", DOCTOR)
    assert browser.get(callback).status_code == 303
    assert_refused(browser.get(callback), 400, "state_mismatch", "Identification expirée")
    audit = world.last_audit("login")
    assert (audit["decision"], audit["reasons"]) == ("deny", ["state_mismatch"])


def test_callback_in_another_browser_is_refused(world: EcpsWorld) -> None:
    callback = callback_after_approval(world, Browser(), "/echo/protected/x", DOCTOR)
    assert_refused(Browser("en").get(callback), 400, "state_mismatch", "Login expired")
    assert "code" not in world.last_audit("login")


@pytest.mark.parametrize("fault", ["wrong_issuer", "bad_signature", "expired_token", "wrong_nonce"])
def test_tokens_that_do_not_verify_are_refused(world: EcpsWorld, fault: str) -> None:
    world.psc.set_faults(**{fault: True})
    browser = Browser()
    callback = callback_after_approval(world, browser, "/echo/protected/x", DOCTOR)
    assert_refused(browser.get(callback), 401, "token_invalid", "Identification refusée")
    assert SESSION_COOKIE not in browser.cookies
    audit = world.last_audit("login")
    assert (audit["decision"], audit["reasons"]) == ("deny", ["token_invalid"])


def test_refusal_page_in_english(world: EcpsWorld) -> None:
    world.psc.set_faults(bad_signature=True)
    browser = Browser("en")
    callback = callback_after_approval(world, browser, "/echo/protected/x", DOCTOR)
    assert_refused(browser.get(callback), 401, "token_invalid", "Login refused")


def test_provider_down_during_the_token_exchange(world: EcpsWorld) -> None:
    browser = Browser()
    callback = callback_after_approval(world, browser, "/echo/protected/x", DOCTOR)
    world.psc.set_faults(unavailable=True)
    assert_refused(browser.get(callback), 503, "idp_unavailable", "Pro Santé Connect indisponible")
    assert world.last_audit("login")["reasons"] == ["idp_unavailable"]


def test_provider_refusing_the_request(world: EcpsWorld) -> None:
    browser = Browser()
    state = query_of(start_login(world, browser, "/echo/protected/x"))["state"]
    callback = f"{world.gateway_url}/.gateway/ecps/callback?state={state}&error=invalid_scope"
    assert_refused(browser.get(callback), 502, "idp_error", "Pro Santé Connect a refusé la demande")
    audit = world.last_audit("login")
    assert (audit["reasons"], audit["detail"]) == (["idp_error"], "provider error invalid_scope")


def test_profession_outside_the_rule(world: EcpsWorld) -> None:
    browser = Browser()
    assert log_in(world, browser, "/patients/180017512345678", PHARMACIST).status_code == 200
    other = Browser()
    assert_refused(
        log_in(world, other, "/patients/180017512345678", PHYSIO),
        403,
        "profession_not_allowed",
        "Accès réservé",
    )
    decision = world.last_audit("decision")
    assert (decision["idnat"], decision["reasons"]) == (PHYSIO, ["profession_not_allowed"])


def test_step_up_when_the_login_is_too_old(world: EcpsWorld) -> None:
    browser = Browser()
    assert log_in(world, browser, "/echo/stepup/transfer").status_code == 200
    time.sleep(2.2)  # the rule's max_age is 2 s
    page = browser.get(world.gateway_url + "/echo/stepup/transfer")
    assert_refused(page, 401, "login_too_old", "Identification trop ancienne")
    authorization = start_login(world, browser, "/echo/stepup/transfer")
    assert query_of(authorization)["max_age"] == "2"
    assert query_of(authorization)["prompt"] == "login"
    answer = browser.get(world.psc.approve(authorization, DOCTOR))
    assert browser.follow(answer).json()["headers"]["x-gateway-subject"] == DOCTOR


def test_backchannel_logout_ends_the_session(world: EcpsWorld) -> None:
    browser = Browser()
    assert log_in(world, browser, "/echo/protected/x").status_code == 200
    deliveries = world.psc.backchannel_logout(idnat=DOCTOR)
    assert [d["status"] for d in deliveries] == [200]
    assert_refused(
        browser.get(world.gateway_url + "/echo/protected/x"), 401, "unauthenticated", "Identification"
    )
    audit = world.last_audit("logout")
    # Every gateway session of that professional ends (earlier tests of this module left some too).
    assert (audit["idnat"], audit["decision"]) == (DOCTOR, "allow") and audit["sessions_ended"] >= 1


def test_forged_backchannel_logout_is_refused(world: EcpsWorld) -> None:
    url = world.gateway_url + "/.gateway/ecps/backchannel-logout"
    answer = requests.post(url, data={"logout_token": "eyJhbGciOiJub25lIn0.e30."}, timeout=5)
    assert answer.status_code == 400 and answer.headers["Cache-Control"] == "no-store"
    assert world.last_audit("logout")["reasons"] == ["token_invalid"]


def test_logout_needs_the_csrf_token(world: EcpsWorld) -> None:
    browser = Browser()
    assert log_in(world, browser, "/echo/protected/x").status_code == 200
    logout_url = world.gateway_url + "/.gateway/logout"
    confirmation = browser.get(logout_url)
    assert confirmation.status_code == 200 and "Se déconnecter" in confirmation.text
    token = confirmation.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    # The form's redirects end at PSC's logout endpoint: CSP form-action must allow that origin.
    policy = confirmation.headers["Content-Security-Policy"]
    assert f"form-action 'self' https: {world.psc.base_url};" in policy

    assert_refused(
        browser.post(logout_url, data={"csrf_token": "forged"}), 403, "csrf_failed", "Formulaire expiré"
    )
    assert_refused(browser.post(logout_url), 403, "csrf_failed", "Formulaire expiré")
    assert browser.get(world.gateway_url + "/echo/protected/x").status_code == 200

    answer = browser.post(logout_url, data={"csrf_token": token})
    assert answer.status_code == 303
    # An e-CPS session also ends the PSC session: RP-initiated logout with the id_token as hint.
    end_session = answer.headers["Location"]
    assert end_session.startswith(world.psc.issuer + "/protocol/openid-connect/logout")
    assert query_of(end_session)["post_logout_redirect_uri"] == world.gateway_url + "/"
    assert SESSION_COOKIE not in browser.cookies
    back = requests.get(end_session, allow_redirects=False, timeout=5)
    assert urljoin(end_session, back.headers["Location"]).startswith(world.gateway_url + "/?state=")
    assert browser.get(world.gateway_url + "/echo/protected/x").status_code == 401
    audit = world.last_audit("logout")
    assert (audit["idnat"], audit["decision"], audit["reasons"]) == (DOCTOR, "allow", ["logout"])


def test_answers_to_this_browsers_login_that_do_not_verify_ban_the_client_forged_states_never(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    limits = {"ban_after": 3, "ban_window": "10m", "ban_duration": "15m"}
    with running_ecps_world(tmp_path, upstream_url, assertion_key, limits=limits) as strict:
        browser = Browser()
        # A browser with a login in progress sent back with forged states (another site can do that):
        # refused, its pending login ended, nothing counted.
        forged = f"{strict.gateway_url}/.gateway/ecps/callback?code=stolen&state=guessed"
        for _ in range(4):
            browser.get(strict.gateway_url + "/.gateway/login/ecps", params={"next": "/"})
            assert browser.get(forged).headers["X-Gateway-Reason"] == "state_mismatch"
            assert LOGIN_COOKIE not in browser.cookies
        assert not [e for e in strict.audit_events() if e["event"] == "ban"]
        # Answers to ITS login (the state matched) whose tokens do not verify: counted, then banned.
        strict.psc.set_faults(bad_signature=True)
        for _ in range(3):
            callback = callback_after_approval(strict, browser, "/", DOCTOR)
            assert browser.get(callback).headers["X-Gateway-Reason"] == "token_invalid"
        banned = browser.get(strict.gateway_url + "/.gateway/login/ecps", params={"next": "/"})
        assert_refused(banned, 429, "banned", "Identification temporairement bloquée")
        assert 890 <= int(banned.headers["Retry-After"]) <= 901  # ceil of the ban end
        ban = strict.last_audit("ban")
        assert ban["banned_ip"] == "127.0.0.1" and ban["failures"] == 3


def test_an_id_token_without_auth_time_logs_in_and_counts_as_too_old_for_a_step_up_rule(
    world: EcpsWorld,
) -> None:
    world.psc.set_faults(omit_auth_time=True)  # allowed when no max_age was asked (OIDC Core 2)
    browser = Browser()
    page = log_in(world, browser, "/echo/protected/x")
    assert page.status_code == 200
    assert page.json()["headers"]["x-gateway-auth-time"] == "0"  # unknown, not "now"
    # A rule that needs the login's age asks PSC for a fresh one, with max_age: auth_time is required then.
    assert_refused(browser.get(world.gateway_url + "/echo/stepup/x"), 401, "login_too_old", "Identification")
    assert_refused(
        browser.get(world.psc.approve(start_login(world, browser, "/echo/stepup/x"), DOCTOR)),
        401,
        "token_invalid",
        "Identification refusée",
    )
    world.psc.set_faults(omit_auth_time=False)
    answer = browser.get(world.psc.approve(start_login(world, browser, "/echo/stepup/x"), DOCTOR))
    assert browser.follow(answer).json()["headers"]["x-gateway-subject"] == DOCTOR


def test_the_backchannel_logout_endpoint_has_a_rate_limit_of_its_own(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    limits = {**GENEROUS_LIMITS, "backchannel_logout_requests_per_ip": "3/minute"}
    with running_ecps_world(tmp_path, upstream_url, assertion_key, limits=limits) as strict:
        url = strict.gateway_url + "/.gateway/ecps/backchannel-logout"
        forged = {"logout_token": "eyJhbGciOiJub25lIn0.e30."}
        statuses = [requests.post(url, data=forged, timeout=5).status_code for _ in range(4)]
        assert statuses == [400, 400, 400, 429]
        # Browsers' login requests are counted apart: logging in still works.
        assert log_in(strict, Browser(), "/echo/protected/x").status_code == 200


def test_a_provider_down_at_start_up_leaves_the_instance_ready_and_is_retried(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    psc_port, gateway_port = free_port(), free_port()
    not_yet = PscServer(port=psc_port, log=tmp_path / "psc.log")
    with running_ecps_gateway(
        tmp_path / "gateway",
        not_yet,
        port=gateway_port,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
    ) as world:
        ready = requests.get(world.gateway_url + "/.gateway/readyz", timeout=5)
        assert ready.status_code == 200, ready.text  # card login and public pages work: stay in the pool
        report = ready.json()["checks"]["ecps"]
        assert report["ok"] is False and report["required"] is False
        assert "Pro Santé Connect" in report["detail"]
        assert scraped_value(world.metrics_url, "gateway_identity_provider_up", provider="psc") == 0
        assert_refused(
            Browser().get(world.gateway_url + "/.gateway/login/ecps"),
            503,
            "idp_unavailable",
            "Pro Santé Connect indisponible",
        )

        client = gateway_registration(world.gateway_url)
        with running_psc(tmp_path, [client], identities=IDENTITIES, port=psc_port) as psc:
            deadline = time.monotonic() + 40  # the background retries back off up to 30 s
            while not requests.get(world.gateway_url + "/.gateway/readyz", timeout=5).json()["checks"][
                "ecps"
            ]["ok"]:
                assert time.monotonic() < deadline, "discovery was not retried"
                time.sleep(0.2)
            assert scraped_value(world.metrics_url, "gateway_identity_provider_up", provider="psc") == 1
            started = replace(world, psc=psc)
            assert log_in(started, Browser(), "/echo/protected/x").status_code == 200


@dataclass(frozen=True)
class SharedWorlds:
    """Two gateway instances behind one public origin (the first's), one Redis, one PSC stand-in."""

    first: EcpsWorld
    second: EcpsWorld
    redis: RedisServer


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path
) -> Iterator[SharedWorlds]:
    directory = tmp_path_factory.mktemp("ecps-shared")
    ports = free_port(), free_port()
    origin = f"http://127.0.0.1:{ports[0]}"
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        psc = stack.enter_context(
            running_psc(directory, [gateway_registration(origin)], identities=IDENTITIES)
        )
        extra = {"sessions": {"store": redis.url, "local_cache_seconds": 0}}
        first, second = (
            stack.enter_context(
                running_ecps_gateway(
                    directory / f"gw{index}",
                    psc,
                    port=port,
                    upstream_url=upstream_url,
                    assertion_key=assertion_key,
                    extra=extra,
                    public_url=origin,
                )
            )
            for index, port in enumerate(ports)
        )
        yield SharedWorlds(first, second, redis)


def card_session(redis: RedisServer, idnat: str) -> str:
    """A card login's session of the same professional, as the card endpoints store it."""
    identity = Identity(idnat, LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")
    return RedisSessionStore(redis.url).create(identity, time.time(), tags=["card:" + "ab" * 32]).id


def can_read(world: EcpsWorld, session_id: str) -> bool:
    answer = requests.get(
        world.gateway_url + "/echo/protected/x",
        headers={"Cookie": f"{SESSION_COOKIE}={session_id}"},
        timeout=5,
    )
    return answer.status_code == 200


def psc_session_of_last_login(world: EcpsWorld) -> str:
    return str(world.psc.sessions(DOCTOR)[-1]["sid"])


def test_backchannel_logout_by_sid_ends_only_the_sessions_of_that_psc_session(shared: SharedWorlds) -> None:
    first, second = Browser(), Browser()
    assert log_in(shared.first, first, "/echo/protected/x").status_code == 200
    first_sid = psc_session_of_last_login(shared.first)
    assert log_in(shared.first, second, "/echo/protected/x").status_code == 200
    card = card_session(shared.redis, DOCTOR)

    deliveries = shared.first.psc.backchannel_logout(sid=first_sid)

    assert [d["status"] for d in deliveries] == [200]
    assert not can_read(shared.second, first.cookies[SESSION_COOKIE])  # every instance: the store is shared
    assert can_read(shared.second, second.cookies[SESSION_COOKIE]), "another PSC session of the same person"
    assert can_read(shared.second, card), "a card session is not PSC's to end"
    audit = shared.first.last_audit("logout")
    assert (audit["idnat"], audit["scope"], audit["sessions_ended"]) == (DOCTOR, "sid", 1)


def test_backchannel_logout_without_sid_ends_every_ecps_session_of_the_sub_but_no_card_session(
    shared: SharedWorlds,
) -> None:
    browsers = [Browser(), Browser()]
    for browser in browsers:
        assert log_in(shared.first, browser, "/echo/protected/x").status_code == 200
    card = card_session(shared.redis, DOCTOR)

    deliveries = shared.first.psc.backchannel_logout(
        sid=psc_session_of_last_login(shared.first), omit_sid=True
    )

    assert [d["status"] for d in deliveries] == [200]
    assert not any(can_read(shared.second, b.cookies[SESSION_COOKIE]) for b in browsers)
    assert can_read(shared.second, card)
    assert shared.first.last_audit("logout")["scope"] == "sub"


def test_a_logout_token_replayed_to_another_instance_is_refused(shared: SharedWorlds) -> None:
    assert log_in(shared.first, Browser(), "/echo/protected/x").status_code == 200
    token = shared.first.psc.logout_token(psc_session_of_last_login(shared.first), CLIENT_ID)
    path = "/.gateway/ecps/backchannel-logout"
    assert (
        requests.post(shared.first.gateway_url + path, data={"logout_token": token}, timeout=5).status_code
        == 200
    )
    replay = requests.post(shared.second.gateway_url + path, data={"logout_token": token}, timeout=5)
    assert replay.status_code == 400
    assert shared.second.last_audit("logout")["detail"] == "logout token replayed"


def test_a_callback_replayed_to_another_instance_is_refused(shared: SharedWorlds) -> None:
    browser = Browser()
    callback = callback_after_approval(shared.first, browser, "/echo/protected/x", DOCTOR)
    copied_login_cookie = dict(browser.cookies)  # e.g. from a proxy log or the browser's disk
    assert browser.get(callback).status_code == 303
    replayer = Browser()
    replayer.cookies.update(copied_login_cookie)
    other_instance = callback.replace(shared.first.gateway_url, shared.second.gateway_url)
    assert_refused(replayer.get(other_instance), 400, "state_mismatch", "Identification expirée")
    assert shared.second.last_audit("login")["detail"] == "state already used"


def test_a_cross_site_page_cannot_spend_the_login_budget_nor_ban_the_address(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    """Five <img> of a page on another site, from a hospital NAT: callbacks without the login cookie and
    login starts fetched as images are refused and never counted (as failures nor as attempts)."""
    limits = {"ban_after": 3, "login_attempts_per_ip": "4/minute", "login_requests_per_ip": "6/minute"}
    with running_ecps_world(tmp_path, upstream_url, assertion_key, limits=limits) as strict:
        image = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
        for _ in range(8):
            callback = requests.get(
                f"{strict.gateway_url}/.gateway/ecps/callback?state=x", headers=image, timeout=5
            )
            assert callback.headers["X-Gateway-Reason"] == "cross_site_request"
            no_cookie = requests.get(f"{strict.gateway_url}/.gateway/ecps/callback?state=x", timeout=5)
            assert (no_cookie.status_code, no_cookie.headers["X-Gateway-Reason"]) == (400, "state_mismatch")
            start = requests.get(f"{strict.gateway_url}/.gateway/login/ecps", headers=image, timeout=5)
            assert start.headers["X-Gateway-Reason"] == "cross_site_request"
        assert not [e for e in strict.audit_events() if e["event"] in ("ban", "rate_limited")]
        # The professional behind the same address still logs in.
        browser = Browser()
        started = browser.get(strict.gateway_url + "/.gateway/login/ecps", params={"next": "/"})
        assert started.status_code == 302 and "/protocol/openid-connect/auth?" in started.headers["Location"]
