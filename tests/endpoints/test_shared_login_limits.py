"""Two gateway processes on one Redis enforce ONE login budget: request rate, failure count, bans."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.authn.card.handoff import new_binding, reference_of
from gateway.devtools.pki import DevPki
from tests.support.card_stack import card_host_headers, card_settings
from tests.support.gateways import running_gateways
from tests.support.pki import software_card
from tests.support.redis import RedisServer

CARD_ORIGIN = "https://card.example:8443"


@pytest.fixture
def two_gateways(
    tmp_path: Path, upstream_url: str, assertion_key: Path, dev_pki: DevPki
) -> Iterator[list[str]]:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    extra = {
        # The test plays the TLS terminator: it sends the card header itself.
        "server": {"tls_terminators": ["127.0.0.1/32"], "workers": 2, "threads": 4},
        "sessions": {"store": redis.url},
        "card": card_settings(dev_pki, CARD_ORIGIN),
        "limits": {"login_requests_per_ip": "8/minute", "ban_after": 3},
    }
    try:
        with running_gateways(
            tmp_path, 2, upstream_url=upstream_url, assertion_key=assertion_key, extra=extra
        ) as urls:
            yield urls
    finally:
        redis.stop()


def test_failures_on_one_instance_ban_on_the_other(two_gateways: list[str], dev_pki: DevPki) -> None:
    expired = software_card(dev_pki, variant="expired").public_bytes(Encoding.PEM)
    header = {**card_host_headers(expired, CARD_ORIGIN), "Accept": "text/html"}
    # The card host's URL as /.gateway/card/start builds it (the browser binding's reference in it).
    login = f"/.gateway/login/card?binding={reference_of(new_binding())}"
    reasons = [
        requests.get(two_gateways[n % 2] + login, headers=header, timeout=5).headers["X-Gateway-Reason"]
        for n in range(4)
    ]
    assert reasons == ["card_expired"] * 3 + ["banned"]


def test_the_request_rate_is_one_budget(two_gateways: list[str]) -> None:
    statuses = [
        requests.post(f"{two_gateways[n % 2]}/.gateway/card/challenge", json={}, timeout=5).status_code
        for n in range(9)
    ]
    assert statuses == [200] * 8 + [429]
