"""An IGC-Santé-shaped PKI made with the openssl CLI alone, and cards filled with pkcs11-tool.

Nothing here goes through ``gateway.devtools`` (pki.py, cards.py) or python-pkcs11: certificates, CRLs and tokens
come from the tools a CA or a card personaliser would use, so the gateway meets layouts, encodings and object
orders it did not produce itself. Subjects follow the real card kinds (see :data:`CARD_SUBJECTS` and
docs/card.md for what is confirmed and what is not).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509

from gateway.pkcs11 import SOFTHSM_MODULE
from tests.support.config import CARD_HOST_SECRET

ROOT_SUBJECT = "/C=FR/O=ASIP-SANTE/OU=0002 187512751/OU=IGC-SANTE TEST/CN=TEST AC RACINE IGC-SANTE STANDARD"
PEOPLE_SUBJECT = (
    "/C=FR/O=ASIP-SANTE/OU=0002 187512751/OU=IGC-SANTE TEST/CN=TEST AC IGC-SANTE STANDARD PERSONNES"
)
ROOT_CRL_URL = "http://igc-sante.test/crl/root.crl"
PEOPLE_CRL_URL = "http://igc-sante.test/crl/personnes.crl"

#: One openssl configuration for everything: ``req`` (UTF-8 subjects), ``ca`` (revocations and CRLs, sections
#: named with -crlexts) and the certificate profiles (sections named with -extensions).
CONFIG = f"""\
[ req ]
distinguished_name = empty_dn
string_mask = utf8only
utf8 = yes
prompt = no

[ empty_dn ]

[ ca ]
default_ca = this_ca

[ this_ca ]
dir = .
database = $dir/index.txt
crlnumber = $dir/crlnumber
certificate = $dir/ca.pem
private_key = $dir/ca.key
new_certs_dir = $dir
default_md = sha256
default_crl_days = 7
unique_subject = no
crl_extensions = crl_complete

[ root_ca ]
basicConstraints = critical, CA:TRUE, pathlen:1
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ people_ca ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
crlDistributionPoints = URI:{ROOT_CRL_URL}

[ card_authentication ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
crlDistributionPoints = URI:{PEOPLE_CRL_URL}

[ card_signature ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, nonRepudiation
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
crlDistributionPoints = URI:{PEOPLE_CRL_URL}

[ crl_complete ]
authorityKeyIdentifier = keyid:always

[ crl_only_ca ]
authorityKeyIdentifier = keyid:always
issuingDistributionPoint = critical, @idp_only_ca

[ idp_only_ca ]
fullname = URI:{ROOT_CRL_URL}
onlyCA = TRUE

[ crl_only_user ]
authorityKeyIdentifier = keyid:always
issuingDistributionPoint = critical, @idp_only_user

[ idp_only_user ]
fullname = URI:{PEOPLE_CRL_URL}
onlyuser = TRUE

[ crl_other_partition ]
authorityKeyIdentifier = keyid:always
issuingDistributionPoint = critical, @idp_other_partition

[ idp_other_partition ]
fullname = URI:http://igc-sante.test/crl/personnes-partition-2.crl
onlyuser = TRUE

[ crl_some_reasons ]
authorityKeyIdentifier = keyid:always
issuingDistributionPoint = critical, @idp_some_reasons

[ idp_some_reasons ]
onlysomereasons = keyCompromise, CACompromise

[ crl_indirect ]
authorityKeyIdentifier = keyid:always
issuingDistributionPoint = critical, @idp_indirect

[ idp_indirect ]
indirectCRL = TRUE

[ crl_delta ]
authorityKeyIdentifier = keyid:always
deltaCRL = critical, ASN1:INTEGER:1
"""

#: Subjects of each card kind, as openssl ``-subj`` with ``-multivalue-rdn`` (first RDN first, so the reverse
#: of the RFC 4514 order; ``\\/`` is a slash inside a value). Shaped like subjects of real test cards quoted by
#: an ANS integrator (docs/card.md): a professional's CPS, a legacy ADELI card (profession in OU), an
#: establishment staff card (CPE: no names, a pseudonym, a title naming the card) and an organisation card (CPA:
#: SIRET idNat, no title).
CARD_SUBJECTS: Mapping[str, str] = {
    "cps": "/C=FR/title=Médecin/CN=810002813839+SN=DUPONT+GN=JEAN",
    "legacy": "/C=FR/O=TEST/OU=Masseur-Kinésithérapeute/CN=00B7010446+SN=MASSEUR1044+GN=HONORE",
    "cpe": (
        "/C=FR/ST=Seine-Maritime (76)/O=PHARMACIE DES LILAS/OU=1760021832"
        "/title=Carte de service santé ou social/pseudonym=EMPLOYE000000018/CN=3760021832\\/000000018"
    ),
    "cpa": (
        "/C=FR/O=CENTRE DE SANTE DES LILAS/L=Paris (75)/OU=300000000029751"
        "/CN=500000000029751\\/CPAT0001+SN=MAITRE0000029750001+GN=PATRICE"
    ),
    # A staff card title with a professional's idNat: refused, whichever half is the lie.
    "cpe-on-rpps": "/C=FR/O=CLINIQUE/OU=1760021832/title=Carte de service santé ou social/CN=810002813839",
}


def run_tool(argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run a command line tool (stdin closed: a PIN prompt fails instead of waiting); its stdout, or an error
    naming the command and what it printed on stderr."""
    result = subprocess.run(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def openssl(*args: str, cwd: Path | None = None) -> str:
    return run_tool(["openssl", *args], cwd=cwd)


def printed_serial(certificate: Path) -> str:
    """The serial exactly as ``openssl x509 -noout -serial`` prints it."""
    return openssl("x509", "-in", str(certificate), "-noout", "-serial").strip().removeprefix("serial=")


@dataclass(frozen=True)
class OpensslCa:
    """One CA in its own directory: key, certificate, and the ``openssl ca`` database of its revocations."""

    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def config(self) -> Path:
        return self.directory / "openssl.cnf"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def issue(
        self, subject: str, public_key: Path, out: Path, *, profile: str, serial: str, days: int = 1095
    ) -> Path:
        """Certify ``public_key`` (PEM) for ``subject`` with the ``profile`` extensions; returns ``out`` (PEM).

        The request is signed by a throwaway key and ``-force_pubkey`` puts the real one in: a card key on a
        token never has to sign anything here.
        """
        request, throwaway = out.with_suffix(".csr"), out.with_suffix(".throwaway.key")
        openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(throwaway), "-config", str(self.config), "-utf8", "-multivalue-rdn",
            "-subj", subject, "-out", str(request),
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", str(request), "-force_pubkey", str(public_key),
            "-CA", str(self.cert_path), "-CAkey", str(self.key_path), "-set_serial", serial,
            "-extfile", str(self.config), "-extensions", profile, "-days", str(days), "-sha256",
            "-out", str(out),
        )  # fmt: skip
        throwaway.unlink()
        return out

    def revoke(self, certificate: Path) -> None:
        openssl("ca", "-config", str(self.config), "-revoke", str(certificate), cwd=self.directory)

    def write_crl(self, out: Path, *, extensions: str = "crl_complete", days: int = 7) -> Path:
        """A CRL of every revocation so far, with the CRL extensions of section ``extensions``."""
        openssl(
            "ca", "-config", str(self.config), "-gencrl", "-crlexts", extensions, "-crldays", str(days),
            "-out", str(out), cwd=self.directory,
        )  # fmt: skip
        return out


def _new_ca(directory: Path, subject: str, issuer: OpensslCa | None, profile: str) -> OpensslCa:
    directory.mkdir(parents=True)
    ca = OpensslCa(directory)
    ca.config.write_text(CONFIG, encoding="utf-8")
    (directory / "index.txt").write_text("")
    (directory / "crlnumber").write_text("01\n")
    if issuer is None:
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca.key_path),
            "-config", str(ca.config), "-extensions", profile, "-subj", subject, "-days", "3650",
            "-sha256", "-set_serial", "0x01", "-out", str(ca.cert_path),
        )  # fmt: skip
        return ca
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(ca.key_path))
    public_key = directory / "ca.pub.pem"
    openssl("pkey", "-in", str(ca.key_path), "-pubout", "-out", str(public_key))
    issuer.issue(subject, public_key, ca.cert_path, profile=profile, serial="0x02", days=3650)
    return ca


@dataclass(frozen=True)
class OpensslPki:
    """Root and card-issuing intermediate ("... PERSONNES"), each with its CRL file (complete by default)."""

    directory: Path
    root: OpensslCa
    people: OpensslCa

    @property
    def root_crl(self) -> Path:
        return self.directory / "root.crl.pem"

    @property
    def people_crl(self) -> Path:
        return self.directory / "personnes.crl.pem"

    @property
    def ca_chain(self) -> Path:
        return self.directory / "ca-chain.pem"

    def card_settings(self, login_origin: str) -> dict[str, object]:
        """The gateway's ``card`` section for this PKI."""
        return {
            "trust_anchors": [str(self.root.cert_path)],
            "intermediates": [str(self.people.cert_path)],
            "crls": [
                {"url_or_file": str(self.root_crl), "issuer": str(self.root.cert_path)},
                {"url_or_file": str(self.people_crl), "issuer": str(self.people.cert_path)},
            ],
            "login_origin": login_origin,
            "host_secret": CARD_HOST_SECRET,
        }

    def software_card(
        self, kind: str, serial: str, out: Path, *, profile: str = "card_authentication"
    ) -> Path:
        """A card certificate of ``kind`` (see :data:`CARD_SUBJECTS`) for a software key made by openssl (one
        key for every such certificate of this PKI: these cards never sign)."""
        public_key = self.directory / "software-card.pub.pem"
        return self.people.issue(CARD_SUBJECTS[kind], public_key, out, profile=profile, serial=serial)

    def token_card(
        self,
        token: ToolToken,
        kind: str,
        serial: str,
        *,
        key_id: str = "01",
        profile: str = "card_authentication",
        key_type: str = "rsa:2048",
    ) -> Path:
        """A key pair generated on ``token`` by pkcs11-tool, certified by openssl in the layout of ``kind``, the
        certificate written back with the key's CKA_ID; returns the certificate (PEM)."""
        stem = self.directory / f"{token.label}-{key_id}"
        public_key = token.generate_key(key_id, f"{profile} key", stem.with_suffix(".pub.pem"), key_type)
        certificate = self.people.issue(
            CARD_SUBJECTS[kind], public_key, stem.with_suffix(".pem"), profile=profile, serial=serial
        )
        token.write_certificate(certificate, key_id, f"{profile} certificate")
        return certificate


def openssl_pki(directory: Path) -> OpensslPki:
    """A fresh hierarchy under ``directory`` with empty, complete CRLs for both CAs."""
    root = _new_ca(directory / "root", ROOT_SUBJECT, None, "root_ca")
    people = _new_ca(directory / "personnes", PEOPLE_SUBJECT, root, "people_ca")
    pki = OpensslPki(directory, root, people)
    key = directory / "software-card.key"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
    openssl("pkey", "-in", str(key), "-pubout", "-out", str(directory / "software-card.pub.pem"))
    root.write_crl(pki.root_crl)
    people.write_crl(pki.people_crl)
    pki.ca_chain.write_bytes(people.cert_path.read_bytes() + root.cert_path.read_bytes())
    return pki


# ------------------------------------------------------------------------------------------ pkcs11-tool


def softhsm_config(directory: Path, *, disabled_mechanisms: Sequence[str] = ()) -> dict[str, str]:
    """A private SoftHSM (its own token directory); returns the environment that selects it.

    ``disabled_mechanisms`` hides mechanisms from every slot, like card middleware that lacks them.
    """
    import os

    (directory / "tokens").mkdir(parents=True, exist_ok=True)
    lines = [
        f"directories.tokendir = {(directory / 'tokens').resolve()}",
        "objectstore.backend = file",
        "log.level = ERROR",
        "slots.removable = false",
    ]
    if disabled_mechanisms:
        # "-" then the list: disable these. SoftHSM 2.6.1 keeps the "-" on the first name, which it then does not
        # recognise (and a minus before each name disables nothing): hence "-," before the first one.
        lines.append("slots.mechanisms = -," + ",".join(disabled_mechanisms))
    config = directory / "softhsm2.conf"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dict(os.environ, SOFTHSM2_CONF=str(config.resolve()))


def _tool(env: Mapping[str, str], *args: str) -> str:
    return run_tool(["pkcs11-tool", "--module", SOFTHSM_MODULE, *args], env=env)


@dataclass(frozen=True)
class ToolToken:
    """A SoftHSM token initialised with softhsm2-util and filled with pkcs11-tool only."""

    label: str
    pin: str
    env: Mapping[str, str]

    def _logged_in(self, *args: str) -> str:
        return _tool(self.env, "--token-label", self.label, "--login", "--pin", self.pin, *args)

    def generate_key(self, key_id: str, label: str, out: Path, key_type: str = "rsa:2048") -> Path:
        """A key pair generated on the token (``key_id`` in hex); its public key written to ``out`` (PEM)."""
        self._logged_in(
            "--keypairgen", "--key-type", key_type, "--id", key_id, "--label", label, "--usage-sign"
        )
        der = out.with_suffix(".der")
        _tool(
            self.env,
            "--token-label",
            self.label,
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            key_id,
            "-o",
            str(der),
        )
        openssl("pkey", "-pubin", "-inform", "DER", "-in", str(der), "-out", str(out))
        return out

    def key_uri(self, key_id: str) -> str:
        """The RFC 7512 URI of the private key (PIN included) for the libp11 engine (curl, openssl)."""
        encoded_id = "".join(f"%{key_id[i : i + 2]}" for i in range(0, len(key_id), 2))
        return f"pkcs11:token={quote(self.label)};id={encoded_id};type=private?pin-value={self.pin}"

    def write_certificate(self, certificate: Path, key_id: str, label: str) -> None:
        der = certificate.with_suffix(".der")
        openssl("x509", "-in", str(certificate), "-outform", "DER", "-out", str(der))
        self._logged_in("--write-object", str(der), "--type", "cert", "--id", key_id, "--label", label)

    def delete_certificate(self, key_id: str) -> None:
        self._logged_in("--delete-object", "--type", "cert", "--id", key_id)

    def certificate_ids(self) -> list[str]:
        """CKA_IDs of the certificates in the order the token lists them."""
        listing = _tool(self.env, "--token-label", self.label, "--list-objects", "--type", "cert")
        return [
            line.split(":", 1)[1].strip() for line in listing.splitlines() if line.strip().startswith("ID:")
        ]


def tool_token(env: Mapping[str, str], label: str, pin: str = "1234") -> ToolToken:
    run_tool(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "12345678", "--pin", pin],
        env=env,
    )
    return ToolToken(label, pin, env)


# ------------------------------------------------------------------------------------------ fixtures

_session_pki: OpensslPki | None = None


@pytest.fixture(scope="session")
def tool_pki(tmp_path_factory: pytest.TempPathFactory) -> OpensslPki:
    """One openssl-made hierarchy for the session (never revoke with it: use ``own_tool_pki``)."""
    global _session_pki
    if _session_pki is None:
        _session_pki = openssl_pki(tmp_path_factory.mktemp("openssl-pki") / "pki")
    return _session_pki


@pytest.fixture
def own_tool_pki(tool_pki: OpensslPki, tmp_path: Path) -> OpensslPki:
    """A private copy of the session hierarchy (same keys) whose revocations and CRLs a test may change."""
    copy = tmp_path / "openssl-pki"
    shutil.copytree(tool_pki.directory, copy)
    return OpensslPki(copy, OpensslCa(copy / "root"), OpensslCa(copy / "personnes"))
