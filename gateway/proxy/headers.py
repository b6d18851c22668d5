"""Which headers cross the gateway, in each direction, and who is the client.

Spoof-resistant by default: identity headers the gateway sets are always removed from requests, card
headers only survive from a trusted TLS terminator, X-Forwarded-* only from trusted proxies, and headers
that let an upstream route on another path than the one the policy judged are never forwarded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
GATEWAY_HEADER_PREFIX = "x-gateway-"
CLIENT_CERT_HEADER_PREFIX = "x-ssl-client-"
#: Headers some frameworks route on instead of the request line (each an oauth2-proxy/nginx bypass).
ROUTING_OVERRIDE_HEADERS = frozenset(
    {
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-forwarded-uri",
        "x-forwarded-path",
        "x-forwarded-prefix",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "forwarded",
    }
)
FORWARDED_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"})


def _connection_listed(headers: list[tuple[str, str]]) -> set[str]:
    """Header names a Connection header declares hop-by-hop (RFC 9110 7.6.1)."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }


def in_networks(address: str, networks: Sequence[Network]) -> bool:
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded_for: str | None, trusted_proxies: Sequence[Network]) -> str:
    """The client's address: the peer, or, behind trusted proxies, the nearest untrusted X-Forwarded-For hop."""
    if not forwarded_for or not in_networks(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not in_networks(hop, trusted_proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled chain: believe only the peer
    return hops[0] if hops else peer


@dataclass(frozen=True, slots=True)
class IncomingHeaders:
    """Request headers split into what may be forwarded and what was refused."""

    forwardable: list[tuple[str, str]]
    #: Names of identity / card headers that came from a hop not allowed to send them.
    spoofed: tuple[str, ...]


def filter_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    from_tls_terminator: bool,
    drop_cookies: frozenset[str],
) -> IncomingHeaders:
    items = list(headers)
    connection_listed = _connection_listed(items)
    forwardable: list[tuple[str, str]] = []
    spoofed: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_listed or lower in ROUTING_OVERRIDE_HEADERS:
            continue
        if lower == "host" or lower == "content-length":
            continue  # set by the forwarding code
        if lower.startswith(GATEWAY_HEADER_PREFIX):
            spoofed.append(name)
            continue
        if lower.startswith(CLIENT_CERT_HEADER_PREFIX) and not from_tls_terminator:
            spoofed.append(name)
            continue
        if lower in FORWARDED_HEADERS:
            continue  # rebuilt by forwarded_headers() from what the gateway saw and whom it trusts
        if lower == "cookie" and drop_cookies:
            value = _without_cookies(value, drop_cookies)
            if not value:
                continue
        forwardable.append((name, value))
    return IncomingHeaders(forwardable, tuple(spoofed))


def _without_cookies(header: str, names: frozenset[str]) -> str:
    """The Cookie header minus the gateway's own cookies: the portal never sees a gateway session id."""
    kept = []
    for part in header.split(";"):
        name = part.split("=", 1)[0].strip()
        if name and name not in names:
            kept.append(part.strip())
    return "; ".join(kept)


def forwarded_headers(
    incoming: Mapping[str, str], *, peer: str, scheme: str, host: str, from_trusted_proxy: bool
) -> list[tuple[str, str]]:
    """X-Forwarded-For/-Proto/-Host for the portal: extended when the peer is trusted, replaced otherwise."""
    if from_trusted_proxy:
        chain = incoming.get("x-forwarded-for")
        return [
            ("X-Forwarded-For", f"{chain}, {peer}" if chain else peer),
            ("X-Forwarded-Proto", incoming.get("x-forwarded-proto") or scheme),
            ("X-Forwarded-Host", incoming.get("x-forwarded-host") or host),
        ]
    return [("X-Forwarded-For", peer), ("X-Forwarded-Proto", scheme), ("X-Forwarded-Host", host)]


def filter_response_headers(
    headers: Iterable[tuple[str, str]], *, protected_cookies: frozenset[str]
) -> list[tuple[str, str]]:
    items = list(headers)
    connection_listed = _connection_listed(items)
    kept = []
    for name, value in items:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_listed:
            continue
        if lower == "set-cookie" and _sets_protected_cookie(value, protected_cookies):
            continue  # the portal may not overwrite (fixate) the gateway's session
        kept.append((name, value))
    return kept


def _sets_protected_cookie(set_cookie: str, names: frozenset[str]) -> bool:
    name = set_cookie.split("=", 1)[0].strip()
    if name in names:
        return True
    try:
        parsed = SimpleCookie(set_cookie)
    except CookieError:
        return False
    return any(key in names for key in parsed)
