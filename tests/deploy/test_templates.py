"""The shipped nginx templates clear, in every location that proxies, the headers the gateway's proxy mode
drops (gateway/proxy/headers.py): nginx cannot clear headers by prefix, so the names are listed in both places,
and this keeps them in step. What actually reaches the portal is proven in test_parity.py."""

from __future__ import annotations

import re

import pytest

from gateway.authn.card.headers import CARD_HEADERS_CLEARED_HEADER, CARD_HOST_SECRET_HEADER
from gateway.devtools.card_host import TEMPLATE as CARD_LOGIN_TEMPLATE
from gateway.proxy.headers import (
    CLIENT_CERT_HEADER_NAMES,
    FORWARDED_HEADERS,
    GATEWAY_HEADER_NAMES,
    HOP_BY_HOP,
    OTHER_CLIENT_CERT_HEADER_NAMES,
    REQUEST_ID_HEADER,
    ROUTING_OVERRIDE_HEADERS,
)
from tests.support.nginx import FORWARD_AUTH_TEMPLATE

CARD_HEADERS = {name.lower() for name in (*CLIENT_CERT_HEADER_NAMES, CARD_HOST_SECRET_HEADER)}
GATEWAY_HEADER_NAMES_LOWER = {name.lower() for name in GATEWAY_HEADER_NAMES}
OTHER_CLIENT_CERT_HEADERS = {name.lower() for name in OTHER_CLIENT_CERT_HEADER_NAMES}
#: Hop-by-hop request headers nginx drops by itself (ngx_http_proxy_module's defaults and `Connection ""`);
#: the others it would pass on, so the template clears them (Proxy-Authenticate is a response header).
NGINX_DROPS = {"connection", "keep-alive", "te", "transfer-encoding", "upgrade", "proxy-authenticate"}


def locations(text: str) -> dict[str, str]:
    """``location`` name -> its block (nested blocks included), comments removed."""
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    blocks = {}
    for match in re.finditer(r"location\s+([^{]+?)\s*\{", code):
        depth, end = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(code[end], 0)
            end += 1
        blocks[match.group(1)] = code[match.end() : end - 1]
    return blocks


def set_headers(block: str) -> dict[str, str]:
    """proxy_set_header name (lower-case) -> value, as written."""
    return {
        name.lower(): value.strip()
        for name, value in re.findall(r"proxy_set_header\s+(\S+)\s+([^;]*);", block)
    }


FORWARD_AUTH = locations(FORWARD_AUTH_TEMPLATE.read_text())
CARD_LOGIN = locations(CARD_LOGIN_TEMPLATE.read_text())


def test_the_portal_location_clears_every_header_proxy_mode_drops() -> None:
    sent = set_headers(FORWARD_AUTH["/"])
    must_be_cleared = (
        {name.lower() for name in (*GATEWAY_HEADER_NAMES, *CLIENT_CERT_HEADER_NAMES)}
        | {CARD_HOST_SECRET_HEADER.lower(), CARD_HEADERS_CLEARED_HEADER.lower()}
        | ROUTING_OVERRIDE_HEADERS
        | FORWARDED_HEADERS
        | OTHER_CLIENT_CERT_HEADERS
        | (HOP_BY_HOP - NGINX_DROPS)
        | {REQUEST_ID_HEADER, "cookie", "host"}
    )
    assert sorted(must_be_cleared - set(sent)) == []
    identity = {"x-gateway-subject", "x-gateway-auth-method", "x-gateway-professions", "x-gateway-auth-time"}
    always_empty = (
        (GATEWAY_HEADER_NAMES_LOWER - identity - {"x-gateway-assertion"})
        | CARD_HEADERS
        | OTHER_CLIENT_CERT_HEADERS
        | ROUTING_OVERRIDE_HEADERS
        | (HOP_BY_HOP - NGINX_DROPS)
        | (FORWARDED_HEADERS - {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"})
    )
    for name in always_empty:
        assert sent[name] == '""', name
    assert sent[REQUEST_ID_HEADER] == "$request_id"
    assert sent["cookie"] == "$cps_portal_cookie"


@pytest.mark.parametrize(
    ("template", "location"),
    [(FORWARD_AUTH, name) for name in FORWARD_AUTH] + [(CARD_LOGIN, name) for name in CARD_LOGIN],
)
def test_every_other_location_that_proxies_clears_the_card_headers(
    template: dict[str, str], location: str
) -> None:
    block = template[location]
    if "proxy_pass" not in block or "proxy_pass_request_headers off" in block:
        return
    sent = set_headers(block)
    if template is CARD_LOGIN and location in ("= /.gateway/login/card", "@card_login"):
        assert sent["x-ssl-client-cert"] == "$ssl_client_escaped_cert"
        assert sent[CARD_HOST_SECRET_HEADER.lower()] == '"${CARD_HOST_SECRET}"'
        return
    assert {name: sent.get(name) for name in CARD_HEADERS} == dict.fromkeys(CARD_HEADERS, '""')


def test_the_decision_request_carries_only_what_the_decision_depends_on() -> None:
    block = FORWARD_AUTH["= /_cps_gateway_auth"]
    assert "proxy_pass_request_headers off" in block
    sent = set_headers(block)
    assert sent["x-gateway-session"] == "$cps_gateway_session"
    assert sent["x-original-uri"] == "$request_uri"
    key = re.search(r'proxy_cache_key\s+"([^"]+)"', block)
    assert key is not None
    # Every input of the decision that varies per request is part of the cache key.
    assert key.group(1) == "$cps_gateway_session|$request_method|$host|$request_uri"
