"""The README stays true: every settings key and every CLI command is documented there."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from gateway.cli import _parser, main
from gateway.config_source import known_keys
from gateway.settings import Settings, documented_keys

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_settings_key_is_in_the_readme() -> None:
    missing = [key for key, _, _ in documented_keys() if f"`{key}`" not in README]
    assert missing == [], "run: gateway settings keys, and update README.md"


def commands(parser: argparse.ArgumentParser, prefix: str = "gateway") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = commands(sub, f"{prefix} {name}")
                found.extend(nested or [f"{prefix} {name}"])
    return found


def test_every_cli_command_is_in_the_readme() -> None:
    missing = [command for command in commands(_parser()) if f"| `{command}" not in README]
    assert missing == []


def test_the_keys_table_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    block = re.search(r"<!-- settings-keys:start.*?-->\n(.*?)<!-- settings-keys:end -->", README, re.S)
    assert block is not None
    rows = [line for line in block.group(1).splitlines() if line.startswith("| `")]
    assert main(["settings", "keys"]) == 0
    generated = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert rows == generated, "run: gateway settings keys, and paste it into README.md"


def test_the_configuration_example_is_valid(tmp_path: Path) -> None:
    from gateway.proxy.assertion import generate_key_file
    from gateway.settings import load_settings

    example = re.search(r"## Configuration.*?```yaml\n(.*?)```", README, re.S)
    assert example is not None
    key = tmp_path / "assertion-key.pem"
    generate_key_file(key)
    text = (
        example.group(1)
        .replace("/etc/gateway/assertion-key.pem", str(key))
        .replace("/var/log/gateway/audit.log", str(tmp_path / "audit.log"))
        .replace("policies: [policies/]", f"policies: [{Path(__file__).resolve().parents[1] / 'policies'}]")
    )
    (tmp_path / "gateway.yaml").write_text(text)
    settings = load_settings(tmp_path / "gateway.yaml")
    assert settings.sessions.store.startswith("redis://") and settings.server.workers == 4


def _key_paths(value: object, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in [(*path, key), *_key_paths(item, (*path, key))]]
    if isinstance(value, list):
        return [p for item in value for p in _key_paths(item, (*path, 0))]
    return []


def test_every_settings_snippet_uses_real_keys() -> None:
    """The README's YAML examples (the configuration, the real anchors, the real PSC client) name real keys."""
    snippets = re.findall(r"```yaml\n(.*?)```", README, re.S)
    assert len(snippets) >= 3
    unknown = [
        ".".join(map(str, path))
        for snippet in snippets
        for path in _key_paths(yaml.safe_load(snippet))
        if isinstance(path[-1], str) and path[-1] not in known_keys(Settings, path[:-1])
    ]
    assert unknown == []
