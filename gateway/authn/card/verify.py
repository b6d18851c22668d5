"""Card certificate verification: dates, key usage, chain to configured IGC-Santé anchors, CRLs.

Built ONCE at start-up (trust store, CRL sources), then called per login with the time as a parameter.
Revocation fails closed: no fresh CRL for an issuer in the chain means no login (CRL_UNAVAILABLE).
CRLs are refreshed by a background thread that swaps immutable snapshots, so requests never wait on it.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.authn.card.certificate import (
    CardError,
    card_tag,
    check_key_usage,
    format_serial,
    parse_card_certificate,
)
from gateway.identity import Identity, LoginMethod
from gateway.policy.decision import Reason

log = logging.getLogger(__name__)

__all__ = [
    "CardError",
    "CardVerifier",
    "CrlScope",
    "CrlSnapshot",
    "CrlSource",
    "CrlStore",
    "load_certificate",
    "verify_challenge_signature",
]


def load_certificate(data: x509.Certificate | bytes | str) -> x509.Certificate:
    """A certificate from PEM or DER; CARD_MALFORMED when it is neither."""
    if isinstance(data, x509.Certificate):
        return data
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as error:
        raise CardError(Reason.CARD_MALFORMED, f"not a certificate: {error}") from error


# --------------------------------------------------------------------------------------------- CRLs


@dataclass(frozen=True, slots=True)
class CrlSource:
    """Where the CRL of one CA comes from: a file path or an http(s) URL, and that CA's certificate."""

    location: str
    issuer: x509.Certificate


@dataclass(frozen=True, slots=True)
class CrlScope:
    """Which certificates of its issuer a complete CRL covers (its IssuingDistributionPoint, RFC 5280 §5.2.5).

    A CRL without the extension covers every certificate of the issuer. ``only_ca`` (an ARL: a root's list of
    revoked intermediates) and ``only_users`` CRLs are complete for their half; ``distribution_points`` names
    the partition a CRL covers, matched against the certificate's CRLDistributionPoints (§6.3.3 b.2.i).
    """

    only_users: bool = False
    only_ca: bool = False
    distribution_points: frozenset[x509.GeneralName] = frozenset()

    def covers(self, certificate: x509.Certificate) -> bool:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if (self.only_users and is_ca) or (self.only_ca and not is_ca):
            return False
        if not self.distribution_points:
            return True
        try:
            points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            # No distribution point in the certificate: the CRL configured for its issuer is its distribution
            # point (RFC 5280 §6.3.3 allows a locally configured one), whatever name its IDP gives itself.
            return True
        names = {name for point in points if point.crl_issuer is None for name in point.full_name or ()}
        return not names.isdisjoint(self.distribution_points)


COMPLETE = CrlScope()


@dataclass(frozen=True, slots=True)
class CrlSnapshot:
    """One verified CRL, immutable: readers never see a half-loaded list."""

    issuer_name: x509.Name
    issuer_key_der: bytes
    this_update: datetime
    next_update: datetime
    revoked_serials: frozenset[int]
    scope: CrlScope = COMPLETE


def _public_key_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _der_header(buf: bytes, i: int) -> tuple[int, int, int]:
    """(tag, length, content offset) of the DER element at ``i``."""
    tag, length = buf[i], buf[i + 1]
    i += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(buf[i : i + size], "big")
        i += size
    return tag, length, i


def _crl_der(data: bytes) -> bytes:
    if not data.lstrip().startswith(b"-----BEGIN"):
        return data
    body = data.split(b"-----BEGIN X509 CRL-----", 1)[1].split(b"-----END X509 CRL-----", 1)[0]
    return base64.b64decode(b"".join(body.split()), validate=True)


def _tbs_bytes(der: bytes) -> bytes:
    """The TBSCertList exactly as received (what the CA signed), without re-encoding it."""
    _, _, start = _der_header(der, 0)
    _, length, content = _der_header(der, start)
    return der[start : content + length]


def _revoked_serials(tbs: bytes) -> frozenset[int]:
    """Serial numbers of revokedCertificates, read straight from the DER.

    About twice as fast as iterating cryptography's entries (one object each): 0.5 s for a million. Only
    called after cryptography parsed the whole CRL, so the structure is known to be valid DER; anything
    unexpected raises ValueError and the caller falls back to cryptography.
    """
    buf = tbs  # bytes: indexing and small slices are cheaper than through a memoryview
    _, _, i = _der_header(buf, 0)
    tag, length, content = _der_header(buf, i)
    if tag == 0x02:  # version
        i = content + length
    for _ in range(3):  # signature algorithm, issuer, thisUpdate
        _, length, content = _der_header(buf, i)
        i = content + length
    if i < len(buf) and buf[i] in (0x17, 0x18):  # nextUpdate
        _, length, content = _der_header(buf, i)
        i = content + length
    if i >= len(buf) or buf[i] != 0x30:  # no revokedCertificates (maybe crlExtensions [0])
        return frozenset()
    _, length, i = _der_header(buf, i)
    end, from_bytes = i + length, int.from_bytes
    serials: list[int] = []
    append = serials.append
    while i < end:  # the hot loop: entry headers decoded inline, no call per entry
        entry_length = buf[i + 1]
        if buf[i] != 0x30:
            raise ValueError("unexpected CRL entry")
        if entry_length & 0x80:
            size = entry_length & 0x7F
            entry_length = from_bytes(buf[i + 2 : i + 2 + size], "big")
            entry = i + 2 + size
        else:
            entry = i + 2
        size = buf[entry + 1]
        if buf[entry] != 0x02 or size & 0x80:  # serial: INTEGER of at most 127 octets
            raise ValueError("unexpected serial encoding")
        append(from_bytes(buf[entry + 2 : entry + 2 + size], "big", signed=True))
        i = entry + entry_length
    if i != end:
        raise ValueError("revokedCertificates overrun")
    return frozenset(serials)


def _signature_valid(
    crl: x509.CertificateRevocationList, tbs: bytes, public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
) -> bool:
    hash_algorithm = crl.signature_hash_algorithm
    if hash_algorithm is None or crl.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS:
        return crl.is_signature_valid(public_key)  # the rare cases: let cryptography handle them
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(crl.signature, tbs, padding.PKCS1v15(), hash_algorithm)
        else:
            public_key.verify(crl.signature, tbs, ec.ECDSA(hash_algorithm))
    except InvalidSignature:
        return False
    return True


def _scope(crl: x509.CertificateRevocationList) -> CrlScope:
    """The scope of a CRL that lists EVERY revoked certificate of that scope; ValueError for the others.

    A delta CRL lists only the changes since a base CRL, an ``onlySomeReasons`` CRL only some revocation
    reasons, an indirect CRL another issuer's certificates, an attribute-certificate CRL no card at all:
    none of them may stand for "not revoked".
    """
    scope = COMPLETE
    for extension in crl.extensions:
        value = extension.value
        if isinstance(value, x509.DeltaCRLIndicator):
            raise ValueError("delta CRL: only complete CRLs are accepted")
        if isinstance(value, x509.IssuingDistributionPoint):
            if value.only_some_reasons:
                raise ValueError("CRL for some revocation reasons only (IssuingDistributionPoint): partial")
            if value.indirect_crl:
                raise ValueError("indirect CRL (IssuingDistributionPoint): not accepted")
            if value.only_contains_attribute_certs:
                raise ValueError("CRL of attribute certificates (IssuingDistributionPoint): covers no card")
            if value.relative_name is not None:
                raise ValueError("IssuingDistributionPoint with a relative name: not supported")
            scope = CrlScope(
                only_users=value.only_contains_user_certs,
                only_ca=value.only_contains_ca_certs,
                distribution_points=frozenset(value.full_name or ()),
            )
        elif extension.critical and isinstance(value, x509.UnrecognizedExtension):
            raise ValueError(f"unknown critical CRL extension {extension.oid.dotted_string}")
    return scope


def parse_crl(data: bytes, issuer: x509.Certificate) -> CrlSnapshot:
    """Parse and verify a CRL (PEM or DER) against its issuer; ValueError when it cannot be trusted."""
    der = _crl_der(data)
    crl = x509.load_der_x509_crl(der)
    if crl.issuer != issuer.subject:
        raise ValueError(
            f"CRL issued by {crl.issuer.rfc4514_string()}, expected {issuer.subject.rfc4514_string()}"
        )
    public_key = issuer.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("unsupported CA key type")
    # Verify over the bytes as received: cryptography's tbs_certlist_bytes re-encodes (0.3 s for 1M entries).
    tbs = _tbs_bytes(der)
    if not _signature_valid(crl, tbs, public_key):
        raise ValueError("CRL signature does not verify with the issuer key")
    if crl.next_update_utc is None:
        raise ValueError("CRL without nextUpdate")
    scope = _scope(crl)
    try:
        serials = _revoked_serials(tbs)
    except (ValueError, IndexError):
        serials = frozenset(entry.serial_number for entry in crl)
    return CrlSnapshot(
        issuer_name=crl.issuer,
        issuer_key_der=_public_key_der(issuer),
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        revoked_serials=serials,  # frozenset: O(1) lookups
        scope=scope,
    )


def fetch(location: str, timeout: float = 10.0) -> bytes:
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=timeout) as response:  # noqa: S310 - scheme checked
            return bytes(response.read())
    return Path(location).read_bytes()


#: Called with an issuer's name and the serials its refreshed CRL lists for the first time.
NewRevocations = Callable[[x509.Name, frozenset[int]], None]


class CrlStore:
    """The current CRL snapshot of each source, refreshed in the background.

    A failed refresh keeps the previous snapshot: it stays usable until its nextUpdate + grace, then the
    verifier fails closed. Readers take a reference to the index (swapped whole), never a lock.
    """

    def __init__(
        self,
        sources: Sequence[CrlSource],
        grace: timedelta = timedelta(0),
        on_new_revocations: NewRevocations | None = None,
    ) -> None:
        self._sources = tuple(sources)
        self.grace = grace
        self._on_new_revocations = on_new_revocations
        self._snapshots: tuple[CrlSnapshot | None, ...] = (None,) * len(self._sources)
        #: issuer name (DER) -> that issuer's loaded snapshots: one per source, whatever their scopes.
        self._by_issuer: dict[bytes, tuple[CrlSnapshot, ...]] = {}
        #: The same, by the issuer's RFC 4514 name: what a session remembers of its card (Identity.card_issuer).
        self._by_issuer_text: dict[str, tuple[CrlSnapshot, ...]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()

    @staticmethod
    def _key(name: x509.Name) -> bytes:
        return name.public_bytes()

    def refresh(self) -> list[str]:
        """Reload every source now; return the errors (one per failed source).

        Serials a source lists that its previous snapshot did not are handed to ``on_new_revocations``
        (not at a source's first load: nothing of this process is older than it).
        """
        errors: list[str] = []
        with self._refresh_lock:
            previous_snapshots = self._snapshots
            snapshots = list(previous_snapshots)
            for index, source in enumerate(self._sources):
                try:
                    snapshot = parse_crl(fetch(source.location), source.issuer)
                except (OSError, ValueError) as error:
                    errors.append(f"{source.location}: {error}")
                    log.warning("CRL refresh failed for %s: %s", source.location, error)
                    continue
                previous = snapshots[index]
                # Never go back in time (an old copy served by a stale mirror).
                if previous is None or snapshot.this_update >= previous.this_update:
                    snapshots[index] = snapshot
            by_issuer: dict[bytes, tuple[CrlSnapshot, ...]] = {}
            by_issuer_text: dict[str, tuple[CrlSnapshot, ...]] = {}
            for loaded in filter(None, snapshots):
                key, text = self._key(loaded.issuer_name), loaded.issuer_name.rfc4514_string()
                by_issuer[key] = (*by_issuer.get(key, ()), loaded)
                by_issuer_text[text] = (*by_issuer_text.get(text, ()), loaded)
            # Atomic swaps: a reader sees the old index or the new one.
            self._snapshots, self._by_issuer, self._by_issuer_text = (
                tuple(snapshots),
                by_issuer,
                by_issuer_text,
            )
            for before, after in zip(previous_snapshots, snapshots, strict=True):
                if before is not None and after is not None and after is not before:
                    self._announce(after.issuer_name, after.revoked_serials - before.revoked_serials)
        return errors

    def _announce(self, issuer: x509.Name, serials: frozenset[int]) -> None:
        if not serials or self._on_new_revocations is None:
            return
        try:
            self._on_new_revocations(issuer, serials)
        except Exception:  # the refresh thread must live on; the sessions are caught at their next use
            log.exception("handling %d new revocations of %s failed", len(serials), issuer.rfc4514_string())

    def lists(self, issuer: str, serial: int) -> bool:
        """Whether a loaded CRL of the issuer named ``issuer`` (RFC 4514) lists ``serial``, whatever its
        freshness: serials are unique per issuer, and a revocation is never undone."""
        return any(serial in snapshot.revoked_serials for snapshot in self._by_issuer_text.get(issuer, ()))

    def covering(self, issuer: x509.Certificate, certificate: x509.Certificate) -> tuple[CrlSnapshot, ...]:
        """The loaded CRLs signed by ``issuer`` (its name AND its key) whose scope covers ``certificate``."""
        key_der = _public_key_der(issuer)
        return tuple(
            snapshot
            for snapshot in self._by_issuer.get(self._key(issuer.subject), ())
            if snapshot.issuer_key_der == key_der and snapshot.scope.covers(certificate)
        )

    def all_fresh(self, now: datetime) -> bool:
        """Every source is loaded and not past its nextUpdate + grace (readiness)."""
        return all(
            snapshot is not None and now <= snapshot.next_update + self.grace for snapshot in self._snapshots
        )

    def start(self, interval: float = 300.0) -> None:
        """Refresh every ``interval`` seconds in a daemon thread (call :meth:`refresh` once first)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(interval):
                self.refresh()

        self._thread = threading.Thread(target=run, name="crl-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ------------------------------------------------------------------------------------------ verifier


def _card_extension_policy() -> ExtensionPolicy:
    # Real cards have no SubjectAltName; the webpki defaults would require one.
    return ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )


def _check_dates(certificate: x509.Certificate, now: datetime) -> None:
    if now < certificate.not_valid_before_utc:
        raise CardError(
            Reason.CARD_NOT_YET_VALID, f"valid from {certificate.not_valid_before_utc.isoformat()}"
        )
    if now > certificate.not_valid_after_utc:
        raise CardError(Reason.CARD_EXPIRED, f"expired on {certificate.not_valid_after_utc.isoformat()}")


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


class CardVerifier:
    """Verify card certificates against fixed trust anchors, intermediates and a :class:`CrlStore`."""

    def __init__(
        self,
        trust_anchors: Iterable[x509.Certificate],
        intermediates: Iterable[x509.Certificate],
        crl_store: CrlStore,
        *,
        max_chain_depth: int = 4,
    ) -> None:
        self._intermediates = list(intermediates)
        self._crls = crl_store
        self._max_chain_depth = max_chain_depth
        #: A configured CA's name (RFC 4514) -> its issuer's name and its serial: the way up from a session's card.
        self._parents = {
            ca.subject.rfc4514_string(): (ca.issuer.rfc4514_string(), ca.serial_number)
            for ca in reversed(self._intermediates)
        }
        self._builder = (
            PolicyBuilder()
            .store(Store(list(trust_anchors)))
            .max_chain_depth(max_chain_depth)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_card_extension_policy()
            )
        )

    def _chain(self, certificate: x509.Certificate, now: datetime) -> list[x509.Certificate]:
        verifier = self._builder.time(now).build_client_verifier()
        try:
            return list(verifier.verify(certificate, self._intermediates).chain)
        except VerificationError as error:
            raise CardError(Reason.CARD_UNTRUSTED, f"no valid chain to a trust anchor: {error}") from error

    def _check_revocation(self, chain: list[x509.Certificate], now: datetime) -> None:
        # Every non-root certificate must be checked against its issuer's CRL (leaf AND intermediates).
        for subject, issuer in itertools.pairwise(chain):
            snapshots = self._crls.covering(issuer, subject)
            if any(subject.serial_number in snapshot.revoked_serials for snapshot in snapshots):
                raise CardError(Reason.CARD_REVOKED, f"serial {format_serial(subject.serial_number)} revoked")
            if not snapshots:
                raise CardError(
                    Reason.CRL_UNAVAILABLE,
                    f"no CRL of {issuer.subject.rfc4514_string()} covering serial "
                    f"{format_serial(subject.serial_number)}",
                )
            if all(now > snapshot.next_update + self._crls.grace for snapshot in snapshots):
                next_update = max(snapshot.next_update for snapshot in snapshots)
                raise CardError(
                    Reason.CRL_UNAVAILABLE,
                    f"stale CRL of {issuer.subject.rfc4514_string()}: {next_update:%Y-%m-%d %H:%M}Z",
                )

    def chains_to_anchor(self, certificate: x509.Certificate, now: datetime) -> bool:
        """True when the certificate chains to a trust anchor at ``now``, whatever else is wrong with it (a
        revoked card does; a self-made certificate copying a card's serial and issuer does not)."""
        try:
            self._chain(certificate, _utc(now))
        except CardError:
            return False
        return True

    def session_tags(self, identity: Identity) -> tuple[str, ...]:
        """The session tags of a card login: its card's and those of the configured CAs above it, so that a
        refreshed CRL listing the card or one of its CAs ends the sessions it opened."""
        return tuple(card_tag(issuer, serial) for issuer, serial in self._card_and_cas(identity))

    def revoked_since_login(self, identity: Identity) -> bool:
        """Whether a loaded CRL now lists the card of a card login, or a configured CA above it."""
        if identity.method is not LoginMethod.CARD or not identity.card_serial:
            return False  # no certificate to look up (not made by a card login: tests, tools)
        try:
            return any(self._crls.lists(issuer, serial) for issuer, serial in self._card_and_cas(identity))
        except ValueError:
            return True  # not a serial the gateway wrote: end the session rather than trust it

    def _card_and_cas(self, identity: Identity) -> Iterator[tuple[str, int]]:
        """(issuer name, serial) of a card login's certificate, then of each configured CA above it."""
        issuer, serial = identity.card_issuer, int(identity.card_serial, 16)
        for _ in range(self._max_chain_depth):
            yield issuer, serial
            if issuer not in self._parents:
                return
            issuer, serial = self._parents[issuer]

    def verify(self, certificate: x509.Certificate | bytes | str, now: datetime) -> Identity:
        """An :class:`Identity` for a trusted, valid, unrevoked card; :class:`CardError` otherwise."""
        now = _utc(now)
        leaf = load_certificate(certificate)
        _check_dates(leaf, now)  # before the chain, so the reason is precise
        check_key_usage(leaf)
        chain = self._chain(leaf, now)
        self._check_revocation(chain, now)
        holder = parse_card_certificate(leaf)
        return Identity(
            idnat=holder.idnat,
            method=LoginMethod.CARD,
            auth_time=now.timestamp(),
            surname=holder.surname,
            given_name=holder.given_name,
            professions=holder.professions,
            auth_mode="CARD",
            card_serial=holder.serial_hex,
            card_issuer=holder.issuer,
            card_kind=holder.kind,
            structure_id=holder.structure_id,
            structure_name=holder.structure_name,
            employee_id=holder.employee_id,
        )


def verify_challenge_signature(
    certificate: x509.Certificate | bytes | str, data: bytes, signature: bytes
) -> None:
    """Check that the card key signed ``data`` (RSA PKCS#1 v1.5 / ECDSA, SHA-256), else SIGNATURE_INVALID."""
    public_key = load_certificate(certificate).public_key()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise CardError(Reason.SIGNATURE_INVALID, f"unsupported key type {type(public_key).__name__}")
    except InvalidSignature:
        raise CardError(Reason.SIGNATURE_INVALID, "signature does not verify with the card key") from None
