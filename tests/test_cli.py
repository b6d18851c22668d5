"""The gateway command as an operator runs it: check, policy explain, serve refusing bad config."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.devtools.cards import softhsm_env
from tests.support.card_stack import CardStack
from tests.support.config import write_config
from tests.support.softhsm import PIN, CardSet


def gateway(
    *args: str,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with no terminal (its own session) and ``stdin`` (default: empty)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else dict(env),
        cwd=cwd,
        input=stdin or "",
        start_new_session=True,
    )


def explain(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return gateway("policy", "explain", "--config", str(config), *args)


@pytest.fixture
def config(tmp_path: Path, assertion_key: Path) -> Path:
    return write_config(tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key)


def test_check_accepts_a_good_configuration(config: Path) -> None:
    result = gateway("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK:" in result.stdout and "5 rules in 1 policy files" in result.stdout


def test_check_lists_every_error_of_settings_and_policies(tmp_path: Path, assertion_key: Path) -> None:
    config = write_config(
        tmp_path,
        upstream_url="http://127.0.0.1:9",
        assertion_key=tmp_path / "missing.pem",
        policies="rules:\n  - name: x\n    match: { path: nope }\n    action: maybe\n",
    )
    result = gateway("check", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "configuration refused (3 errors):"
    assert f"assertion.key_file: file not found: {tmp_path / 'missing.pem'}" in lines[1]
    assert lines[2].endswith("test.yaml:3: rules[0].match.path: path pattern 'nope' must start with '/'")
    assert lines[3].endswith(
        "test.yaml:4: rules[0].action: Input should be 'public', 'deny' or 'authenticate'"
    )


def test_check_warns_about_unreachable_rules(tmp_path: Path, assertion_key: Path) -> None:
    policies = (
        "rules:\n  - name: all\n    match: { path: /** }\n    action: deny\n"
        "  - name: never\n    match: { path: /x }\n    action: public\n"
    )
    config = write_config(
        tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key, policies=policies
    )
    result = gateway("check", "--config", str(config))
    assert result.returncode == 0
    assert "warning:" in result.stdout and "rule 'never': can never match" in result.stdout


def test_serve_refuses_to_start_on_a_bad_policy(tmp_path: Path, assertion_key: Path) -> None:
    config = write_config(
        tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key, policies="rules: oops\n"
    )
    result = gateway("serve", "--config", str(config))
    assert result.returncode == 2
    assert "test.yaml:1: rules: Input should be a valid list" in result.stderr


def test_explain_a_protected_route_without_session(config: Path) -> None:
    result = explain(config, "GET", "https://portal.fr/patients/123")
    assert result.returncode == 0
    assert "rule:     records (" in result.stdout and "test.yaml:5)" in result.stdout
    assert "decision: login" in result.stdout and "reasons:  unauthenticated" in result.stdout


def test_explain_with_a_card_session_and_a_profession(config: Path) -> None:
    result = explain(config, "GET", "/patients/123", "--as", "card", "--profession", "21")
    assert "decision: allow" in result.stdout and "reasons:  authenticated" in result.stdout


def test_explain_step_up(config: Path) -> None:
    result = explain(config, "GET", "/echo/card/x", "--as", "card", "--auth-age", "11m")
    assert "rule:     card-only" in result.stdout
    assert "decision: login" in result.stdout and "login_too_old" in result.stdout


def test_explain_normalises_like_the_proxy(config: Path) -> None:
    result = explain(config, "GET", "/echo/public/%2e%2e/%2e%2e/patients/1")
    assert "request:  GET portal.fr /patients/1" not in result.stdout
    assert "/patients/1" in result.stdout and "rule:     records" in result.stdout
    refused = explain(config, "GET", "/patients%2F1")
    assert "bad_request_path: an encoded slash in the path" in refused.stdout


def test_explain_unmatched(config: Path) -> None:
    result = explain(config, "POST", "/nothing")
    assert "default deny" in result.stdout and "reasons:  no_matching_rule" in result.stdout


def test_audit_verify_names_the_edited_line(tmp_path: Path) -> None:
    from gateway.audit import AuditLog

    path = tmp_path / "audit.log"
    with AuditLog(path) as audit:
        for n in range(3):
            audit.record("decision", idnat=f"81000000000{n}", decision="allow", reasons=["authenticated"])
    assert gateway("audit", "verify", str(path)).returncode == 0
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("810000000001", "810000000009")
    path.write_text("\n".join(lines) + "\n")
    result = gateway("audit", "verify", str(path))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{path}:2: edited")


def test_session_revoke_everywhere(tmp_path: Path, assertion_key: Path) -> None:
    import time

    from gateway.identity import Identity, LoginMethod
    from gateway.sessions import RedisSessionStore
    from tests.support.redis import redis_server

    with redis_server() as redis:
        config = write_config(
            tmp_path,
            upstream_url="http://127.0.0.1:9",
            assertion_key=assertion_key,
            extra={"sessions": {"store": redis.url}},
        )
        store = RedisSessionStore(redis.url)
        identity = Identity("810001234567", LoginMethod.CARD, time.time())
        sessions = [store.create(identity, time.time()) for _ in range(2)]
        result = gateway("session", "revoke", "--config", str(config), "--idnat", "810001234567")
        assert result.returncode == 0, result.stderr
        assert "2 session(s) of 810001234567 revoked" in result.stdout
        assert all(store.get(s.id, time.time()) is None for s in sessions)
    assert '"revoked_by_operator"' in (tmp_path / "audit.log").read_text()


def test_check_refuses_memory_limits_with_several_workers(tmp_path: Path, assertion_key: Path) -> None:
    # Each worker would count logins, bans and quotas on its own: N workers, N times the limits.
    extra = {
        "server": {"workers": 2},
        "sessions": {"store": "redis://127.0.0.1:6399/0"},
        "limits": {"storage": "memory://"},
    }
    config = write_config(
        tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key, extra=extra
    )
    result = gateway("check", "--config", str(config))
    assert result.returncode == 2
    assert "limits.storage memory:// counts per process" in result.stderr
    assert "Traceback" not in result.stderr


def no_traceback(result: subprocess.CompletedProcess[str]) -> str:
    """stderr, checked to say what went wrong in words (a traceback is a defect)."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result.stderr


def test_a_settings_file_that_is_not_utf8_text_is_named(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_bytes(b"server:\n  listen: \xff\xfe\n")
    result = gateway("check", "--config", str(tmp_path / "gateway.yaml"))
    assert result.returncode == 2
    assert "gateway.yaml: (top level): cannot read the settings file: not UTF-8 text" in no_traceback(result)


def test_audit_verify_of_a_missing_file_or_a_directory_says_so(tmp_path: Path) -> None:
    missing = gateway("audit", "verify", str(tmp_path / "nowhere.log"))
    assert missing.returncode == 64 and "no file" in no_traceback(missing)
    directory = gateway("audit", "verify", str(tmp_path))
    assert directory.returncode == 64 and "is a directory" in no_traceback(directory)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("server:\n\tlisten: 127.0.0.1:8080\n", "2:1", "a tab character; YAML indents with spaces only"),
        ("server:\n  listen: 127.0.0.1:8080\n workers: 2\n", "3:2", "not indented like the other keys"),
        ("server:\n  listen: 127.0.0.1:8080\n    workers: 2\n", "3:12", "check this line's indentation"),
        ("server:\n  trusted_proxies: [10.0.0.0/8\nupstream: {}\n", "3:9", "opened with '[' on line 2"),
    ],
)
def test_yaml_syntax_errors_are_explained_in_words_with_the_line(
    tmp_path: Path, text: str, line: str, words: str
) -> None:
    (tmp_path / "gateway.yaml").write_text(text)
    result = gateway("check", "--config", str(tmp_path / "gateway.yaml"))
    assert result.returncode == 2
    assert f"gateway.yaml:{line}: YAML syntax: " in no_traceback(result) and words in result.stderr


def test_an_unknown_key_close_to_a_known_one_is_named(tmp_path: Path, assertion_key: Path) -> None:
    settings_typo = write_config(
        tmp_path / "a",
        upstream_url="http://127.0.0.1:9",
        assertion_key=assertion_key,
        extra={"server": {"wrokers": 2}},
    )
    result = gateway("check", "--config", str(settings_typo))
    assert result.returncode == 2
    assert "server.wrokers: unknown key (did you mean 'workers'?)" in no_traceback(result)
    policy_typo = write_config(
        tmp_path / "b",
        upstream_url="http://127.0.0.1:9",
        assertion_key=assertion_key,
        policies="rules:\n  - name: a\n    match: { paths: [/a] }\n    acton: public\n",
    )
    result = gateway("check", "--config", str(policy_typo))
    assert result.returncode == 2
    assert "rules[0].acton: unknown key (did you mean 'action'?)" in no_traceback(result)


def test_metrics_listen_has_no_default_because_nothing_listens_without_the_section(
    tmp_path: Path, assertion_key: Path
) -> None:
    keys = gateway("settings", "keys")
    assert "| `metrics.listen` | `(required)` |" in keys.stdout
    config = write_config(
        tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key, extra={"metrics": {}}
    )
    result = gateway("check", "--config", str(config))
    assert result.returncode == 2 and "metrics.listen: required key is missing" in no_traceback(result)


@pytest.mark.parametrize(
    "args",
    [
        ("policy", "explain", "GET", "/x", "--as", "card", "--auth-age", "soon"),
        ("dev", "portal", "--listen", "8081"),
        ("dev", "portal", "--gateway", "gateway:8080"),
        ("card", "login", "--url", "http://127.0.0.1:9", "--token-label", ""),
        ("dev", "card", "--label", " ", "--idnat", "810002813899", "--surname", "N", "--given", "P"),
    ],
)
def test_a_malformed_option_is_a_usage_error(args: tuple[str, ...]) -> None:
    result = gateway(*args)
    assert result.returncode == 2 and "error: argument" in no_traceback(result)


def test_a_command_group_alone_shows_its_subcommands() -> None:
    result = gateway("dev")
    assert result.returncode == 64 and result.stdout.startswith("usage: gateway dev ")


def test_dev_card_on_an_existing_label_says_how_to_use_or_replace_it(tmp_path: Path) -> None:
    card = (
        "dev",
        "card",
        "--label",
        "twice",
        "--idnat",
        "810002813899",
        "--surname",
        "NOM",
        "--given",
        "PRENOM",
    )
    assert gateway(*card, cwd=tmp_path, timeout=60).returncode == 0
    again = gateway(*card, cwd=tmp_path, timeout=60)
    assert again.returncode == 64
    told = no_traceback(again)
    assert (
        "already exists" in told
        and "card login" in told
        and "--token-label twice" in told
        and "--replace" in told
    )
    replaced = gateway(*card, "--replace", "--given", "AUTRE", cwd=tmp_path, timeout=60)
    assert replaced.returncode == 0, replaced.stderr
    listed = gateway("dev", "cards", cwd=tmp_path, timeout=60).stdout
    assert listed.count("twice\t") == 1 and "AUTRE" in listed


def card_login(
    stack: CardStack, label: str, tmp_path: Path, *args: str, env: Mapping[str, str], stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    jar = str(tmp_path / "cookies.txt")
    login = ("card", "login", "--url", stack.gateway_url, "--token-label", label, "--cookie-jar", jar)
    return gateway(*login, *args, env=env, stdin=stdin, timeout=60)


def card_env(stack: CardStack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in softhsm_env(stack.pki.base_dir).items() if k != "GATEWAY_CARD_PIN"}
    return {**env, **extra}


def test_card_login_pin_dash_without_a_terminal_reads_the_pin_from_standard_input(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    login = card_login(stack, "test-doctor", tmp_path, "--pin", "-", env=card_env(stack), stdin=f"{PIN}\n")
    assert login.returncode == 0, no_traceback(login)
    assert softhsm_cards["doctor"].idnat in login.stdout


def test_card_login_pin_dash_with_neither_terminal_nor_input_says_what_to_do(
    stack: CardStack, tmp_path: Path
) -> None:
    login = card_login(stack, "test-doctor", tmp_path, "--pin", "-", env=card_env(stack))
    assert login.returncode == 64
    assert "GATEWAY_CARD_PIN" in no_traceback(login)


def test_card_login_honours_gateway_card_pin_instead_of_asking(
    stack: CardStack, softhsm_cards: CardSet, tmp_path: Path
) -> None:
    right = card_login(
        stack, "test-doctor", tmp_path, "--pin", "-", env=card_env(stack, GATEWAY_CARD_PIN=PIN)
    )
    assert right.returncode == 0, no_traceback(right)
    # A wrong PIN in the variable wins over the right one typed: the variable is what was used.
    wrong = card_login(
        stack,
        "test-doctor",
        tmp_path,
        "--pin",
        "-",
        env=card_env(stack, GATEWAY_CARD_PIN="0000"),
        stdin=f"{PIN}\n",
    )
    assert wrong.returncode == 1 and "PinIncorrect" in no_traceback(wrong)


def test_a_refused_card_login_prints_the_gateways_words(stack: CardStack, tmp_path: Path) -> None:
    login = card_login(stack, "test-revoked", tmp_path, env=card_env(stack))
    assert login.returncode == 1
    told = no_traceback(login)
    assert "(card_revoked)" in told and "\\u00" not in told and "révoqu" in told, told


def test_card_login_without_softhsm2_conf_hints_at_it(stack: CardStack, tmp_path: Path) -> None:
    env = {k: v for k, v in card_env(stack).items() if k != "SOFTHSM2_CONF"}
    login = card_login(stack, "test-doctor", tmp_path, env=env)
    assert login.returncode == 1
    told = no_traceback(login)
    assert "no token labelled 'test-doctor'" in told and "SOFTHSM2_CONF is not set" in told
    misspelt = card_login(
        stack, "test-doctor", tmp_path, env={**env, "SOFTHSM2_CONF": str(tmp_path / "nowhere")}
    )
    assert misspelt.returncode == 1
    told = no_traceback(misspelt)
    assert "cannot load the PKCS#11 module" in told and f"SOFTHSM2_CONF names {tmp_path / 'nowhere'}" in told


def test_card_login_names_a_cacert_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "not-a-certificate.pem").write_text("garbage")
    for cacert, words in (
        ("missing.pem", "No such file or directory"),
        ("not-a-certificate.pem", "no PEM CA"),
    ):
        login = gateway(
            "card",
            "login",
            "--url",
            "https://127.0.0.1:9",
            "--token-label",
            "x",
            "--cacert",
            cacert,
            cwd=tmp_path,
        )
        told = no_traceback(login)
        assert login.returncode == 1 and f"cannot use --cacert {cacert}: {words}" in told
        assert "SOFTHSM2_CONF" not in told  # the card was never reached: no hint about where cards are


def test_explain_of_a_malformed_url_says_so(config: Path) -> None:
    result = explain(config, "GET", "http://[::1/patients/1")
    assert result.returncode == 64 and "is not a URL or a path" in no_traceback(result)


def test_serve_on_an_address_in_use_names_the_setting(tmp_path: Path, assertion_key: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = write_config(
            tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key, listen=listen
        )
        result = gateway("serve", "--config", str(config), timeout=60)
    assert result.returncode == 1
    assert f"cannot listen: Address already in use (server.listen {listen})" in no_traceback(result)
