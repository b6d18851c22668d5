from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.authn.card.certificate import format_serial
from gateway.authn.card.verify import (
    CardError,
    CardVerifier,
    CrlSource,
    CrlStore,
    verify_challenge_signature,
)
from gateway.devtools.pki import DevPki, key_usage, refresh_crls, revoke, sign_crl, write_crl
from gateway.identity import LoginMethod
from gateway.policy.decision import Reason
from tests.support.openssl_pki import OpensslPki
from tests.support.pki import custom_card, software_card, verifier_for
from tests.support.softhsm import CardSet


def _reason(verifier: CardVerifier, cert: x509.Certificate | bytes, now: datetime) -> Reason:
    with pytest.raises(CardError) as caught:
        verifier.verify(cert, now)
    return caught.value.reason


def test_valid_card_gives_identity(dev_pki: DevPki) -> None:
    verifier, _ = verifier_for(dev_pki)
    cert = software_card(dev_pki, title="Pharmacien")
    now = datetime.now(UTC)
    identity = verifier.verify(cert.public_bytes(serialization.Encoding.PEM), now)
    assert identity.idnat == "810002813839"
    assert identity.method is LoginMethod.CARD
    assert identity.auth_mode == "CARD"
    assert identity.auth_time == now.timestamp()
    assert identity.professions == ("21",)
    assert identity.card_serial == format_serial(cert.serial_number)
    assert identity.card_issuer.startswith("CN=TEST AC IGC-SANTE ELEMENTAIRE PERSONNES")
    # DER is accepted too
    assert verifier.verify(cert.public_bytes(serialization.Encoding.DER), now).idnat == "810002813839"


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        ("doctor", None),
        ("pharmacist-ec", None),
        ("staff", None),
        ("expired", Reason.CARD_EXPIRED),
        ("not-yet-valid", Reason.CARD_NOT_YET_VALID),
        ("revoked", Reason.CARD_REVOKED),
        ("wrong-ca", Reason.CARD_UNTRUSTED),
    ],
)
def test_every_softhsm_card_variant(
    dev_pki: DevPki, softhsm_cards: CardSet, card: str, reason: Reason | None
) -> None:
    verifier, _ = verifier_for(dev_pki)  # after the cards: the revoked one is in the CRL
    pem = softhsm_cards[card].pem_path.read_bytes()
    now = datetime.now(UTC)
    if reason is None:
        assert verifier.verify(pem, now).idnat == softhsm_cards[card].idnat
    else:
        assert _reason(verifier, pem, now) is reason


def test_dates_are_checked_against_the_given_time(dev_pki: DevPki) -> None:
    verifier, _ = verifier_for(dev_pki, grace=timedelta(days=4000))
    cert = software_card(dev_pki)
    assert _reason(verifier, cert, cert.not_valid_after_utc + timedelta(seconds=1)) is Reason.CARD_EXPIRED
    assert (
        _reason(verifier, cert, cert.not_valid_before_utc - timedelta(seconds=1)) is Reason.CARD_NOT_YET_VALID
    )


def test_key_usage_without_digital_signature(dev_pki: DevPki) -> None:
    verifier, _ = verifier_for(dev_pki)
    now = datetime.now(UTC)
    cert = custom_card(dev_pki, key_usage=key_usage(digital_signature=False, key_encipherment=True))
    assert _reason(verifier, cert, now) is Reason.CARD_BAD_KEY_USAGE
    assert _reason(verifier, custom_card(dev_pki), now) is Reason.CARD_BAD_KEY_USAGE  # no KeyUsage at all
    server_only = custom_card(dev_pki, key_usage=key_usage(), eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert _reason(verifier, server_only, now) is Reason.CARD_BAD_KEY_USAGE


def test_unknown_title_on_a_trusted_card(dev_pki: DevPki) -> None:
    verifier, _ = verifier_for(dev_pki)
    assert _reason(verifier, software_card(dev_pki, title="Astronaute"), datetime.now(UTC)) is (
        Reason.CARD_UNKNOWN_PROFESSION
    )


def test_garbage_is_malformed(dev_pki: DevPki) -> None:
    verifier, _ = verifier_for(dev_pki)
    assert _reason(
        verifier, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", datetime.now(UTC)
    ) is (Reason.CARD_MALFORMED)
    assert _reason(verifier, b"\x30\x03\x02\x01\x00", datetime.now(UTC)) is Reason.CARD_MALFORMED


def test_self_signed_card_is_untrusted(dev_pki: DevPki) -> None:
    verifier, _ = verifier_for(dev_pki)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = software_card(dev_pki)
    forged = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        forged = forged.add_extension(extension.value, extension.critical)
    from cryptography.hazmat.primitives import hashes

    assert _reason(verifier, forged.sign(key, hashes.SHA256()), datetime.now(UTC)) is Reason.CARD_UNTRUSTED


# ---------------------------------------------------------------------------------------------- CRLs


def test_missing_crl_fails_closed(dev_pki: DevPki) -> None:
    store = CrlStore([CrlSource(str(dev_pki.root.crl_path), dev_pki.root.certificate)])  # no intermediate CRL
    store.refresh()
    verifier = CardVerifier(dev_pki.trust_anchors, dev_pki.intermediates, store)
    assert _reason(verifier, software_card(dev_pki), datetime.now(UTC)) is Reason.CRL_UNAVAILABLE


def test_unreadable_crl_source_fails_closed(dev_pki: DevPki, tmp_path: Path) -> None:
    store = CrlStore(
        [
            CrlSource(str(dev_pki.root.crl_path), dev_pki.root.certificate),
            CrlSource(str(tmp_path / "missing.crl"), dev_pki.intermediate.certificate),
        ]
    )
    assert len(store.refresh()) == 1
    verifier = CardVerifier(dev_pki.trust_anchors, dev_pki.intermediates, store)
    assert _reason(verifier, software_card(dev_pki), datetime.now(UTC)) is Reason.CRL_UNAVAILABLE


def test_stale_crl_fails_closed_after_grace(dev_pki: DevPki) -> None:
    assert dev_pki.intermediate.crl_path is not None
    next_update = x509.load_pem_x509_crl(dev_pki.intermediate.crl_path.read_bytes()).next_update_utc
    assert next_update is not None
    verifier, _ = verifier_for(dev_pki, grace=timedelta(hours=1))
    cert = software_card(dev_pki)
    assert verifier.verify(cert, next_update + timedelta(minutes=59)).idnat  # within grace
    assert _reason(verifier, cert, next_update + timedelta(minutes=61)) is Reason.CRL_UNAVAILABLE


def test_crl_with_bad_signature_is_rejected(own_pki: DevPki) -> None:
    cert = software_card(own_pki)
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_crl(own_pki.intermediate, sign_crl(own_pki.intermediate, {}, datetime.now(UTC), signing_key=forger))
    store = CrlStore(
        [
            CrlSource(str(own_pki.root.crl_path), own_pki.root.certificate),
            CrlSource(str(own_pki.intermediate.crl_path), own_pki.intermediate.certificate),
        ]
    )
    errors = store.refresh()
    assert len(errors) == 1 and "signature" in errors[0]
    verifier = CardVerifier(own_pki.trust_anchors, own_pki.intermediates, store)
    assert _reason(verifier, cert, datetime.now(UTC)) is Reason.CRL_UNAVAILABLE


def test_crl_of_wrong_ca_with_same_name_is_rejected(own_pki: DevPki) -> None:
    # The impostor intermediate has the same DN: its CRL must not stand in for the real one.
    assert own_pki.intermediate.crl_path is not None and own_pki.wrong_intermediate.crl_path is not None
    own_pki.intermediate.crl_path.write_bytes(own_pki.wrong_intermediate.crl_path.read_bytes())
    store = CrlStore([CrlSource(str(own_pki.intermediate.crl_path), own_pki.intermediate.certificate)])
    assert len(store.refresh()) == 1


def test_revoked_intermediate_is_refused(own_pki: DevPki) -> None:
    cert = software_card(own_pki)
    revoke(own_pki, own_pki.intermediate.certificate.serial_number, datetime.now(UTC), ca=own_pki.root)
    verifier, _ = verifier_for(own_pki)
    assert _reason(verifier, cert, datetime.now(UTC)) is Reason.CARD_REVOKED


def test_refresh_picks_up_newly_revoked_serial(own_pki: DevPki) -> None:
    verifier, store = verifier_for(own_pki)
    cert = software_card(own_pki)
    assert verifier.verify(cert, datetime.now(UTC))
    store.start(interval=0.05)
    try:
        revoke(own_pki, cert.serial_number, datetime.now(UTC) + timedelta(seconds=1))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                verifier.verify(cert, datetime.now(UTC))
            except CardError as error:
                assert error.reason is Reason.CARD_REVOKED
                break
            time.sleep(0.02)
        else:
            pytest.fail("background refresh never saw the revocation")
    finally:
        store.stop()


def test_older_crl_does_not_replace_newer(own_pki: DevPki) -> None:
    verifier, store = verifier_for(own_pki)
    cert = software_card(own_pki, variant="revoked", now=datetime.now(UTC))
    store.refresh()
    assert own_pki.intermediate.crl_path is not None
    write_crl(own_pki.intermediate, sign_crl(own_pki.intermediate, {}, datetime.now(UTC) - timedelta(days=1)))
    store.refresh()
    assert _reason(verifier, cert, datetime.now(UTC)) is Reason.CARD_REVOKED


@pytest.fixture
def http_crl_server(own_pki: DevPki) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(own_pki.base_dir))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined,method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_crl_over_http(own_pki: DevPki, http_crl_server: str) -> None:
    cert = software_card(own_pki, variant="revoked")
    store = CrlStore(
        [
            CrlSource(f"{http_crl_server}/root.crl.pem", own_pki.root.certificate),
            CrlSource(f"{http_crl_server}/intermediate.crl.pem", own_pki.intermediate.certificate),
        ]
    )
    assert store.refresh() == []
    verifier = CardVerifier(own_pki.trust_anchors, own_pki.intermediates, store)
    assert _reason(verifier, cert, datetime.now(UTC)) is Reason.CARD_REVOKED
    refresh_crls(own_pki, datetime.now(UTC))
    assert verifier.verify(software_card(own_pki), datetime.now(UTC)).idnat


# ---------------------------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("card", ["doctor", "pharmacist-ec"])
def test_signature_made_on_the_token_verifies(softhsm_cards: CardSet, card: str) -> None:
    from gateway import pkcs11 as tokens

    token_card = softhsm_cards[card]
    data = b"cps-gateway-challenge-v1\nhttps://gw.example\nnonce"
    signature = tokens.sign(token_card.label, data, token_card.key_id)
    verify_challenge_signature(token_card.certificate, data, signature)
    with pytest.raises(CardError) as caught:
        verify_challenge_signature(token_card.certificate, data + b"x", signature)
    assert caught.value.reason is Reason.SIGNATURE_INVALID
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(CardError):
        verify_challenge_signature(token_card.certificate, data, tampered)


def test_fast_serial_scan_matches_cryptography(own_pki: DevPki) -> None:
    from gateway.authn.card.verify import _revoked_serials, _tbs_bytes, parse_crl

    now = datetime.now(UTC)
    serials = {1, 127, 128, 255, 256, 2**159 - 1, x509.random_serial_number()}
    crl = sign_crl(own_pki.intermediate, dict.fromkeys(serials, now), now)
    der = crl.public_bytes(serialization.Encoding.DER)
    assert _revoked_serials(_tbs_bytes(der)) == serials == {entry.serial_number for entry in crl}
    assert _tbs_bytes(der) == crl.tbs_certlist_bytes
    pem = crl.public_bytes(serialization.Encoding.PEM)
    assert parse_crl(pem, own_pki.intermediate.certificate).revoked_serials == serials
    assert parse_crl(der, own_pki.intermediate.certificate).revoked_serials == serials
    empty = sign_crl(own_pki.intermediate, {}, now).public_bytes(serialization.Encoding.DER)
    assert parse_crl(empty, own_pki.intermediate.certificate).revoked_serials == frozenset()


def test_tampered_crl_bytes_are_rejected(own_pki: DevPki) -> None:
    from gateway.authn.card.verify import parse_crl

    now = datetime.now(UTC)
    der = bytearray(sign_crl(own_pki.intermediate, {4242: now}, now).public_bytes(serialization.Encoding.DER))
    position = bytes(der).index((4242).to_bytes(2, "big"))
    der[position + 1] ^= 0x01  # un-revoke 4242 by editing its serial
    with pytest.raises(ValueError, match="signature"):
        parse_crl(bytes(der), own_pki.intermediate.certificate)


def test_delta_and_partial_crls_are_not_accepted(own_pki: DevPki) -> None:
    from cryptography.hazmat.primitives import hashes

    from gateway.authn.card.verify import parse_crl

    now = datetime.now(UTC)
    ca = own_pki.intermediate

    def crl_with(extension: x509.ExtensionType) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.certificate.subject)
            .last_update(now)
            .next_update(now + timedelta(days=1))
            .add_extension(extension, critical=True)
        )
        return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    with pytest.raises(ValueError, match="delta"):
        parse_crl(crl_with(x509.DeltaCRLIndicator(1)), ca.certificate)
    only_some = x509.IssuingDistributionPoint(
        full_name=None,
        relative_name=None,
        only_contains_user_certs=False,
        only_contains_ca_certs=False,
        only_some_reasons=frozenset({x509.ReasonFlags.key_compromise}),
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )
    with pytest.raises(ValueError, match="partial"):
        parse_crl(crl_with(only_some), ca.certificate)


# ------------------------------------------------------------------- CRL scopes (openssl ca -gencrl)


def _tool_verifier(pki: OpensslPki) -> tuple[CardVerifier, list[str]]:
    store = CrlStore(
        [
            CrlSource(str(pki.root_crl), pki.root.certificate),
            CrlSource(str(pki.people_crl), pki.people.certificate),
        ]
    )
    errors = store.refresh()
    return CardVerifier([pki.root.certificate], [pki.people.certificate], store), errors


def _tool_reason(pki: OpensslPki, card: Path) -> Reason | None:
    verifier, _ = _tool_verifier(pki)
    try:
        verifier.verify(card.read_bytes(), datetime.now(UTC))
    except CardError as error:
        return error.reason
    return None


@pytest.mark.parametrize(
    ("root_crl", "people_crl", "reason"),
    [
        # An ARL: the root's complete list of revoked CA certificates (RFC 5280 §5.2.5 onlyContainsCACerts).
        ("crl_only_ca", "crl_complete", None),
        # A complete list of the intermediate's user certificates, named like the card's distribution point.
        ("crl_complete", "crl_only_user", None),
        ("crl_only_ca", "crl_only_user", None),
        # Scopes that do not cover the certificate checked: no CRL for it, fail closed.
        ("crl_only_user", "crl_complete", Reason.CRL_UNAVAILABLE),
        ("crl_complete", "crl_only_ca", Reason.CRL_UNAVAILABLE),
        ("crl_complete", "crl_other_partition", Reason.CRL_UNAVAILABLE),
        # Partial CRLs never stand for "not revoked".
        ("crl_complete", "crl_some_reasons", Reason.CRL_UNAVAILABLE),
        ("crl_complete", "crl_indirect", Reason.CRL_UNAVAILABLE),
        ("crl_complete", "crl_delta", Reason.CRL_UNAVAILABLE),
        ("crl_delta", "crl_complete", Reason.CRL_UNAVAILABLE),
    ],
)
def test_a_crl_counts_only_for_the_certificates_its_scope_covers(
    own_tool_pki: OpensslPki, tmp_path: Path, root_crl: str, people_crl: str, reason: Reason | None
) -> None:
    pki = own_tool_pki
    card = pki.software_card("cps", "0x0C01", tmp_path / "card.pem")
    pki.root.write_crl(pki.root_crl, extensions=root_crl)
    pki.people.write_crl(pki.people_crl, extensions=people_crl)
    assert _tool_reason(pki, card) is reason


@pytest.mark.parametrize(("root_crl", "people_crl"), [("crl_only_ca", "crl_only_user")])
def test_scoped_crls_still_revoke(
    own_tool_pki: OpensslPki, tmp_path: Path, root_crl: str, people_crl: str
) -> None:
    pki = own_tool_pki
    card = pki.software_card("cps", "0x0C02", tmp_path / "card.pem")
    pki.people.revoke(card)
    pki.root.write_crl(pki.root_crl, extensions=root_crl)
    pki.people.write_crl(pki.people_crl, extensions=people_crl)
    assert _tool_reason(pki, card) is Reason.CARD_REVOKED
    # The root's ARL revokes the intermediate itself: every card under it is refused.
    other = pki.software_card("cps", "0x0C03", tmp_path / "other.pem")
    pki.root.revoke(pki.people.cert_path)
    pki.root.write_crl(pki.root_crl, extensions=root_crl)
    assert _tool_reason(pki, other) is Reason.CARD_REVOKED


def test_partial_crls_are_refused_at_load_and_named(own_tool_pki: OpensslPki) -> None:
    pki = own_tool_pki
    expected = {
        "crl_some_reasons": "some revocation reasons",
        "crl_indirect": "indirect",
        "crl_delta": "delta",
    }
    for extensions, message in expected.items():
        pki.people.write_crl(pki.people_crl, extensions=extensions)
        _, errors = _tool_verifier(pki)
        assert len(errors) == 1 and message in errors[0] and str(pki.people_crl) in errors[0]


def test_a_refresh_announces_only_the_serials_it_lists_for_the_first_time(
    own_tool_pki: OpensslPki, tmp_path: Path
) -> None:
    pki = own_tool_pki
    early = pki.software_card("cps", "0x0C21", tmp_path / "early.pem")
    late = pki.software_card("cps", "0x0C22", tmp_path / "late.pem")
    pki.people.revoke(early)
    pki.people.write_crl(pki.people_crl)
    announced: list[tuple[str, frozenset[int]]] = []
    store = CrlStore(
        [CrlSource(str(pki.people_crl), pki.people.certificate)],
        on_new_revocations=lambda issuer, serials: announced.append((issuer.rfc4514_string(), serials)),
    )
    assert store.refresh() == [] and announced == []  # the first load: nothing of this process is older
    pki.people.revoke(late)
    pki.people.write_crl(pki.people_crl)
    assert store.refresh() == [] and store.refresh() == []
    assert announced == [(pki.people.certificate.subject.rfc4514_string(), frozenset({0x0C22}))]
    issuer = pki.people.certificate.subject.rfc4514_string()
    assert store.lists(issuer, 0x0C21) and store.lists(issuer, 0x0C22) and not store.lists(issuer, 0x0C23)


def test_a_session_tags_its_card_and_the_cas_above_it(own_tool_pki: OpensslPki, tmp_path: Path) -> None:
    from gateway.authn.card.certificate import card_tag

    pki = own_tool_pki
    card = x509.load_pem_x509_certificate(pki.software_card("cps", "0x0C31", tmp_path / "c.pem").read_bytes())
    verifier, _ = _tool_verifier(pki)
    people = pki.people.certificate
    assert verifier.session_tags(verifier.verify(card, datetime.now(UTC))) == (
        card_tag(card.issuer.rfc4514_string(), 0x0C31),
        card_tag(people.issuer.rfc4514_string(), people.serial_number),
    )


def test_only_a_card_logins_certificate_is_looked_up_at_each_request(own_tool_pki: OpensslPki) -> None:
    from gateway.identity import Identity

    verifier, _ = _tool_verifier(own_tool_pki)
    issuer = own_tool_pki.people.certificate.subject.rfc4514_string()
    card = Identity("810002813839", LoginMethod.CARD, 0.0, card_serial="0C41", card_issuer=issuer)
    assert not verifier.revoked_since_login(card)
    assert not verifier.revoked_since_login(Identity("810002813839", LoginMethod.CARD, 0.0))  # tools, tests
    assert not verifier.revoked_since_login(Identity("810002813839", LoginMethod.ECPS, 0.0, card_serial="zz"))
    # A serial no card login wrote: the session ends rather than being trusted.
    assert verifier.revoked_since_login(Identity("810002813839", LoginMethod.CARD, 0.0, card_serial="zz"))
