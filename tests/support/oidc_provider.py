"""panva/oidc-provider (node, tests/support/oidc_provider/) as a real process: an OpenID Connect provider of
another implementation than the PSC stand-in, to check that the gateway does not only work with the provider
it was written against. ``make deps`` installs it (npm ci, pinned by package-lock.json)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from tests.support.processes import REPO_ROOT, free_port, running

PROVIDER_DIR = REPO_ROOT / "tests" / "support" / "oidc_provider"
NODE = shutil.which("node") or "/usr/bin/node"


@dataclass(frozen=True)
class OidcProvider:
    port: int
    log: Path
    public_url: str | None = None
    verify: str | bool = True

    @property
    def issuer(self) -> str:
        return self.public_url or f"http://127.0.0.1:{self.port}"

    @property
    def metadata_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    def approve(self, browser: requests.Session, authorization_url: str, idnat: str) -> str:
        """The professional at the provider, in ``browser`` (its cookies are the provider session): log in as
        ``idnat`` when asked; returns the URL the provider sends the browser back to (the RP's callback)."""
        url, method, data = authorization_url, "GET", None
        for _ in range(10):
            answer = browser.request(
                method, url, data=data, allow_redirects=False, timeout=10, verify=self.verify
            )
            if answer.is_redirect:
                url, method, data = urljoin(url, answer.headers["Location"]), "GET", None
                if not url.startswith(self.issuer):
                    return url
            elif answer.status_code == 200 and "/interaction/" in url:
                method, data = "POST", {"idnat": idnat}
            else:
                raise AssertionError((answer.status_code, answer.text[:500]))
        raise AssertionError("no way back to the relying party")

    def confirm_logout(self, browser: requests.Session, end_session_url: str) -> str:
        """RP-initiated logout: the provider's confirmation page, answered yes; returns where it sends the
        browser afterwards. The provider then sends back-channel logout tokens to the session's clients."""
        page = browser.get(end_session_url, timeout=10, verify=self.verify)
        assert page.status_code == 200, page.text[:300]
        form = _form_fields(page.text)
        form["logout"] = "yes"
        answer = browser.post(
            urljoin(page.url, _form_action(page.text)),
            data=form,
            allow_redirects=False,
            timeout=10,
            verify=self.verify,
        )
        assert answer.is_redirect, (answer.status_code, answer.text[:300])
        return str(answer.headers["Location"])


def _form_action(html: str) -> str:
    found = re.search(r'<form[^>]*action="([^"]+)"', html)
    assert found is not None, html[:300]
    return found.group(1)


def _form_fields(html: str) -> dict[str, str]:
    return dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', html))


def require_installed() -> None:
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("oidc-provider is not installed: run `make deps` (npm ci in tests/support/oidc_provider)")


@contextlib.contextmanager
def running_oidc_provider(
    directory: Path,
    clients: Sequence[dict[str, Any]],
    identities: Sequence[dict[str, str]],
    *,
    port: int | None = None,
    public_url: str | None = None,
    verify: str | bool = True,
    mtls: bool = False,
    discovery: dict[str, Any] | None = None,
) -> Iterator[OidcProvider]:
    """Start oidc-provider on a free loopback port (or ``port``); stop it by PID."""
    require_installed()
    port = port or free_port()
    issuer = public_url or f"http://127.0.0.1:{port}"
    config = directory / f"oidc-provider-{port}.json"
    config.write_text(
        json.dumps(
            {
                "port": port,
                "issuer": issuer,
                "clients": list(clients),
                "identities": list(identities),
                "mtls": mtls,
                "discovery": discovery or {},
            }
        ),
        encoding="utf-8",
    )
    log = directory / f"oidc-provider-{port}.log"
    with running([NODE, str(PROVIDER_DIR / "server.mjs"), str(config)], port, cwd=PROVIDER_DIR, log=log):
        yield OidcProvider(port, log, public_url, verify)
