"""The gateway command as an operator runs it: check, policy explain, serve refusing bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.config import write_config


def gateway(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
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
    config = write_config(tmp_path, upstream_url="http://127.0.0.1:9", assertion_key=assertion_key, extra=extra)
    result = gateway("check", "--config", str(config))
    assert result.returncode == 2
    assert "limits.storage memory:// counts per process" in result.stderr
    assert "Traceback" not in result.stderr
