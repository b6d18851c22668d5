"""Client-certificate headers count only when the card-login host vouches for the request: its Host, a TLS
terminator's address AND the card host secret."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from werkzeug.datastructures import Headers

from gateway.authn.card.headers import (
    CARD_HOST_SECRET_HEADER,
    CLIENT_CERT_HEADER,
    CLIENT_VERIFY_HEADER,
    CardHost,
    client_certificate_from_headers,
    parse_networks,
)
from gateway.devtools.pki import DevPki
from tests.support.pki import software_card

SECRET = "9f" * 32
CARD_HOST = CardHost(
    "carte.portail.test", parse_networks(["127.0.0.1/32", "10.0.0.0/8", "::1"]), SECRET.encode()
)


def _nginx_escaped(cert: x509.Certificate) -> str:
    # $ssl_client_escaped_cert: the PEM, URL-encoded (newlines %0A, '+' and '/' and '=' escaped)
    return quote(cert.public_bytes(serialization.Encoding.PEM).decode(), safe="")


def _from_card_host(**headers: str) -> Headers:
    return Headers({"Host": "carte.portail.test", CARD_HOST_SECRET_HEADER: SECRET, **headers})


def test_the_card_hosts_certificate_is_decoded(dev_pki: DevPki) -> None:
    cert = software_card(dev_pki)
    headers = _from_card_host(**{CLIENT_CERT_HEADER: _nginx_escaped(cert), CLIENT_VERIFY_HEADER: "SUCCESS"})
    result = client_certificate_from_headers(headers, "127.0.0.1", CARD_HOST)
    assert not result.spoofed
    assert result.terminator_verify == "SUCCESS"
    assert result.certificate is not None
    assert x509.load_pem_x509_certificate(result.certificate) == cert


def test_plus_signs_survive_when_nginx_leaves_them_unescaped(dev_pki: DevPki) -> None:
    cert = software_card(dev_pki)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    headers = _from_card_host(**{CLIENT_CERT_HEADER: quote(pem, safe="+/=")})
    result = client_certificate_from_headers(headers, "10.1.2.3", CARD_HOST)
    assert result.certificate is not None
    assert x509.load_pem_x509_certificate(result.certificate) == cert


@pytest.mark.parametrize(
    ("peer", "host", "secret"),
    [
        # the main host, from the very nginx that also serves the card host, even with the secret
        ("127.0.0.1", "portail.test", SECRET),
        # the card host's name and address without the secret, or with another one
        ("127.0.0.1", "carte.portail.test", None),
        ("127.0.0.1", "carte.portail.test", ""),
        ("127.0.0.1", "carte.portail.test", "9f" * 31 + "9e"),
        ("127.0.0.1", "carte.portail.test", SECRET[:-1]),
        # everything right but the address
        ("192.0.2.10", "carte.portail.test", SECRET),
        ("::ffff:192.0.2.10", "carte.portail.test", SECRET),
        ("2001:db8::1", "carte.portail.test", SECRET),
        ("", "carte.portail.test", SECRET),
        (None, "carte.portail.test", SECRET),
        ("not-an-ip", "carte.portail.test", SECRET),
        # no Host, or a malformed one
        ("127.0.0.1", None, SECRET),
        ("127.0.0.1", "carte.portail.test/x", SECRET),
    ],
)
def test_a_certificate_header_without_the_card_hosts_word_is_spoofed(
    dev_pki: DevPki, peer: str | None, host: str | None, secret: str | None
) -> None:
    headers = Headers(
        {CLIENT_CERT_HEADER: _nginx_escaped(software_card(dev_pki)), CLIENT_VERIFY_HEADER: "SUCCESS"}
    )
    if host is not None:
        headers["Host"] = host
    if secret is not None:
        headers[CARD_HOST_SECRET_HEADER] = secret
    result = client_certificate_from_headers(headers, peer, CARD_HOST)
    assert result.certificate is None
    assert CLIENT_CERT_HEADER in result.spoofed
    assert (CARD_HOST_SECRET_HEADER in result.spoofed) == (secret is not None)


def test_without_a_card_section_no_certificate_is_believed(dev_pki: DevPki) -> None:
    headers = _from_card_host(**{CLIENT_CERT_HEADER: _nginx_escaped(software_card(dev_pki))})
    result = client_certificate_from_headers(headers, "127.0.0.1", None)
    assert result.certificate is None and result.spoofed


def test_forged_verify_header_alone_counts_as_spoofing() -> None:
    result = client_certificate_from_headers(
        Headers({"x-ssl-client-verify": "SUCCESS"}), "192.0.2.10", CARD_HOST
    )
    assert result.spoofed == ("x-ssl-client-verify",) and result.certificate is None


def test_the_flag_of_cleared_card_headers_is_reported_as_spoofing() -> None:
    result = client_certificate_from_headers(Headers({"X-Card-Headers-Cleared": "1"}), "127.0.0.1", CARD_HOST)
    assert result.spoofed == ("X-Card-Headers-Cleared",)


def test_no_header_is_neither_certificate_nor_spoofing() -> None:
    for peer in ("192.0.2.10", "127.0.0.1"):
        result = client_certificate_from_headers(Headers(), peer, CARD_HOST)
        assert result.certificate is None and not result.spoofed


def test_ipv4_mapped_trusted_peer_upper_case_host_with_port_and_lowercase_header(dev_pki: DevPki) -> None:
    headers = Headers(
        {
            "x-ssl-client-cert": _nginx_escaped(software_card(dev_pki)),
            "host": "CARTE.portail.test.:443",
            "x-card-host-secret": SECRET,
        }
    )
    assert client_certificate_from_headers(headers, "::ffff:127.0.0.1", CARD_HOST).certificate is not None
    assert client_certificate_from_headers(headers, "::1", CARD_HOST).certificate is not None


def test_empty_header_from_the_card_host_means_no_certificate() -> None:
    # nginx sends an empty value when the client presented no certificate
    headers = _from_card_host(**{CLIENT_CERT_HEADER: "", CLIENT_VERIFY_HEADER: "NONE"})
    result = client_certificate_from_headers(headers, "127.0.0.1", CARD_HOST)
    assert result.certificate is None and not result.spoofed and result.terminator_verify == "NONE"
