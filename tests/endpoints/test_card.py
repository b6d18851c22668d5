"""Card login end to end with real components: curl presents a SoftHSM card through the libp11 engine to nginx
(the shipped card-login template), nginx forwards it to the gateway PROCESS, which hands the session over to
the main host; the real upstream echoes the identity headers it receives."""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from gateway import pkcs11 as tokens
from gateway.authn.card.certificate import format_serial
from gateway.authn.card.challenge import challenge_message
from gateway.authn.card.handoff import new_binding, reference_of
from gateway.devtools.cards import Card, softhsm_env
from gateway.devtools.pki import DevPki
from tests.support.card_stack import (
    CARD_HOST_SECRET,
    NGINX_SOURCE_ADDRESS,
    CardStack,
    bound_card_login_url,
    card_stack,
    curl,
    curl_with_card,
    curl_with_token,
)
from tests.support.config import TEST_POLICIES
from tests.support.metrics import login_attempts
from tests.support.openssl_pki import OpensslPki, ToolToken, printed_serial, softhsm_config, tool_token
from tests.support.processes import PYTHON, REPO_ROOT
from tests.support.raw_http import raw_request
from tests.support.softhsm import PIN, CardSet

CARD_ROUTE = "/echo/card/records"


def _card_host_login(stack: CardStack, label: str, work: Path) -> tuple[int, str, dict[str, str]]:
    """(status, Location, headers) of the card host's answer to the dev card ``label``, as a browser gets
    there: bound on the main host first (/.gateway/card/start sets the binding cookie in ``work``'s jar)."""
    url = bound_card_login_url(stack.gateway_url, CARD_ROUTE, work / "jar.txt")
    assert url.startswith(f"{stack.card_origin}/.gateway/login/card?"), url
    return _head(curl_with_card(stack.pki, label, url, ["-o", "/dev/null", "-D", "-"], work))


def _tool_card_host_login(
    stack: CardStack,
    token: ToolToken,
    certificate: Path,
    work: Path,
    next_path: str = CARD_ROUTE,
    jar: Path | None = None,
) -> tuple[int, str, dict[str, str]]:
    """The same with a pkcs11-tool token (key CKA_ID 01) and its certificate; the binding cookie in ``jar``."""
    url = bound_card_login_url(stack.gateway_url, next_path, jar or work / "jar.txt")
    cacert = stack.pki.base_dir / "server-ca.pem"
    client = (token.key_uri("01"), certificate)
    return _head(curl_with_token(token.env, cacert, client, url, ["-o", "/dev/null", "-D", "-"], work))


def _head(result: subprocess.CompletedProcess[str]) -> tuple[int, str, dict[str, str]]:
    assert result.returncode == 0, result.stderr
    status_line, *header_lines = result.stdout.strip().splitlines()
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers.get("location", ""), headers


def _follow_with_cookie_jar(location: str, jar: Path) -> subprocess.CompletedProcess[str]:
    # curl, like a browser: spend the hand-off on the main host, keep the __Host- cookie, follow to the page.
    return curl("-L", "-c", str(jar), "-b", str(jar), "-D", "-", location)


def _events(stack: CardStack, event: str) -> list[dict[str, object]]:
    return [record for record in stack.audit() if record["event"] == event]


def test_card_login_on_the_card_host_opens_a_session_on_the_main_host(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    successes = login_attempts(stack.metrics_url, "card", "success")
    status, location, _ = _card_host_login(stack, "test-doctor", tmp_path)
    assert status == 303
    assert login_attempts(stack.metrics_url, "card", "success") == successes + 1
    assert location.startswith(f"{stack.gateway_url}/.gateway/card/complete?handoff=")
    assert location.endswith(f"&next={CARD_ROUTE}")

    followed = _follow_with_cookie_jar(location, tmp_path / "jar.txt")
    assert followed.returncode == 0, followed.stderr
    body = json.loads(followed.stdout.rsplit("\n\n", 1)[1])
    assert body["path"] == CARD_ROUTE
    assert body["headers"]["x-gateway-subject"] == softhsm_cards["doctor"].idnat
    assert body["headers"]["x-gateway-auth-method"] == "card"
    assert "__Host-gateway-session" in (tmp_path / "jar.txt").read_text()

    # The hand-off is single-use: the same URL a second time logs nobody in, even in the same browser.
    again = curl("-b", str(tmp_path / "jar.txt"), "-o", "/dev/null", "-D", "-", location)
    assert "HTTP/1.1 400" in again.stdout and "x-gateway-reason: state_mismatch" in again.stdout.lower()
    assert "set-cookie" not in again.stdout.lower()

    logins = [e for e in _events(stack, "login") if e["idnat"] == softhsm_cards["doctor"].idnat]
    assert logins and logins[-1]["decision"] == "allow"
    assert logins[-1]["card_type"] == "professional" and logins[-1]["channel"] == "tls"


@pytest.mark.parametrize(
    ("card", "reason", "status"),
    [
        ("revoked", "card_revoked", 403),
        ("expired", "card_expired", 403),
        ("wrong-ca", "card_untrusted", 403),
        ("not-yet-valid", "card_not_yet_valid", 403),
    ],
)
def test_refused_cards_get_the_precise_reason_and_an_audit_record(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path, card: str, reason: str, status: int
) -> None:
    refusals = login_attempts(stack.metrics_url, "card", reason)
    got_status, location, headers = _card_host_login(stack, f"test-{card}", tmp_path)
    assert (got_status, headers.get("x-gateway-reason")) == (status, reason)
    assert login_attempts(stack.metrics_url, "card", reason) == refusals + 1
    assert location == "" and "set-cookie" not in headers
    serial = format_serial(softhsm_cards[card].certificate.serial_number)
    denied = [e for e in _events(stack, "login") if e.get("card_serial") == serial]
    assert denied and denied[-1]["decision"] == "deny" and denied[-1]["reasons"] == [reason]
    assert "IGC-SANTE" in str(denied[-1]["card_issuer"])


def test_a_staff_card_logs_in_but_a_route_without_allow_staff_cards_refuses_it(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    status, location, _ = _card_host_login(stack, "test-staff", tmp_path)
    assert status == 303
    followed = _follow_with_cookie_jar(location, tmp_path / "jar.txt")
    assert "x-gateway-reason: staff_card_not_allowed" in followed.stdout.lower()
    assert "HTTP/1.1 403" in followed.stdout
    staff = [e for e in _events(stack, "login") if e["idnat"] == softhsm_cards["staff"].idnat]
    assert staff[-1]["card_type"] == "staff_or_organisation"


def test_a_forged_certificate_header_sent_straight_to_the_gateway_is_ignored_and_audited(
    stack: CardStack, softhsm_cards: CardSet
) -> None:
    forged = quote(softhsm_cards["doctor"].pem_path.read_text(), safe="")
    response = requests.get(
        f"{stack.gateway_url}/.gateway/login/card?binding={'b' * 43}",
        headers={"X-SSL-Client-Cert": forged, "X-SSL-Client-Verify": "SUCCESS", "Accept": "text/html"},
        allow_redirects=False,
        timeout=5,
    )
    assert response.status_code == 401
    assert response.headers["X-Gateway-Reason"] == "card_missing"
    assert "Set-Cookie" not in response.headers
    assert _events(stack, "spoofed_header")
    # Through the proxy too: the portal never sees the forged header.
    echoed = requests.get(
        f"{stack.gateway_url}/echo/public/x", headers={"X-SSL-Client-Cert": forged}, timeout=5
    ).json()
    assert "x-ssl-client-cert" not in echoed["headers"]


@pytest.mark.parametrize(
    "secret",
    # The card host's name and address (anyone able to reach the gateway from there), with no secret or another.
    [None, "guessed-" + "0" * 56, CARD_HOST_SECRET[:-1]],
)
def test_a_certificate_header_from_the_card_hosts_address_without_its_secret_is_ignored_and_audited(
    stack: CardStack, softhsm_cards: CardSet, secret: str | None
) -> None:
    headers = [
        ("Host", stack.card_origin.split("://", 1)[1]),
        ("X-SSL-Client-Cert", quote(softhsm_cards["doctor"].pem_path.read_text(), safe="")),
        ("Accept", "text/html"),
        *([("X-Card-Host-Secret", secret)] if secret else []),
    ]
    before = len(stack.audit())
    port = int(stack.gateway_url.rsplit(":", 1)[1])
    login = f"/.gateway/login/card?binding={reference_of(new_binding())}"
    response = raw_request(port, login, headers, source=NGINX_SOURCE_ADDRESS)
    assert (response.status, response.header("X-Gateway-Reason")) == (401, "card_missing")
    assert response.header("Set-Cookie") is None
    spoofed = [e for e in stack.audit()[before:] if e["event"] == "spoofed_header"]
    assert spoofed and "X-Ssl-Client-Cert" in spoofed[0]["headers"]


def test_challenge_login_with_the_cli_then_curl_with_the_cookie_jar(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    jar = tmp_path / "cookies.txt"
    login = _cli_card_login(stack, "test-pharmacist-ec", PIN, softhsm_env(stack.pki.base_dir), jar)
    assert login.returncode == 0, login.stderr
    idnat = softhsm_cards["pharmacist-ec"].idnat
    assert idnat in login.stdout
    page = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-b", str(jar), f"{stack.gateway_url}{CARD_ROUTE}"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=20,
        check=False,
    )
    assert json.loads(page.stdout)["headers"]["x-gateway-subject"] == idnat


def test_pin_dash_asks_on_the_terminal_without_echo(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    argv = [
        *(PYTHON, "-m", "gateway.cli", "card", "login", "--url", stack.gateway_url),
        *("--token-label", "test-pharmacist-ec", "--pin", "-", "--cookie-jar", str(tmp_path / "jar.txt")),
    ]
    pid, terminal = pty.fork()  # the child gets the pseudo-terminal as its controlling terminal
    if pid == 0:  # the child: become the CLI, never return into pytest
        try:
            os.chdir(REPO_ROOT)
            os.execve(PYTHON, argv, softhsm_env(stack.pki.base_dir))  # noqa: S606 - an argv, no shell
        finally:
            os._exit(127)
    try:
        shown = _read_terminal(terminal, until=b"PIN of the card test-pharmacist-ec: ")
        os.write(terminal, PIN.encode() + b"\n")
        shown += _read_terminal(terminal)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    text = shown.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    typed_line = text.split("PIN of the card test-pharmacist-ec: ", 1)[1].split("\n", 1)[0]
    assert typed_line.strip() == "", f"the PIN was echoed: {typed_line!r}"
    assert softhsm_cards["pharmacist-ec"].idnat in text


def _read_terminal(terminal: int, until: bytes | None = None, timeout: float = 30.0) -> bytes:
    """What the child writes to its terminal, up to ``until`` (or to its exit)."""
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (until is None or until not in shown):
        ready, _, _ = select.select([terminal], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # EIO: the child closed the terminal (it exited)
            break
        if not chunk:
            break
        shown += chunk
    assert until is None or until in shown, shown
    return shown


def signed_challenge(stack: CardStack, card: Card) -> dict[str, str]:
    """The body of /card/verify: a fresh challenge signed with the key on the SoftHSM card."""
    challenge = requests.post(f"{stack.gateway_url}/.gateway/card/challenge", json={}, timeout=5).json()
    assert challenge["audience"] == stack.gateway_url
    signature = tokens.sign(
        card.label, challenge_message(challenge["audience"], challenge["nonce"]), card.key_id
    )
    return {
        "nonce": challenge["nonce"],
        "certificate": card.pem_path.read_text(),
        "signature": base64.b64encode(signature).decode(),
    }


def test_a_replayed_challenge_is_refused(stack: CardStack, softhsm_cards: CardSet) -> None:
    card = softhsm_cards["doctor"]
    body = signed_challenge(stack, card)
    first = requests.post(f"{stack.gateway_url}/.gateway/card/verify", json=body, timeout=5)
    assert first.status_code == 200 and first.json() == {"subject": card.idnat}
    replay = requests.post(f"{stack.gateway_url}/.gateway/card/verify", json=body, timeout=5)
    assert replay.status_code == 401
    assert replay.json()["error"] == "challenge_invalid"
    assert "Set-Cookie" not in replay.headers


def test_a_revoked_card_is_refused_by_challenge_too(stack: CardStack, softhsm_cards: CardSet) -> None:
    body = signed_challenge(stack, softhsm_cards["revoked"])
    refused = requests.post(f"{stack.gateway_url}/.gateway/card/verify", json=body, timeout=5)
    assert (refused.status_code, refused.json()["error"]) == (403, "card_revoked")


# ------------------------------------------- cards the project did not make: openssl PKI, pkcs11-tool tokens

STAFF_POLICIES = (
    TEST_POLICIES
    + """\
  - name: staff-allowed
    match: { path: /echo/staff/** }
    action: authenticate
    login: { methods: [card], allow_staff_cards: true }
"""
)


@pytest.fixture(scope="module")
def tool_stack(
    tool_pki: OpensslPki,
    dev_pki: DevPki,
    upstream_url: str,
    assertion_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CardStack]:
    """The card stack trusting the openssl-made hierarchy (nginx keeps the dev server certificate)."""
    work = tmp_path_factory.mktemp("tool-card-stack")
    with card_stack(
        work, dev_pki, upstream_url, assertion_key, cards=tool_pki.card_settings, policies=STAFF_POLICIES
    ) as running:
        yield running


def _assertion_claims(page: dict[str, Any]) -> dict[str, Any]:
    payload = page["headers"]["x-gateway-assertion"].split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.mark.parametrize(
    ("kind", "serial", "card_kind", "structure"),
    [
        ("cpe", "0x0E01", "CPE", ("3760021832", "PHARMACIE DES LILAS", "000000018")),
        ("cpa", "0x0E02", "CPA", ("500000000029751", "CENTRE DE SANTE DES LILAS", "CPAT0001")),
    ],
)
def test_staff_and_organisation_cards_log_in_where_a_rule_allows_them(
    tool_stack: CardStack,
    tool_pki: OpensslPki,
    tmp_path: Path,
    kind: str,
    serial: str,
    card_kind: str,
    structure: tuple[str, str, str],
) -> None:
    # A token filled by pkcs11-tool, a certificate in the card's real layout made by openssl (a CPE's title is
    # "Carte de service santé ou social"), presented by curl through the shipped card-host template.
    env = softhsm_config(tmp_path / "softhsm")
    token = tool_token(env, f"tool-{kind}")
    certificate = tool_pki.token_card(token, kind, serial)
    status, location, _ = _tool_card_host_login(tool_stack, token, certificate, tmp_path, "/echo/staff/page")
    assert status == 303
    followed = _follow_with_cookie_jar(location, tmp_path / "jar.txt")
    page = json.loads(followed.stdout.rsplit("\n\n", 1)[1])
    claims = _assertion_claims(page)
    assert page["path"] == "/echo/staff/page" and page["headers"]["x-gateway-professions"] == ""
    assert claims["card_kind"] == card_kind and claims["professions"] == []
    assert (claims["structure_id"], claims["structure_name"], claims["employee_id"]) == structure

    refused = curl(
        "-b", str(tmp_path / "jar.txt"), "-D", "-", "-o", "/dev/null", f"{tool_stack.gateway_url}{CARD_ROUTE}"
    ).stdout.lower()
    assert "x-gateway-reason: staff_card_not_allowed" in refused

    (login_record,) = [
        e for e in _events(tool_stack, "login") if e.get("card_serial") == printed_serial(certificate)
    ]
    assert (login_record["decision"], login_record["card_kind"]) == ("allow", card_kind)
    assert (login_record["structure_id"], login_record["employee_id"]) == (structure[0], structure[2])
    assert login_record["card_type"] == "staff_or_organisation"


@pytest.fixture(scope="module")
def two_key_token(
    tool_pki: OpensslPki, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ToolToken, dict[str, Path]]:
    """A CPS3-like token filled by pkcs11-tool: a signature key pair (CKA_ID 02, nonRepudiation) and an
    authentication one (CKA_ID 01), the signature certificate LISTED FIRST (the listing order follows the
    token's object files, not the write order: one certificate then the other is rewritten until the
    authentication one comes second, the case a first-listed pick gets wrong; rewriting the same one can land
    it in the same place every time)."""
    env = softhsm_config(tmp_path_factory.mktemp("two-key-softhsm"))
    token = tool_token(env, "tool-cps3")
    certificates = {
        "02": tool_pki.token_card(token, "cps", "0x0F02", key_id="02", profile="card_signature"),
        "01": tool_pki.token_card(token, "cps", "0x0F01", key_id="01"),
    }
    labels = {"01": "card_authentication certificate", "02": "card_signature certificate"}
    for attempt in range(40):
        if token.certificate_ids() == ["02", "01"]:
            break
        key_id = ("01", "02")[attempt % 2]
        token.delete_certificate(key_id)
        token.write_certificate(certificates[key_id], key_id, labels[key_id])
    assert token.certificate_ids() == ["02", "01"]
    return token, certificates


def _cli_card_login(
    stack: CardStack, label: str, pin: str, env: Mapping[str, str], jar: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``gateway card login`` as a process, with the SoftHSM of ``env``."""
    return subprocess.run(
        [
            *(PYTHON, "-m", "gateway.cli", "card", "login", "--url", stack.gateway_url),
            *("--token-label", label, "--pin", pin, "--cookie-jar", str(jar), *extra),
        ],
        env=dict(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )


def test_a_two_key_card_logs_in_with_its_authentication_key(
    tool_stack: CardStack, two_key_token: tuple[ToolToken, dict[str, Path]], tmp_path: Path
) -> None:
    token, certificates = two_key_token
    login = _cli_card_login(tool_stack, token.label, token.pin, token.env, tmp_path / "jar.txt")
    assert login.returncode == 0, login.stderr
    assert "810002813839" in login.stdout
    allowed = [
        e for e in _events(tool_stack, "login") if e.get("card_serial") == printed_serial(certificates["01"])
    ]
    assert allowed and allowed[-1]["decision"] == "allow"


def test_cert_id_chooses_the_certificate_and_says_what_is_there(
    tool_stack: CardStack, two_key_token: tuple[ToolToken, dict[str, Path]], tmp_path: Path
) -> None:
    token, _ = two_key_token

    def login(cert_id: str) -> subprocess.CompletedProcess[str]:
        jar = tmp_path / f"{cert_id}.txt"
        return _cli_card_login(tool_stack, token.label, token.pin, token.env, jar, "--cert-id", cert_id)

    assert login("01").returncode == 0
    # The signature certificate, chosen explicitly, is signed with ITS key (CKA_ID 02) and refused for its usage.
    signature = login("02")
    assert signature.returncode == 1 and "card_bad_key_usage" in signature.stderr
    missing = login("07")
    assert missing.returncode == 1
    assert "no certificate with CKA_ID 07" in missing.stderr and "CKA_ID 01" in missing.stderr
    assert "Traceback" not in missing.stderr + signature.stderr


def test_a_handoff_url_that_leaks_to_another_browser_logs_nobody_in(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    # The demo's browser card login failed when the card host and the main host saw different client
    # addresses; the hand-off is now bound to the browser (a cookie), not to an address.
    status, location, _ = _card_host_login(stack, "test-doctor", tmp_path)
    assert status == 303
    leaked = requests.get(location, allow_redirects=False, timeout=5)  # no binding cookie
    assert (leaked.status_code, leaked.headers["X-Gateway-Reason"]) == (400, "state_mismatch")
    assert "Set-Cookie" not in leaked.headers
    followed = _follow_with_cookie_jar(location, tmp_path / "jar.txt")  # not burnt: the owner goes on
    body = json.loads(followed.stdout.rsplit("\n\n", 1)[1])
    assert body["headers"]["x-gateway-subject"] == softhsm_cards["doctor"].idnat
    denied = [e for e in _events(stack, "card_handoff") if e["decision"] == "deny"]
    assert denied and "binding cookie" in denied[-1]["detail"]


def _tool_card_session(stack: CardStack, token: ToolToken, certificate: Path, jar: Path, work: Path) -> None:
    """Log in on the card host with the tool-made card and keep the main host's session in ``jar``."""
    status, location, _ = _tool_card_host_login(stack, token, certificate, work, jar=jar)
    assert status == 303
    followed = _follow_with_cookie_jar(location, jar)
    assert json.loads(followed.stdout.rsplit("\n\n", 1)[1])["path"] == CARD_ROUTE


def _status_with(jar: Path, url: str) -> int:
    return int(curl("-b", str(jar), "-o", "/dev/null", "-w", "%{http_code}", url).stdout)


def test_a_refreshed_crl_listing_the_card_ends_every_session_it_opened(
    own_tool_pki: OpensslPki,
    dev_pki: DevPki,
    upstream_url: str,
    assertion_key: Path,
    tmp_path: Path,
) -> None:
    pki = own_tool_pki
    env = softhsm_config(tmp_path / "softhsm")
    token = tool_token(env, "tool-revoked-later")
    certificate = pki.token_card(token, "cps", "0x0E0F")
    bystander_token = tool_token(env, "tool-bystander")
    bystander = pki.token_card(bystander_token, "cps", "0x0E10")
    cards = lambda origin: {**pki.card_settings(origin), "crl_refresh": "1s"}  # noqa: E731
    with card_stack(tmp_path / "stack", dev_pki, upstream_url, assertion_key, cards=cards) as stack:
        jars = [tmp_path / "browser-1.txt", tmp_path / "browser-2.txt"]
        for jar in jars:
            _tool_card_session(stack, token, certificate, jar, tmp_path)
        _tool_card_session(stack, bystander_token, bystander, tmp_path / "bystander.txt", tmp_path)
        page = f"{stack.gateway_url}{CARD_ROUTE}"
        assert [_status_with(jar, page) for jar in jars] == [200, 200]

        pki.people.revoke(certificate)  # openssl ca -revoke, then a new CRL: what the CA publishes
        pki.people.write_crl(pki.people_crl)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _events(stack, "card_revocation"):
            time.sleep(0.2)
        (ended,) = _events(stack, "card_revocation")
        assert [_status_with(jar, page) for jar in jars] == [401, 401]  # login required
        assert _status_with(tmp_path / "bystander.txt", page) == 200
        relogin, _, headers = _tool_card_host_login(stack, token, certificate, tmp_path)
    assert (ended["card_serial"], ended["sessions_ended"], ended["detected"]) == (
        printed_serial(certificate),
        2,
        "crl_refresh",
    )
    assert ended["reasons"] == ["card_revoked"] and "IGC-SANTE STANDARD PERSONNES" in str(
        ended["card_issuer"]
    )
    assert (relogin, headers.get("x-gateway-reason")) == (403, "card_revoked")


def test_a_large_body_to_the_gateways_own_endpoints_is_a_413_and_not_read(stack: CardStack) -> None:
    # One 150 MB JSON once took a worker from 68 to 508 MB; 64 KiB is ample (a certificate is ~2 KiB).
    url = f"{stack.gateway_url}/.gateway/card/verify"
    json_type = {"Content-Type": "application/json"}
    sized = requests.post(url, data=b'{"nonce": "' + b"x" * 300_000 + b'"}', headers=json_type, timeout=10)
    assert (sized.status_code, sized.json()["error"]) == (413, "request_too_large")
    chunked = requests.post(url, data=(b" " * 16_384 for _ in range(20)), headers=json_type, timeout=10)
    assert (chunked.status_code, chunked.json()["error"]) == (413, "request_too_large")
    refused = [e for e in _events(stack, "bad_request") if e["reasons"] == ["request_too_large"]]
    assert len(refused) == 2 and refused[-1]["endpoint"] == "gateway_card.verify"
