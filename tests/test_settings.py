"""Settings: typed, every error at once with file, line and key; ${ENV} references; relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config_source import ConfigErrors
from gateway.settings import DEFAULT_SETTINGS_FILE, documented_keys, load_settings, policy_files


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "key.pem").write_text("not read by the settings loader")
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


VALID = """\
upstream:
  url: http://127.0.0.1:9000
policies: [policies]
assertion:
  key_file: key.pem
"""


def errors(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        load_settings(path, **kwargs)  # type: ignore[arg-type]
    return [str(e).removeprefix(f"{path}:") for e in caught.value.errors]


def test_minimal_settings_and_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID))
    assert settings.policies == [tmp_path / "policies"]
    assert settings.assertion.key_file == tmp_path / "key.pem"
    assert settings.sessions.cookie_name == "__Host-gateway-session"
    assert (settings.sessions.idle_timeout, settings.sessions.absolute_timeout) == (1800, 14400)
    assert settings.upstream.connect_timeout == 2 and settings.upstream.read_timeout == 30


def test_every_error_is_reported_with_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
server:
  listen: nowhere
  colour: blue
upstream:
  url: ftp://x
  read_timeout: forever
policies: [missing-dir]
assertion:
  key_file: absent.pem
sessions:
  cookie_name: session
  idle_timeout: 5h
""",
    )
    assert errors(path) == [
        "2: server.listen: 'nowhere' is not host:port",
        "3: server.colour: unknown key",
        "5: upstream.url: 'ftp://x' is not an http(s) origin (scheme://host[:port])",
        "6: upstream.read_timeout: expected a duration such as 30s, 10m, 4h (got 'forever')",
        f"7: policies: not found: {tmp_path / 'missing-dir'}",
        f"9: assertion.key_file: file not found: {tmp_path / 'absent.pem'}",
        "11: sessions.cookie_name: the session cookie name must start with __Host- (Secure, no Domain, Path=/)",
    ]


def test_idle_timeout_within_absolute_lifetime(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "sessions:\n  idle_timeout: 5h\n")
    assert errors(path) == ["6: sessions: idle_timeout cannot be longer than absolute_timeout"]


def test_missing_required_section(tmp_path: Path) -> None:
    assert errors(write(tmp_path, "policies: [policies]\n")) == [
        "1: upstream: required key is missing",
        "1: assertion: required key is missing",
    ]


def test_memory_sessions_refuse_several_workers(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "server:\n  workers: 4\n")
    assert errors(path) == [
        "1: (top level): sessions.store memory:// lives in one process: set server.workers to 1 or use a redis:// store"
    ]


def test_the_access_stream_needs_an_audit_file_and_short_cached_answers(tmp_path: Path) -> None:
    stream = "forward_auth:\n  access_log: /var/log/nginx/cps-access.log\n"
    assert errors(write(tmp_path, VALID + stream)) == [
        "1: (top level): forward_auth.access_log needs audit.file: the access records and the ingester's "
        "position are kept beside it"
    ]
    settings = load_settings(write(tmp_path, VALID + stream + "audit:\n  file: audit.log\n"))
    assert settings.forward_auth.access_log == Path("/var/log/nginx/cps-access.log")
    assert (settings.forward_auth.cache_seconds, settings.forward_auth.max_lag) == (5.0, 10.0)
    long_cache = VALID + "forward_auth:\n  cache_seconds: 40s\n"
    assert errors(write(tmp_path, long_cache)) == [
        "1: (top level): forward_auth.cache_seconds (40) must be below half of assertion.lifetime (60)"
    ]


def test_environment_references(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "sessions:\n  store: ${SESSION_URL}\n")
    settings = load_settings(path, environ={"SESSION_URL": "redis://127.0.0.1:6390/0"})
    assert settings.sessions.store == "redis://127.0.0.1:6390/0"
    assert errors(path, environ={}) == ["7: sessions.store: environment variable SESSION_URL is not set"]


def test_policy_directories_expand_to_yaml_files_in_name_order(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    for name in ("b.yaml", "a.yml", "notes.txt"):
        (tmp_path / "policies" / name).write_text("")
    assert [p.name for p in policy_files(load_settings(path))] == ["a.yml", "b.yaml"]


def test_unreadable_file(tmp_path: Path) -> None:
    assert "cannot read the settings file" in errors(tmp_path / "nope.yaml")[0]


def test_the_embedded_default_is_valid_without_generated_files() -> None:
    settings = load_settings(DEFAULT_SETTINGS_FILE, require_files=False)
    assert settings.upstream.url == "http://127.0.0.1:8081"


def test_every_key_is_documented() -> None:
    rows = documented_keys()
    undocumented = [key for key, _, description in rows if not description]
    assert undocumented == []
    assert ("upstream.url", "(required)") in [(key, default) for key, default, _ in rows]


CARD = """\
card:
  trust_anchors: [root.pem]
  login_origin: https://Carte.Portail.test:8443
"""
SECRET = "0123456789abcdef" * 4


def test_the_card_host_secret_is_required_once(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + CARD)
    assert errors(path, require_files=False) == [
        "6: card: set exactly one of host_secret and host_secret_file: without the card host's secret no "
        "client certificate is believed (the same value fills the card-login nginx template)"
    ]
    (tmp_path / "secret").write_text(SECRET + "\n")
    both = write(tmp_path, VALID + CARD + f"  host_secret: {SECRET}\n  host_secret_file: secret\n")
    assert len(errors(both, require_files=False)) == 1


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("0123456789abcdef" * 3, "too short"),  # 24 bytes of hex
        ("A" * 42, "too short"),  # not 32 bytes of base64
        ("a" * 60 + '"; x', "may only hold"),  # would break out of nginx's quoted string
        ("${NONE}", "not set"),
    ],
)
def test_a_weak_or_unsafe_card_host_secret_is_refused(tmp_path: Path, secret: str, problem: str) -> None:
    path = write(tmp_path, VALID + CARD + f"  host_secret: '{secret}'\n")
    (message,) = errors(path, require_files=False, environ={})
    assert message.startswith("9: card.host_secret: ") and problem in message


def test_the_card_host_secret_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    path = write(tmp_path, VALID + CARD + "  host_secret_file: secret\n")
    card = load_settings(path, require_files=False).card
    assert card is not None and card.host_secret_value() == SECRET.encode()
    (tmp_path / "secret").write_text("short\n")
    (message,) = errors(path, require_files=False)
    assert "card.host_secret_file" in message and "too short" in message
    with_env = write(tmp_path, VALID + CARD + "  host_secret: ${CARD_HOST_SECRET}\n")
    card = load_settings(with_env, require_files=False, environ={"CARD_HOST_SECRET": SECRET}).card
    assert card is not None and card.host_secret_value() == SECRET.encode()


def test_allowed_hosts_are_the_origins_hosts_and_the_listed_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        VALID
        + "server:\n  public_origin: https://Portail.test\n  allowed_hosts: [WWW.portail.test]\n"
        + CARD
        + f"  host_secret: {SECRET}\n",
    )
    settings = load_settings(path, require_files=False)
    assert settings.allowed_hosts == {"portail.test", "www.portail.test", "carte.portail.test"}
    bad = write(tmp_path, VALID + "server:\n  allowed_hosts: ['https://x.test', 'x.test:443', 'ok.test']\n")
    assert errors(bad) == [
        "7: server.allowed_hosts: not host names (no scheme, port or path): 'https://x.test', 'x.test:443'"
    ]
