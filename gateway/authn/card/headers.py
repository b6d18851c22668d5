"""The client certificate forwarded by the TLS terminator (nginx), trusted only from configured hops.

nginx sends ``X-SSL-Client-Cert: $ssl_client_escaped_cert`` (URL-encoded PEM) and
``X-SSL-Client-Verify: $ssl_client_verify``. Anyone can send these headers directly to the gateway, so they
count only when the TCP peer is a trusted terminator; otherwise their presence is reported as spoofing so the
caller strips them and audits Reason.SPOOFED_HEADER. The gateway verifies the certificate itself in every case
(nginx runs with ``optional_no_ca``: its verdict is informative only).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

CLIENT_CERT_HEADER = "X-SSL-Client-Cert"
CLIENT_VERIFY_HEADER = "X-SSL-Client-Verify"
#: Every header a TLS terminator may set about the client certificate: stripped from untrusted requests.
CLIENT_CERT_HEADERS = (CLIENT_CERT_HEADER, CLIENT_VERIFY_HEADER)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ForwardedCertificate:
    #: PEM bytes of the client certificate, when a trusted hop forwarded one.
    certificate: bytes | None
    #: A client-certificate header came from an untrusted peer (strip it, audit SPOOFED_HEADER).
    spoofed: bool = False
    #: nginx's own verdict (``SUCCESS``, ``NONE``, ``FAILED:<reason>``), informative only.
    terminator_verify: str | None = None


def parse_networks(networks: Iterable[str]) -> tuple[IpNetwork, ...]:
    """``["127.0.0.1/32", "::1"]`` -> networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(network, strict=True) for network in networks)


def _get(headers: Mapping[str, str], name: str) -> str | None:
    # Werkzeug's EnvironHeaders is case-insensitive; a plain dict may not be.
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


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
    headers: Mapping[str, str], remote_addr: str | None, trusted_networks: Sequence[IpNetwork]
) -> ForwardedCertificate:
    """The forwarded client certificate, or None; ``spoofed`` when an untrusted peer sent the header."""
    raw = _get(headers, CLIENT_CERT_HEADER)
    verify = _get(headers, CLIENT_VERIFY_HEADER)
    if not is_trusted_peer(remote_addr, trusted_networks):
        return ForwardedCertificate(None, spoofed=raw is not None or verify is not None)
    if not raw or not raw.strip():
        return ForwardedCertificate(None, terminator_verify=verify)
    # unquote, not unquote_plus: '+' is a base64 character, nginx escapes spaces as %20.
    pem = unquote(raw.strip()).encode("ascii", "replace")
    return ForwardedCertificate(pem, terminator_verify=verify)
