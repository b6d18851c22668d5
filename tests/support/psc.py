"""Run the Pro Santé Connect stand-in (gateway.devtools.psc) as a real process for tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
import yaml

from tests.support.processes import PYTHON, free_port, running

ISSUER_PATH = "/auth/realms/esante-wallet"
AUTO_APPROVE_PARAM = "psc_test_auto_approve"


@dataclass(frozen=True)
class PscServer:
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.base_url + ISSUER_PATH

    @property
    def metadata_url(self) -> str:
        """PSC's non-standard discovery path, as configured in production."""
        return self.issuer + "/.well-known/wallet-openid-configuration"

    def set_faults(self, **faults: Any) -> None:
        requests.post(self.base_url + "/_test/faults", json=faults, timeout=5).raise_for_status()

    def rotate_keys(self) -> None:
        """PSC publishes a new signing key (the old one stays in the JWKS)."""
        requests.post(self.base_url + "/_test/rotate-keys", timeout=5).raise_for_status()

    def reset(self) -> None:
        requests.post(self.base_url + "/_test/reset", timeout=5).raise_for_status()

    def backchannel_logout(self, *, idnat: str | None = None, sub: str | None = None) -> list[dict[str, Any]]:
        answer = requests.post(
            self.base_url + "/_test/backchannel-logout", json={"idnat": idnat, "sub": sub}, timeout=10
        )
        answer.raise_for_status()
        return list(answer.json()["deliveries"])

    def approve(self, authorization_url: str, idnat: str) -> str:
        """Stand-in for the professional approving on the phone; returns the RP callback URL."""
        return self._authorize(authorization_url, {AUTO_APPROVE_PARAM: "1", "login_hint": idnat})

    def refuse(self, authorization_url: str) -> str:
        return self._authorize(authorization_url, {AUTO_APPROVE_PARAM: "deny"})

    def _authorize(self, authorization_url: str, extra: dict[str, str]) -> str:
        answer = requests.get(authorization_url, params=extra, allow_redirects=False, timeout=10)
        assert answer.status_code == 302, (answer.status_code, answer.text[:500])
        return answer.headers["Location"]


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@contextlib.contextmanager
def running_psc(
    tmp_path: Path, clients: Sequence[dict[str, Any]], identities: Sequence[dict[str, str]] | None = None
) -> Iterator[PscServer]:
    """Start the stand-in on a free loopback port with these registered clients; stop it by PID."""
    port = free_port()
    clients_file = tmp_path / f"psc-clients-{port}.yaml"
    clients_file.write_text(yaml.safe_dump({"clients": list(clients)}), encoding="utf-8")
    argv = [PYTHON, "-m", "gateway.devtools.psc", "--port", str(port), "--clients", str(clients_file)]
    if identities is not None:
        identities_file = tmp_path / f"psc-identities-{port}.yaml"
        identities_file.write_text(yaml.safe_dump({"identities": list(identities)}), encoding="utf-8")
        argv += ["--identities", str(identities_file)]
    log = tmp_path / f"psc-{port}.log"
    with running(argv, port, log=log):
        yield PscServer(port=port, log=log)
