from __future__ import annotations

from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.authn.card.headers import (
    CLIENT_CERT_HEADER,
    CLIENT_VERIFY_HEADER,
    client_certificate_from_headers,
    parse_networks,
)
from gateway.devtools.pki import DevPki
from tests.support.pki import software_card

TRUSTED = parse_networks(["127.0.0.1/32", "10.0.0.0/8", "::1"])


def _nginx_escaped(cert: x509.Certificate) -> str:
    # $ssl_client_escaped_cert: the PEM, URL-encoded (newlines %0A, '+' and '/' and '=' escaped)
    return quote(cert.public_bytes(serialization.Encoding.PEM).decode(), safe="")


def test_trusted_hop_certificate_is_decoded(dev_pki: DevPki) -> None:
    cert = software_card(dev_pki)
    headers = {CLIENT_CERT_HEADER: _nginx_escaped(cert), CLIENT_VERIFY_HEADER: "SUCCESS"}
    result = client_certificate_from_headers(headers, "127.0.0.1", TRUSTED)
    assert not result.spoofed
    assert result.terminator_verify == "SUCCESS"
    assert result.certificate is not None
    assert x509.load_pem_x509_certificate(result.certificate) == cert


def test_plus_signs_survive_when_nginx_leaves_them_unescaped(dev_pki: DevPki) -> None:
    cert = software_card(dev_pki)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    headers = {CLIENT_CERT_HEADER: quote(pem, safe="+/=")}
    result = client_certificate_from_headers(headers, "10.1.2.3", TRUSTED)
    assert result.certificate is not None
    assert x509.load_pem_x509_certificate(result.certificate) == cert


def test_forged_header_from_untrusted_address_is_not_trusted(dev_pki: DevPki) -> None:
    headers = {CLIENT_CERT_HEADER: _nginx_escaped(software_card(dev_pki)), CLIENT_VERIFY_HEADER: "SUCCESS"}
    for peer in ("192.0.2.10", "::ffff:192.0.2.10", "2001:db8::1", "", None, "not-an-ip"):
        result = client_certificate_from_headers(headers, peer, TRUSTED)
        assert result.certificate is None
        assert result.spoofed


def test_forged_verify_header_alone_counts_as_spoofing() -> None:
    result = client_certificate_from_headers({"x-ssl-client-verify": "SUCCESS"}, "192.0.2.10", TRUSTED)
    assert result.spoofed and result.certificate is None


def test_no_header_is_neither_certificate_nor_spoofing() -> None:
    for peer in ("192.0.2.10", "127.0.0.1"):
        result = client_certificate_from_headers({}, peer, TRUSTED)
        assert result.certificate is None and not result.spoofed


def test_ipv4_mapped_trusted_peer_and_lowercase_header(dev_pki: DevPki) -> None:
    headers = {"x-ssl-client-cert": _nginx_escaped(software_card(dev_pki))}
    assert client_certificate_from_headers(headers, "::ffff:127.0.0.1", TRUSTED).certificate is not None
    assert client_certificate_from_headers(headers, "::1", TRUSTED).certificate is not None


def test_empty_header_from_trusted_hop_means_no_certificate() -> None:
    # nginx sends an empty value when the client presented no certificate
    result = client_certificate_from_headers(
        {CLIENT_CERT_HEADER: "", CLIENT_VERIFY_HEADER: "NONE"}, "127.0.0.1", TRUSTED
    )
    assert result.certificate is None and not result.spoofed and result.terminator_verify == "NONE"
