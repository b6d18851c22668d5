"""Benchmark: CPU cost of one card verification, and CRL load time for 1,000,000 revoked serials.

Run: ``python bench/card_verify.py [--runs 3000] [--serials 1000000]``. Targets: ≤ 1 ms per verification
(trust store built once), ≤ 2 s to load a 1M-entry CRL. Not a test: prints figures.

cryptography's CertificateRevocationListBuilder copies its list on every add (quadratic for 1M entries), so
the big CRL's DER is assembled here by hand and signed with the dev intermediate's key: the verifier parses
and checks it exactly like a real one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.authn.card.verify import (
    CardVerifier,
    CrlSource,
    CrlStore,
    _revoked_serials,
    _signature_valid,
    _tbs_bytes,
    parse_crl,
)
from gateway.devtools.pki import DevPki, ensure_dev_pki, issue_card_certificate

SHA256_WITH_RSA = bytes.fromhex("2a864886f70d01010b")


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _length(len(body)) + body


def _integer(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _utc_time(when: datetime) -> bytes:
    return _tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())


def big_crl_der(pki: DevPki, serials: int, now: datetime) -> bytes:
    """A v2 CRL (DER) from the dev intermediate listing ``serials`` 16-byte serial numbers."""
    revoked_at = _utc_time(now - timedelta(days=1))
    base = 0x4000_0000_0000_0000_0000_0000_0000_0000
    entries = b"".join(_tlv(0x30, _integer(base + i * 7919) + revoked_at) for i in range(serials))
    algorithm = _tlv(0x30, _tlv(0x06, SHA256_WITH_RSA) + b"\x05\x00")
    tbs = _tlv(
        0x30,
        _integer(1)
        + algorithm
        + pki.intermediate.certificate.subject.public_bytes()
        + _utc_time(now - timedelta(minutes=5))
        + _utc_time(now + timedelta(days=7))
        + _tlv(0x30, entries),
    )
    key = pki.intermediate.key
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))


def bench_verify(pki: DevPki, runs: int) -> None:
    store = CrlStore(
        [
            CrlSource(str(pki.root.crl_path), pki.root.certificate),
            CrlSource(str(pki.intermediate.crl_path), pki.intermediate.certificate),
        ]
    )
    assert store.refresh() == []
    verifier = CardVerifier(pki.trust_anchors, pki.intermediates, store)  # built once
    card_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    card = issue_card_certificate(
        pki, card_key.public_key(), "810002813839", "DUPONT", "JEAN", "Médecin", now=now
    )
    for _ in range(50):
        verifier.verify(card, now)  # warm-up
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        verifier.verify(card, now)
        timings.append(time.perf_counter() - start)
    timings.sort()
    print(
        f"card verification ({runs} runs, chain + dates + key usage + CRL lookup + parsing): "
        f"median {statistics.median(timings) * 1e3:.3f} ms, p95 {timings[int(runs * 0.95)] * 1e3:.3f} ms "
        f"(target <= 1 ms)"
    )


def bench_crl(pki: DevPki, serials: int, directory: Path) -> None:
    now = datetime.now(UTC)
    start = time.perf_counter()
    der = big_crl_der(pki, serials, now)
    path = directory / "big.crl"
    path.write_bytes(der)
    print(
        f"generated a {serials:,}-entry CRL ({len(der) / 1e6:.1f} MB) in {time.perf_counter() - start:.2f} s"
    )

    loads = []
    for _ in range(3):
        start = time.perf_counter()
        snapshot = parse_crl(path.read_bytes(), pki.intermediate.certificate)
        loads.append(time.perf_counter() - start)
    assert len(snapshot.revoked_serials) == serials

    # Where the time goes (one run), and the baseline of iterating cryptography's entry objects.
    start = time.perf_counter()
    crl = x509.load_der_x509_crl(der)
    parsed = time.perf_counter() - start
    start = time.perf_counter()
    tbs = _tbs_bytes(der)
    assert _signature_valid(crl, tbs, pki.intermediate.key.public_key())  # type: ignore[arg-type]
    signed = time.perf_counter() - start
    start = time.perf_counter()
    _revoked_serials(tbs)
    serial_set = time.perf_counter() - start
    start = time.perf_counter()
    frozenset(entry.serial_number for entry in crl)
    baseline = time.perf_counter() - start

    probe = 0x4000_0000_0000_0000_0000_0000_0000_0000 + 12345 * 7919
    start = time.perf_counter()
    for _ in range(100_000):
        _ = probe in snapshot.revoked_serials
    lookup = (time.perf_counter() - start) / 100_000
    print(
        f"CRL load ({serials:,} serials, read + parse + signature + frozenset): median of 3 "
        f"{statistics.median(loads):.2f} s (target <= 2 s) "
        f"[parse {parsed:.2f} s, signature {signed:.2f} s, serial scan {serial_set:.2f} s; "
        f"baseline frozenset over cryptography entries {baseline:.2f} s]; "
        f"lookup {lookup * 1e9:.0f} ns"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--serials", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        pki = ensure_dev_pki(Path(directory) / "pki")
        bench_verify(pki, args.runs)
        bench_crl(pki, args.serials, Path(directory))


if __name__ == "__main__":
    main()
