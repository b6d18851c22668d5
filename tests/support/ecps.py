"""A real gateway process with e-CPS login, in front of the test upstream, with the PSC stand-in process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from tests.support.audit import audit_records
from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running, wait_for_port
from tests.support.psc import PscServer, running_psc

CLIENT_ID = "gateway"
CLIENT_SECRET = "stand-in-secret-for-tests"
LOGIN_COOKIE_SECRET = "x" * 40
SESSION_COOKIE = "__Host-gateway-session"
LOGIN_COOKIE = "__Host-gateway-login"
DOCTOR = "810001234567"  # profession 10, authMode MOBILE
PHARMACIST = "810009876543"  # profession 21
PHYSIO = "810007070707"  # profession 70: outside the records rule

ECPS_POLICIES = """\
rules:
  - name: public-hello
    match: { paths: [/hello] }
    action: public
  - name: records
    match: { path: /patients/*, methods: [GET] }
    action: authenticate
    login: { professions: [10, 21] }
  - name: step-up
    match: { path: /echo/stepup/** }
    action: authenticate
    login: { max_age: 2s }
  - name: echo-protected
    match: { path: /echo/protected/** }
    action: authenticate
"""

IDENTITIES = [
    {
        "idnat": DOCTOR,
        "family_name": "DUPONT",
        "given_name": "JEAN",
        "profession": "10",
        "auth_mode": "MOBILE",
    },
    {
        "idnat": PHARMACIST,
        "family_name": "MARTIN",
        "given_name": "CLAIRE",
        "profession": "21",
        "auth_mode": "MOBILE",
    },
    {
        "idnat": PHYSIO,
        "family_name": "LEROY",
        "given_name": "ANNE",
        "profession": "70",
        "auth_mode": "MOBILE",
    },
]


@dataclass(frozen=True)
class EcpsWorld:
    gateway_url: str
    psc: PscServer
    directory: Path
    metrics_url: str

    def audit_events(self) -> list[dict[str, Any]]:
        return audit_records(self.directory / "audit.log")

    def last_audit(self, event: str) -> dict[str, Any]:
        return next(e for e in reversed(self.audit_events()) if e["event"] == event)


GENEROUS_LIMITS = {
    "ban_after": 1000,
    "login_attempts_per_ip": "1000/minute",
    "login_requests_per_ip": "1000/minute",
}


def gateway_registration(gateway_url: str, **overrides: Any) -> dict[str, Any]:
    """The gateway as a client registered with PSC (secret authentication unless ``overrides`` say)."""
    return {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [gateway_url + "/.gateway/ecps/callback"],
        "post_logout_redirect_uris": [gateway_url + "/"],
        "backchannel_logout_uri": gateway_url + "/.gateway/ecps/backchannel-logout",
        **overrides,
    }


#: The environment the secrets of :func:`ecps_settings` come from.
ECPS_SECRETS = {"TEST_PSC_CLIENT_SECRET": CLIENT_SECRET, "TEST_LOGIN_COOKIE_SECRET": LOGIN_COOKIE_SECRET}


def ecps_settings(psc: PscServer, origin: str) -> dict[str, Any]:
    """The gateway's ``ecps`` section for ``psc``, the gateway answering at ``origin`` (secret authentication;
    the secrets from the environment: :data:`ECPS_SECRETS`)."""
    return {
        "metadata_url": psc.metadata_url,
        "client_id": CLIENT_ID,
        "client_secret": "${TEST_PSC_CLIENT_SECRET}",
        "redirect_uri": origin + "/.gateway/ecps/callback",
        "post_logout_redirect_uri": origin + "/",
        "timeout": "3s",
        "login_cookie_secret": "${TEST_LOGIN_COOKIE_SECRET}",
    }


@contextlib.contextmanager
def running_ecps_gateway(
    directory: Path,
    psc: PscServer,
    *,
    port: int,
    upstream_url: str,
    assertion_key: Path,
    limits: dict[str, Any] | None = None,
    ecps: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    policies: str = ECPS_POLICIES,
    public_url: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[EcpsWorld]:
    """A gateway process (``gateway.cli serve``; one worker unless ``extra`` says) on ``port``, e-CPS login
    against ``psc``: secret authentication unless ``ecps`` says otherwise. ``public_url``: the origin PSC
    sends browsers back to (another instance's, behind one load balancer)."""
    metrics_port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    origin = public_url or gateway_url
    config = write_config(
        directory,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        policies=policies,
        listen=f"127.0.0.1:{port}",
        extra={
            "server": {"workers": 1, "threads": 8},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "limits": limits or GENEROUS_LIMITS,
            "ecps": {**ecps_settings(psc, origin), **(ecps or {})},
            **(extra or {}),
        },
    )
    environment = {**os.environ, **ECPS_SECRETS, **(env or {})}
    with running(serve_argv(config), port, env=environment, log=directory / "gateway.log") as gateway:
        wait_for_port(metrics_port, gateway)  # the master opens it once its workers are up
        yield EcpsWorld(gateway_url, psc, config.parent, f"http://127.0.0.1:{metrics_port}")


@contextlib.contextmanager
def running_ecps_world(
    directory: Path,
    upstream_url: str,
    assertion_key: Path,
    limits: dict[str, Any] | None = None,
    *,
    registration: dict[str, Any] | None = None,
    psc_args: Sequence[str] = (),
    ecps: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    policies: str = ECPS_POLICIES,
) -> Iterator[EcpsWorld]:
    """PSC stand-in + gateway (one worker: memory sessions unless ``extra`` says) on free loopback ports.

    Login limits are generous unless ``limits`` says otherwise: these tests fail logins on purpose.
    """
    gateway_port = free_port()
    client = gateway_registration(f"http://127.0.0.1:{gateway_port}", **(registration or {}))
    with (
        running_psc(directory, [client], identities=IDENTITIES, args=psc_args) as psc,
        running_ecps_gateway(
            directory / "gateway",
            psc,
            port=gateway_port,
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            limits=limits,
            ecps=ecps,
            extra=extra,
            policies=policies,
        ) as world,
    ):
        yield world


class Browser:
    """``requests`` with a hand-kept cookie jar: the gateway's cookies are ``__Host-``/Secure, and requests
    (rightly) never sends Secure cookies over plain http, which the loopback test servers speak."""

    def __init__(self, language: str = "fr") -> None:
        self.cookies: dict[str, str] = {}
        self.language = language

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        headers = {"Accept": "text/html", "Accept-Language": self.language, **kwargs.pop("headers", {})}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = requests.request(method, url, headers=headers, allow_redirects=False, timeout=10, **kwargs)
        self._remember(response)
        return response

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", url, **kwargs)

    def follow(self, response: requests.Response, limit: int = 5) -> requests.Response:
        """Follow the gateway's own redirects (not PSC's: the test plays the phone there)."""
        for _ in range(limit):
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            response = self.get(urljoin(response.url, response.headers["Location"]))
        return response

    def _remember(self, response: requests.Response) -> None:
        for header in response.raw.headers.getlist("Set-Cookie"):
            for name, morsel in SimpleCookie(header).items():
                if morsel["max-age"] == "0" or "1970" in morsel["expires"]:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
