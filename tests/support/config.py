"""Write settings and policy files for a test, the way an operator would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TEST_POLICIES = """\
rules:
  - name: public-hello
    match: { paths: [/hello, /bytes/*, /upload, /slow/*, /set-cookie, /echo/public/**] }
    action: public
  - name: records
    match: { path: /patients/*, methods: [GET] }
    action: authenticate
    login: { professions: [10, 21] }
  - name: echo-protected
    match: { path: /echo/protected/** }
    action: authenticate
  - name: card-only
    match: { path: /echo/card/** }
    action: authenticate
    login: { methods: [card], max_age: 10m }
  - name: forbidden
    match: { path: /echo/forbidden/** }
    action: deny
"""

TEST_HOSTS = ["localhost", "portal.test"]
#: The tests' card host secret (`card.host_secret`, filled into the card-login template).
CARD_HOST_SECRET = "c4rd-h0st-s3cret-for-tests-only-" + "0123456789abcdef" * 2


def write_config(
    directory: Path,
    *,
    upstream_url: str,
    assertion_key: Path,
    policies: str = TEST_POLICIES,
    listen: str = "127.0.0.1:8080",
    extra: dict[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "test.yaml").write_text(policies)
    settings: dict[str, Any] = {
        # The Flask test client says Host: localhost; in-process forward-auth tests name portal.test.
        "server": {"listen": listen, "public_origin": f"http://{listen}", "allowed_hosts": TEST_HOSTS},
        "upstream": {"url": upstream_url, "connect_timeout": "1s", "read_timeout": "2s"},
        "policies": ["policies"],
        "assertion": {"key_file": str(assertion_key)},
        "audit": {"file": "audit.log"},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            settings.setdefault(section, {}).update(values)
        else:
            settings[section] = values
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path
