"""The Pro Santé Connect stand-in behind a real nginx that requires a client certificate (RFC 8705 mTLS).

nginx serves two TLS listeners in front of the stand-in process: the public one (discovery, authorization,
JWKS, logout; no client certificate asked) and the mTLS one (``ssl_verify_client on``: no certificate signed
by the organisations CA, no connection), whose URL the stand-in publishes as ``mtls_endpoint_aliases`` and
which hands the verified certificate over in ``X-SSL-Client-Cert``. Certificates come from the openssl CLI:
a TLS server CA, and an IGC-Santé-shaped "ORGANISATIONS" CA for the services' client certificates (the real
profile of the certificates ANS registers for tls_client_auth is unverified, see docs/ecps.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.support.nginx import running_nginx
from tests.support.openssl_pki import openssl
from tests.support.processes import free_port
from tests.support.psc import PscServer, running_psc

SERVER_CA_SUBJECT = "/C=FR/O=TEST HEBERGEUR/CN=TEST AC SERVEURS TLS"
ORGANISATIONS_CA_SUBJECT = (
    "/C=FR/O=ASIP-SANTE/OU=0002 187512751/OU=IGC-SANTE TEST/CN=TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS"
)
#: A service's certificate: the structure, its identifier, the service's host name.
GATEWAY_SUBJECT = "/C=FR/O=PORTAIL TEST/OU=130000000000001/CN=passerelle.portail.test"
OTHER_SERVICE_SUBJECT = "/C=FR/O=AUTRE SERVICE/OU=130000000000002/CN=autre.service.test"

CONFIG = """\
[ req ]
distinguished_name = empty_dn
prompt = no

[ empty_dn ]

[ ca ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ tls_server ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[ tls_client ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

NGINX_TEMPLATE = """\
server {
    listen __LISTEN__ ssl;
    ssl_certificate __SERVER_CERT__;
    ssl_certificate_key __SERVER_KEY__;
    location / {
        proxy_pass http://__PROVIDER__;
        # Providers build URLs from their issuer, or from Host and X-Forwarded-Proto (oidc-provider).
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-Proto https;
        # No certificate on this listener: never let a client claim one.
        proxy_set_header X-SSL-Client-Cert "";
        proxy_set_header X-SSL-Client-Verify "";
    }
}
server {
    listen __MTLS_LISTEN__ ssl;
    ssl_certificate __SERVER_CERT__;
    ssl_certificate_key __SERVER_KEY__;
    ssl_verify_client on;
    ssl_client_certificate __CLIENT_CA__;
    ssl_verify_depth 1;
    location / {
        proxy_pass http://__PROVIDER__;
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-Proto https;
        proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
        proxy_set_header X-SSL-Client-Verify $ssl_client_verify;
    }
}
"""


@dataclass(frozen=True)
class MtlsPki:
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def server_ca(self) -> Path:
        return self.path("server-ca.pem")

    @property
    def organisations_ca(self) -> Path:
        return self.path("organisations-ca.pem")

    def client(self, name: str) -> tuple[Path, Path]:
        """A client certificate made by :func:`mtls_pki` and its key."""
        return self.path(f"{name}.pem"), self.path(f"{name}.key")

    def subject(self, name: str) -> str:
        """The certificate's subject as RFC 8705's tls_client_auth_subject_dn compares it (RFC 4514)."""
        return x509.load_pem_x509_certificate(self.path(f"{name}.pem").read_bytes()).subject.rfc4514_string()


def _issue(pki: MtlsPki, ca: str, name: str, subject: str, profile: str, serial: int) -> None:
    key, request = pki.path(f"{name}.key"), pki.path(f"{name}.csr")
    config = str(pki.path("openssl.cnf"))
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-config", config,
            "-subj", subject, "-out", str(request))  # fmt: skip
    openssl("x509", "-req", "-in", str(request), "-CA", str(pki.path(f"{ca}.pem")),
            "-CAkey", str(pki.path(f"{ca}.key")), "-set_serial", str(serial), "-extfile", config,
            "-extensions", profile, "-days", "30", "-sha256", "-out", str(pki.path(f"{name}.pem")))  # fmt: skip


def mtls_pki(directory: Path) -> MtlsPki:
    """Server CA + 127.0.0.1 server certificate; organisations CA + the gateway's and another service's
    client certificates (``client("gateway")``, ``client("other-service")``)."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = MtlsPki(directory)
    pki.path("openssl.cnf").write_text(CONFIG, encoding="utf-8")
    for name, subject in (("server-ca", SERVER_CA_SUBJECT), ("organisations-ca", ORGANISATIONS_CA_SUBJECT)):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki.path(f"{name}.key")),
                "-config", str(pki.path("openssl.cnf")), "-extensions", "ca", "-subj", subject,
                "-days", "30", "-sha256", "-out", str(pki.path(f"{name}.pem")))  # fmt: skip
    _issue(pki, "server-ca", "server", "/CN=127.0.0.1", "tls_server", 1)
    _issue(pki, "organisations-ca", "gateway", GATEWAY_SUBJECT, "tls_client", 2)
    _issue(pki, "organisations-ca", "other-service", OTHER_SERVICE_SUBJECT, "tls_client", 3)
    return pki


@dataclass(frozen=True)
class MtlsTerminator:
    #: Base URLs of the public listener and of the one that requires a client certificate.
    public_url: str
    mtls_url: str


@contextlib.contextmanager
def running_mtls_terminator(directory: Path, pki: MtlsPki, provider_port: int) -> Iterator[MtlsTerminator]:
    """nginx in front of the provider process listening on ``provider_port`` (started afterwards)."""
    mtls_port = free_port()
    template = directory / "mtls-terminator.conf.template"
    template.write_text(NGINX_TEMPLATE, encoding="utf-8")
    values = {
        "PROVIDER": f"127.0.0.1:{provider_port}",
        "MTLS_LISTEN": f"127.0.0.1:{mtls_port}",
        "SERVER_CERT": str(pki.path("server.pem")),
        "SERVER_KEY": str(pki.path("server.key")),
        "CLIENT_CA": str(pki.organisations_ca),
    }
    with running_nginx(directory / "nginx", template, values) as nginx:
        yield MtlsTerminator(f"https://127.0.0.1:{nginx.port}", f"https://127.0.0.1:{mtls_port}")


@dataclass(frozen=True)
class MtlsPsc:
    psc: PscServer
    pki: MtlsPki
    #: Base URL of the listener that requires a client certificate.
    mtls_url: str


@contextlib.contextmanager
def running_psc_behind_mtls(
    directory: Path,
    pki: MtlsPki,
    clients: Sequence[dict[str, Any]],
    identities: Sequence[dict[str, str]] | None = None,
    psc_args: Sequence[str] = (),
) -> Iterator[MtlsPsc]:
    psc_port = free_port()
    with running_mtls_terminator(directory, pki, psc_port) as terminator:
        args = ["--client-certificate-header", "--mtls-url", terminator.mtls_url, *psc_args]
        with running_psc(
            directory,
            clients,
            identities,
            port=psc_port,
            args=args,
            public_url=terminator.public_url,
            verify=str(pki.server_ca),
        ) as psc:
            yield MtlsPsc(psc, pki, terminator.mtls_url)
