"""Header rules in both directions, and whom the gateway believes about the client's address."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.proxy.headers import (
    PortalOrigin,
    client_address,
    filter_request_headers,
    filter_response_headers,
    forwarded_headers,
    without_cookies,
)

LOCAL = [ipaddress.ip_network("127.0.0.0/8")]
COOKIES = frozenset({"__host-gateway-session", "__host-gateway-login"})


def names(headers: list[tuple[str, str]]) -> set[str]:
    return {name.lower() for name, _ in headers}


def test_hop_by_hop_and_connection_listed_headers_are_removed() -> None:
    result = filter_request_headers(
        [("Connection", "close, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("TE", "trailers"), ("Accept", "*/*")],
        card_host_vouched=False,
        drop_cookies=COOKIES,
    )
    assert names(result.forwardable) == {"accept"}


def test_card_headers_survive_only_when_the_card_host_vouches_and_its_secret_never() -> None:
    headers = [("X-SSL-Client-Cert", "pem"), ("X-SSL-Client-S-DN", "CN=x"), ("X-Card-Host-Secret", "s")]
    trusted = filter_request_headers(headers, card_host_vouched=True, drop_cookies=COOKIES)
    untrusted = filter_request_headers(headers, card_host_vouched=False, drop_cookies=COOKIES)
    assert names(trusted.forwardable) == {"x-ssl-client-cert", "x-ssl-client-s-dn"}
    assert trusted.spoofed == ()
    assert untrusted.forwardable == []
    assert set(untrusted.spoofed) == {"X-SSL-Client-Cert", "X-SSL-Client-S-DN", "X-Card-Host-Secret"}


def test_the_client_request_id_and_forwarding_facts_are_the_gateways() -> None:
    headers = [("X-Request-Id", "chosen"), ("X-Real-IP", "1.2.3.4"), ("X-Forwarded-Port", "443"), ("A", "1")]
    result = filter_request_headers(headers, card_host_vouched=False, drop_cookies=COOKIES)
    assert result.forwardable == [("A", "1")]


def test_gateway_identity_headers_never_come_from_outside() -> None:
    result = filter_request_headers(
        [("X-Gateway-Subject", "8100"), ("x-gateway-assertion", "jwt")],
        card_host_vouched=True,
        drop_cookies=COOKIES,
    )
    assert result.forwardable == [] and len(result.spoofed) == 2


def test_only_the_gateway_cookie_is_dropped() -> None:
    result = filter_request_headers(
        [("Cookie", "a=1; __Host-gateway-session=secret; b=2")],
        card_host_vouched=False,
        drop_cookies=COOKIES,
    )
    assert result.forwardable == [("Cookie", "a=1; b=2")]


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        # several Cookie headers, joined by gunicorn with ","
        ("a=1,__Host-gateway-session=secret", "a=1"),
        ("__Host-gateway-session=secret,a=1; b=2", "a=1; b=2"),
        # any case, blanks around the name, both gateway cookies, repeated
        ("__host-gateway-SESSION=s; \t__Host-gateway-login =l; __Host-gateway-session=t", ""),
        # a portal value holding a comma is left as it is
        ("prefs=a,b; __Host-gateway-login=l", "prefs=a,b"),
        ("no=gateway,cookie", "no=gateway,cookie"),
    ],
)
def test_the_gateway_cookies_never_pass_however_they_are_written(header: str, kept: str) -> None:
    assert without_cookies(header, COOKIES) == kept


def test_response_connection_listed_and_fixating_cookies_are_removed() -> None:
    kept = filter_response_headers(
        [
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "__Host-gateway-session=x; Path=/"),
            ("Set-Cookie", " __host-gateway-LOGIN =x; Secure"),
            ("Set-Cookie", "portal=1"),
        ],
        protected_cookies=COOKIES,
    )
    assert kept == [("Set-Cookie", "portal=1")]


def test_client_address_behind_trusted_proxies() -> None:
    assert client_address("127.0.0.1", "203.0.113.7, 127.0.0.2", LOCAL) == "203.0.113.7"
    assert client_address("198.51.100.1", "203.0.113.7", LOCAL) == "198.51.100.1"
    assert client_address("127.0.0.1", "garbage", LOCAL) == "127.0.0.1"
    assert client_address("127.0.0.1", None, LOCAL) == "127.0.0.1"


def test_forwarded_headers_extend_a_trusted_chain_and_replace_an_untrusted_one() -> None:
    incoming = {
        "x-forwarded-for": "203.0.113.7",
        "x-forwarded-proto": "https",
        "x-forwarded-host": "portal.fr",
    }
    trusted = dict(
        forwarded_headers(incoming, peer="127.0.0.1", scheme="http", host="gw", from_trusted_proxy=True)
    )
    untrusted = dict(
        forwarded_headers(incoming, peer="198.51.100.1", scheme="http", host="gw", from_trusted_proxy=False)
    )
    assert trusted == {
        "X-Forwarded-For": "203.0.113.7, 127.0.0.1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "portal.fr",
    }
    assert untrusted == {
        "X-Forwarded-For": "198.51.100.1",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "gw",
    }


@pytest.mark.parametrize(
    ("location", "seen"),
    [
        ("http://portal.internal:8081/account?x=1#f", "/account?x=1#f"),
        ("HTTP://Portal.Internal:8081", "/"),
        ("//portal.internal:8081/a", "/a"),
        ("http://portal.internal/a", "http://portal.internal/a"),  # another port: another origin
        ("https://portal.internal:8081/a", "https://portal.internal:8081/a"),
        ("https://elsewhere.example/a", "https://elsewhere.example/a"),
        ("/relative", "/relative"),
        ("http://portal.internal:notaport/a", "http://portal.internal:notaport/a"),
    ],
)
def test_portal_redirects_to_its_internal_origin_become_paths(location: str, seen: str) -> None:
    origin = PortalOrigin.of("http://portal.internal:8081")
    kept = filter_response_headers([("Location", location)], protected_cookies=COOKIES, portal_origin=origin)
    assert kept == [("Location", seen)]
    named = filter_response_headers(
        [("Content-Location", location)], protected_cookies=COOKIES, portal_origin=origin
    )
    assert named == [("Content-Location", seen)]
    assert PortalOrigin.of("http://portal.internal").public_location("http://portal.internal:80/b") == "/b"
