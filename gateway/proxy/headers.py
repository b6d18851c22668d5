"""Which headers cross the gateway, in each direction, and who is the client.

Spoof-resistant by default: identity headers the gateway sets are always removed from requests, card
headers only survive when the card-login host vouches for them, X-Forwarded-* and X-Request-Id are the
gateway's own, and headers that let an upstream route on another path than the one the policy judged are
never forwarded. The gateway's cookies never reach the portal, the portal cannot set them, and its redirects
(and Content-Location) to its own internal origin become paths on the public one.

The shipped forward-auth nginx template (deploy/nginx/forward-auth.conf) clears the same headers: nginx
cannot drop headers by prefix, so it names them (``CLIENT_CERT_HEADER_NAMES``, ``GATEWAY_HEADER_NAMES``, and the
sets below); tests/deploy/test_templates.py keeps the lists and the template in step. An X-SSL-Client-* name
outside ``CLIENT_CERT_HEADER_NAMES`` would still reach the portal through nginx: the list holds every name the
known TLS terminators set and portals read; a portal reading another one must have it added here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit, urlunsplit

from gateway.authn.card.headers import CLIENT_CERT_HEADER_PREFIX, is_card_header

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
#: The X-Gateway-* headers the gateway or its nginx templates use, which a client must never choose.
GATEWAY_HEADER_NAMES = (
    "X-Gateway-Subject",
    "X-Gateway-Auth-Method",
    "X-Gateway-Professions",
    "X-Gateway-Auth-Time",
    "X-Gateway-Assertion",
    "X-Gateway-Rule",
    "X-Gateway-Reason",
    "X-Gateway-Login",
    "X-Gateway-Cacheable",
    "X-Gateway-Session",
    "X-Gateway-Decision",
    "X-Gateway-Retry-After",
    "X-Gateway-Session-Ended",
)
#: Client-certificate headers in use by TLS terminators (nginx, Apache, HAProxy, Traefik): the gateway drops
#: every X-SSL-Client-*; nginx clears these by name.
CLIENT_CERT_HEADER_NAMES = (
    "X-SSL-Client-Cert",
    "X-SSL-Client-Verify",
    "X-SSL-Client-Escaped-Cert",
    "X-SSL-Client-Raw-Cert",
    "X-SSL-Client-DN",
    "X-SSL-Client-S-DN",
    "X-SSL-Client-I-DN",
    "X-SSL-Client-CN",
    "X-SSL-Client-SAN",
    "X-SSL-Client-Serial",
    "X-SSL-Client-Fingerprint",
    "X-SSL-Client-SHA1",
    "X-SSL-Client-V-Start",
    "X-SSL-Client-V-End",
    "X-SSL-Client-V-Remain",
    "X-SSL-Client-Used",
    "X-SSL-Client-Not-Before",
    "X-SSL-Client-Not-After",
    "X-SSL-Client-NotBefore",
    "X-SSL-Client-NotAfter",
    "X-SSL-Client-Subject",
    "X-SSL-Client-Issuer",
    "X-SSL-Client-Email",
    "X-SSL-Client-Chain",
    "X-SSL-Client-Cert-Chain",
    "X-SSL-Client-Certificate",
    "X-SSL-Client-Verified",
    "X-SSL-Client-Session-Id",
)
#: Client-certificate headers of other TLS terminators and standards (Traefik, Envoy/Istio, IIS ARR, AWS ALB,
#: RFC 9440 and common hand-written configurations). The gateway reads none of them (the card-login host
#: speaks X-SSL-Client-* only) and forwards none of them, from anyone: a portal reading one would otherwise
#: take a client's word for a certificate.
OTHER_CLIENT_CERT_HEADER_NAMES = (
    "Client-Cert",
    "Client-Cert-Chain",
    "X-Forwarded-Client-Cert",
    "X-Forwarded-Tls-Client-Cert",
    "X-Forwarded-Tls-Client-Cert-Info",
    "X-ARR-ClientCert",
    "X-Client-Cert",
    "X-Client-Certificate",
    "X-Client-Cert-Chain",
    "X-Client-Verify",
    "X-Client-DN",
    "X-SSL-Cert",
    "X-SSL-Verify",
    "X-SSL-Subject",
    "X-SSL-Issuer",
    "SSL-Client-Cert",
    "SSL-Client-Verify",
    "X-Amzn-Mtls-Clientcert",
    "X-Amzn-Mtls-Clientcert-Leaf",
    "X-Amzn-Mtls-Clientcert-Serial-Number",
    "X-Amzn-Mtls-Clientcert-Issuer",
    "X-Amzn-Mtls-Clientcert-Subject",
    "X-Amzn-Mtls-Clientcert-Validity",
)
_OTHER_CLIENT_CERT_HEADERS = frozenset(name.lower() for name in OTHER_CLIENT_CERT_HEADER_NAMES)
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
        "x-host",
        "x-original-host",
        "x-forwarded-server",
    }
)
#: Rebuilt by forwarded_headers() from what the gateway saw; the client's are dropped (with the client-address
#: and scheme headers some frameworks read instead).
FORWARDED_HEADERS = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-forwarded",
        "forwarded-for",
        "x-original-forwarded-for",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
        "x-envoy-external-address",
        "x-azure-clientip",
    }
)
#: The gateway's own id for the request (the one in the audit trail): the client's is never forwarded.
REQUEST_ID_HEADER = "x-request-id"
_SET_BY_THE_GATEWAY = FORWARDED_HEADERS | {"host", "content-length", REQUEST_ID_HEADER}


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
    card_host_vouched: bool,
    drop_cookies: frozenset[str],
) -> IncomingHeaders:
    """``card_host_vouched``: the card-login host sent this request (authn/card/headers.py), so its
    client-certificate headers are real; its secret is never forwarded. ``drop_cookies``: lower-case names."""
    items = list(headers)
    connection_listed = _connection_listed(items)
    forwardable: list[tuple[str, str]] = []
    spoofed: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_listed or lower in ROUTING_OVERRIDE_HEADERS:
            continue
        if lower in _OTHER_CLIENT_CERT_HEADERS:
            continue
        if lower in _SET_BY_THE_GATEWAY:
            continue  # Host and Content-Length by the forwarding code, the others rebuilt from what it saw
        if lower.startswith(GATEWAY_HEADER_PREFIX):
            spoofed.append(name)
            continue
        if is_card_header(lower):
            if not card_host_vouched:
                spoofed.append(name)
                continue
            if not lower.startswith(CLIENT_CERT_HEADER_PREFIX):
                continue  # the card host's secret stays between it and the gateway
        if lower == "cookie" and drop_cookies:
            value = without_cookies(value, drop_cookies)
            if not value:
                continue
        forwardable.append((name, value))
    return IncomingHeaders(forwardable, tuple(spoofed))


def without_cookies(header: str, names: frozenset[str]) -> str:
    """The Cookie header minus the gateway's cookies (``names`` lower-case): the portal never sees a gateway
    session id, however the client wrote it (any case, blanks around the name) and however its Cookie headers
    were joined (``;`` by clients, ``,`` by gunicorn when a client sends several)."""
    lowered = header.lower()
    if not any(name in lowered for name in names):
        return header
    kept = []
    for part in header.split(";"):
        pairs = part.split(",")
        gateway_pairs = [pair for pair in pairs if pair.split("=", 1)[0].strip().lower() in names]
        if gateway_pairs:
            part = ",".join(pair for pair in pairs if pair not in gateway_pairs)
        if part.strip():
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


@dataclass(frozen=True, slots=True)
class PortalOrigin:
    """The portal's internal origin (upstream.url): its redirects there are rewritten onto the public host."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> PortalOrigin:
        split = urlsplit(url)
        return cls(split.scheme, (split.hostname or "").lower(), split.port or _DEFAULT_PORTS[split.scheme])

    def public_location(self, location: str) -> str:
        """``location`` as the browser should see it: a URL on this internal origin becomes a path (on the
        public origin the browser is on); any other value is returned as it is."""
        try:
            split = urlsplit(location.strip())
            port = split.port
        except ValueError:
            return location
        if not split.netloc or split.scheme not in ("", self.scheme):
            return location
        if (split.hostname or "").lower() != self.host or (port or _DEFAULT_PORTS[self.scheme]) != self.port:
            return location
        return urlunsplit(("", "", split.path or "/", split.query, split.fragment))


_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Response headers holding a URL the portal may write on its internal origin.
_NAMING_THE_PORTAL = frozenset({"location", "content-location"})


def filter_response_headers(
    headers: Iterable[tuple[str, str]],
    *,
    protected_cookies: frozenset[str],
    portal_origin: PortalOrigin | None = None,
) -> list[tuple[str, str]]:
    """``protected_cookies``: lower-case names the portal may not set."""
    items = list(headers)
    connection_listed = _connection_listed(items)
    kept = []
    for name, value in items:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_listed:
            continue
        if lower == "set-cookie" and _sets_protected_cookie(value, protected_cookies):
            continue  # the portal may not overwrite (fixate) the gateway's session
        if lower in _NAMING_THE_PORTAL and portal_origin is not None:
            value = portal_origin.public_location(value)
        kept.append((name, value))
    return kept


def _sets_protected_cookie(set_cookie: str, names: frozenset[str]) -> bool:
    name = set_cookie.split("=", 1)[0].strip().lower()
    if name in names:
        return True
    try:
        parsed = SimpleCookie(set_cookie)
    except CookieError:
        return False
    return any(key.lower() in names for key in parsed)
