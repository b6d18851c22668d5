"""The README stays true: every settings key and every CLI command is documented there."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gateway.cli import _parser, main
from gateway.settings import documented_keys

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
