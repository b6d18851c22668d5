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
    #: Where browsers reach it (a TLS terminator in front) when not at base_url; and how to trust that.
    public_url: str | None = None
    verify: str | bool = True

    @property
    def base_url(self) -> str:
        """The stand-in process itself (its /_test/ endpoints)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return (self.public_url or self.base_url) + ISSUER_PATH

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

    def backchannel_logout(
        self,
        *,
        idnat: str | None = None,
        sub: str | None = None,
        sid: str | None = None,
        omit_sid: bool = False,
    ) -> list[dict[str, Any]]:
        """PSC ends the matching PSC sessions and tells each client (``omit_sid``: tokens name only sub)."""
        wanted = {"idnat": idnat, "sub": sub, "sid": sid, "omit_sid": omit_sid}
        answer = requests.post(self.base_url + "/_test/backchannel-logout", json=wanted, timeout=10)
        answer.raise_for_status()
        return list(answer.json()["deliveries"])

    def logout_token(self, sid: str, client_id: str) -> str:
        """A valid logout token for that PSC session, not delivered (to replay it by hand)."""
        answer = requests.post(
            self.base_url + "/_test/logout-token", json={"sid": sid, "client_id": client_id}, timeout=5
        )
        answer.raise_for_status()
        return str(answer.json()["logout_token"])

    def sessions(self, idnat: str | None = None) -> list[dict[str, Any]]:
        """PSC's live sessions (sid, idnat, sub, clients), oldest first."""
        answer = requests.get(self.base_url + "/_test/sessions", timeout=5)
        answer.raise_for_status()
        return [entry for entry in answer.json()["sessions"] if idnat is None or entry["idnat"] == idnat]

    def approve(self, authorization_url: str, idnat: str) -> str:
        """Stand-in for the professional approving on the phone; returns the RP callback URL."""
        return self._authorize(authorization_url, {AUTO_APPROVE_PARAM: "1", "login_hint": idnat})

    def refuse(self, authorization_url: str) -> str:
        return self._authorize(authorization_url, {AUTO_APPROVE_PARAM: "deny"})

    def _authorize(self, authorization_url: str, extra: dict[str, str]) -> str:
        answer = requests.get(
            authorization_url, params=extra, allow_redirects=False, timeout=10, verify=self.verify
        )
        assert answer.status_code == 302, (answer.status_code, answer.text[:500])
        return answer.headers["Location"]


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@contextlib.contextmanager
def running_psc(
    tmp_path: Path,
    clients: Sequence[dict[str, Any]],
    identities: Sequence[dict[str, str]] | None = None,
    *,
    port: int | None = None,
    args: Sequence[str] = (),
    public_url: str | None = None,
    verify: str | bool = True,
) -> Iterator[PscServer]:
    """Start the stand-in on a free loopback port (or ``port``) with these registered clients and extra
    command-line ``args``; stop it by PID."""
    port = port or free_port()
    clients_file = tmp_path / f"psc-clients-{port}.yaml"
    clients_file.write_text(yaml.safe_dump({"clients": list(clients)}), encoding="utf-8")
    argv = [PYTHON, "-m", "gateway.devtools.psc", "--port", str(port), "--clients", str(clients_file), *args]
    if public_url:
        argv += ["--public-url", public_url]
    if identities is not None:
        identities_file = tmp_path / f"psc-identities-{port}.yaml"
        identities_file.write_text(yaml.safe_dump({"identities": list(identities)}), encoding="utf-8")
        argv += ["--identities", str(identities_file)]
    log = tmp_path / f"psc-{port}.log"
    with running(argv, port, log=log):
        yield PscServer(port=port, log=log, public_url=public_url, verify=verify)
