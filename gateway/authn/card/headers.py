"""The client certificate forwarded by the card-login host's nginx, believed only when that host vouches for it.

nginx sends ``X-SSL-Client-Cert: $ssl_client_escaped_cert`` (URL-encoded PEM) and
``X-SSL-Client-Verify: $ssl_client_verify``. Anyone can send these headers, and a certificate is public data
(sent in clear by TLS 1.2 client authentication, kept by every server a card logged into): a header naming it
proves nothing. So the headers count only when the request provably came through the card-login host:

- its Host is the one of ``card.login_origin`` (nginx's card server block sends ``Host $host``),
- the TCP peer is in ``server.tls_terminators``,
- and it carries ``X-Card-Host-Secret``, which only the card server block adds, equal (compared in constant
  time) to ``card.host_secret``.

The address alone is not enough: one nginx often serves the card host AND the main host, and then both
connect from the same address. Otherwise the headers are reported as spoofed, so the caller strips them and
audits Reason.SPOOFED_HEADER. The gateway verifies the certificate itself in every case (nginx runs with
``optional_no_ca``: its verdict is informative only).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from werkzeug.datastructures import Headers

from gateway.wsgi import normalise_host

CLIENT_CERT_HEADER = "X-SSL-Client-Cert"
CLIENT_VERIFY_HEADER = "X-SSL-Client-Verify"
#: Added by the card-login host's nginx only; proves the request came through it.
CARD_HOST_SECRET_HEADER = "X-Card-Host-Secret"  # noqa: S105 - a header name, not a secret
#: Set by the main host's nginx (shipped templates) when it cleared card headers a client sent: the gateway
#: never sees those headers, so this is how the attempt reaches the audit trail.
CARD_HEADERS_CLEARED_HEADER = "X-Card-Headers-Cleared"
#: Every header a TLS terminator may set about the client certificate (all X-SSL-Client-* are treated alike).
CLIENT_CERT_HEADER_PREFIX = "x-ssl-client-"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ForwardedCertificate:
    #: PEM bytes of the client certificate, when the card host vouched for the request and sent one.
    certificate: bytes | None
    #: Card headers came without the card host's word: strip them, audit SPOOFED_HEADER.
    spoofed: tuple[str, ...] = ()
    #: nginx's own verdict (``SUCCESS``, ``NONE``, ``FAILED:<reason>``), informative only.
    terminator_verify: str | None = None


@dataclass(frozen=True, slots=True)
class CardHost:
    """Who speaks for the card-login host: its Host name, the addresses its nginx connects from, its secret."""

    host: str
    terminators: tuple[IpNetwork, ...]
    secret: bytes

    def vouches(self, peer: str | None, host_header: str | None, presented_secret: str | None) -> bool:
        """The request came through the card-login host (all three conditions, see the module docstring)."""
        if presented_secret is None or not is_trusted_peer(peer, self.terminators):
            return False
        if normalise_host(host_header or "") != self.host:
            return False
        return hmac.compare_digest(presented_secret.encode("utf-8", "replace"), self.secret)


def parse_networks(networks: Iterable[str]) -> tuple[IpNetwork, ...]:
    """``["127.0.0.1/32", "::1"]`` -> networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(network, strict=True) for network in networks)


def is_card_header(name: str) -> bool:
    """A header only the card-login host's nginx may send (client certificate, its secret, the cleared flag)."""
    lower = name.lower()
    return lower.startswith(CLIENT_CERT_HEADER_PREFIX) or lower in _OTHER_CARD_HEADERS


_OTHER_CARD_HEADERS = frozenset({CARD_HOST_SECRET_HEADER.lower(), CARD_HEADERS_CLEARED_HEADER.lower()})


def is_trusted_peer(remote_addr: str | None, trusted_networks: Sequence[IpNetwork]) -> bool:
    if not remote_addr:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted_networks)


def client_certificate_from_headers(
    headers: Headers, peer: str | None, card_host: CardHost | None
) -> ForwardedCertificate:
    """The forwarded client certificate, or None; ``spoofed`` names card headers the card host did not vouch for."""
    verify = headers.get(CLIENT_VERIFY_HEADER)
    vouched = card_host is not None and card_host.vouches(
        peer, headers.get("Host"), headers.get(CARD_HOST_SECRET_HEADER)
    )
    if not vouched:
        return ForwardedCertificate(
            None, spoofed=tuple(sorted(name for name, _ in headers.items() if is_card_header(name)))
        )
    raw = headers.get(CLIENT_CERT_HEADER)
    if not raw or not raw.strip():
        return ForwardedCertificate(None, terminator_verify=verify)
    # unquote, not unquote_plus: '+' is a base64 character, nginx escapes spaces as %20.
    pem = unquote(raw.strip()).encode("ascii", "replace")
    return ForwardedCertificate(pem, terminator_verify=verify)
