"""Header rules in both directions, and whom the gateway believes about the client's address."""

from __future__ import annotations

import ipaddress

from gateway.proxy.headers import (
    client_address,
    filter_request_headers,
    filter_response_headers,
    forwarded_headers,
)

LOCAL = [ipaddress.ip_network("127.0.0.0/8")]
COOKIES = frozenset({"__Host-gateway-session"})


def names(headers: list[tuple[str, str]]) -> set[str]:
    return {name.lower() for name, _ in headers}


def test_hop_by_hop_and_connection_listed_headers_are_removed() -> None:
    result = filter_request_headers(
        [("Connection", "close, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("TE", "trailers"), ("Accept", "*/*")],
        from_tls_terminator=False,
        drop_cookies=COOKIES,
    )
    assert names(result.forwardable) == {"accept"}


def test_card_headers_survive_only_from_a_tls_terminator() -> None:
    headers = [("X-SSL-Client-Cert", "pem"), ("X-SSL-Client-Verify", "SUCCESS")]
    trusted = filter_request_headers(headers, from_tls_terminator=True, drop_cookies=COOKIES)
    untrusted = filter_request_headers(headers, from_tls_terminator=False, drop_cookies=COOKIES)
    assert names(trusted.forwardable) == {"x-ssl-client-cert", "x-ssl-client-verify"}
    assert untrusted.forwardable == [] and set(untrusted.spoofed) == {
        "X-SSL-Client-Cert",
        "X-SSL-Client-Verify",
    }


def test_gateway_identity_headers_never_come_from_outside() -> None:
    result = filter_request_headers(
        [("X-Gateway-Subject", "8100"), ("x-gateway-assertion", "jwt")],
        from_tls_terminator=True,
        drop_cookies=COOKIES,
    )
    assert result.forwardable == [] and len(result.spoofed) == 2


def test_only_the_gateway_cookie_is_dropped() -> None:
    result = filter_request_headers(
        [("Cookie", "a=1; __Host-gateway-session=secret; b=2")],
        from_tls_terminator=False,
        drop_cookies=COOKIES,
    )
    assert result.forwardable == [("Cookie", "a=1; b=2")]


def test_response_connection_listed_and_fixating_cookies_are_removed() -> None:
    kept = filter_response_headers(
        [
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "__Host-gateway-session=x; Path=/"),
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
