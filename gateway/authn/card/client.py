"""Client side of challenge-response card login: ``gateway card login``.

POST ``/.gateway/card/challenge`` -> nonce; sign ``challenge_message(audience, nonce)`` with the card key on
the token; POST ``/.gateway/card/verify`` with the nonce, the card certificate and the signature; keep the
session cookies in a Netscape cookie jar usable with ``curl -b``. The client refuses to sign for an audience
other than the origin it talks to: a malicious server cannot make it sign a challenge for another gateway.
"""

from __future__ import annotations

import base64
import http.cookiejar
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import pkcs11 as tokens
from gateway.authn.card.certificate import CardError, check_key_usage
from gateway.authn.card.challenge import challenge_message

CHALLENGE_PATH = "/.gateway/card/challenge"
VERIFY_PATH = "/.gateway/card/verify"


class CardLoginError(Exception):
    """The login failed; the message says at which step (and the gateway's reason when it gave one)."""


class CardTokenError(CardLoginError):
    """The card (PKCS#11 module, token, certificate or key) could not be used."""


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise CardLoginError(f"not an http(s) URL: {url!r}")
    default_port = 443 if parts.scheme == "https" else 80
    port = "" if parts.port in (None, default_port) else f":{parts.port}"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{port}"


def _is_for_authentication(der: bytes) -> bool:
    """A card's authentication certificate, not its signature one: usable for a login (see check_key_usage) and
    without nonRepudiation, the mark of a signature key."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        check_key_usage(certificate)
        return not certificate.extensions.get_extension_for_class(x509.KeyUsage).value.content_commitment
    except (CardError, ValueError):
        return False


def authentication_certificate(
    certificates: Sequence[tokens.TokenCertificate], token_label: str, cert_id: str | None = None
) -> tokens.TokenCertificate:
    """The certificate to log in with among a token's: the one with CKA_ID ``cert_id`` (hex) when given, else
    THE authentication certificate (a CPS3 card also holds a signature certificate, and the module's listing
    order says nothing about which is which); TokenError when there is none or no single one."""
    if cert_id is not None:
        try:
            wanted = bytes.fromhex(cert_id)
        except ValueError:
            raise tokens.TokenError(f"--cert-id {cert_id!r} is not hexadecimal") from None
        for certificate in certificates:
            if certificate.key_id == wanted:
                return certificate
        raise tokens.TokenError(
            f"no certificate with CKA_ID {cert_id} on token {token_label!r}: {_listing(certificates)}"
        )
    candidates = [certificate for certificate in certificates if _is_for_authentication(certificate.der)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise tokens.TokenError(
            f"no authentication certificate (digitalSignature, clientAuth) on token {token_label!r}: "
            f"{_listing(certificates)}"
        )
    raise tokens.TokenError(
        f"several authentication certificates on token {token_label!r}, choose one with --cert-id: "
        f"{_listing(candidates)}"
    )


def _listing(certificates: Sequence[tokens.TokenCertificate]) -> str:
    return "; ".join(f"CKA_ID {c.key_id.hex()} ({c.label})" for c in certificates) or "none"


def _opener(jar: http.cookiejar.CookieJar, cacert: str | None) -> urllib.request.OpenerDirector:
    try:
        context = ssl.create_default_context(cafile=cacert)
    # ssl.SSLError is an OSError too. ssl names neither the file nor, for a bad one, the problem clearly.
    except OSError as exc:
        reason = "no PEM CA certificate in it" if isinstance(exc, ssl.SSLError) else exc.strerror
        raise CardLoginError(f"cannot use --cacert {cacert}: {reason}") from None
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), urllib.request.HTTPCookieProcessor(jar)
    )


def _post_json(opener: urllib.request.OpenerDirector, url: str, body: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(  # noqa: S310 - origin_of() allows http(s) only
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with opener.open(request, timeout=30) as response:
            return dict(json.loads(response.read() or b"{}"))
    except urllib.error.HTTPError as error:
        raise CardLoginError(f"{url} answered {error.code}: {_refusal(error.read(4000))}") from None
    except urllib.error.URLError as error:
        reason = error.reason.strerror if isinstance(error.reason, OSError) else error.reason
        raise CardLoginError(f"{url}: {reason or error}") from None
    except (OSError, ValueError) as error:
        raise CardLoginError(f"{url}: {error}") from None


def _refusal(body: bytes) -> str:
    """The gateway's JSON refusal in words ("message (reason)"); any other body as text."""
    text = body.decode("utf-8", "replace")
    try:
        refusal = json.loads(text)
    except ValueError:
        return text.strip()
    if not isinstance(refusal, dict) or "error" not in refusal:
        return text.strip()
    message = str(refusal.get("message") or "").strip()
    return f"{message} ({refusal['error']})" if message else str(refusal["error"])


def card_login(
    url: str,
    token_label: str,
    module_path: str = tokens.SOFTHSM_MODULE,
    pin: str | None = None,
    cookie_jar_path: str | Path = "cookies.txt",
    cacert: str | None = None,
    cert_id: str | None = None,
) -> str:
    """Log in to the gateway at ``url`` with the card ``token_label``; return the subject (idNat).

    The card's authentication certificate is chosen by :func:`authentication_certificate` (``cert_id``, the
    CKA_ID in hex, chooses it explicitly) and the challenge is signed with the private key of the same CKA_ID.
    """
    origin = origin_of(url)
    jar = http.cookiejar.MozillaCookieJar(str(cookie_jar_path))
    opener = _opener(jar, cacert)

    challenge = _post_json(opener, origin + CHALLENGE_PATH, {})
    nonce, audience = str(challenge.get("nonce", "")), str(challenge.get("audience", ""))
    if not nonce or audience != origin:
        raise CardLoginError(
            f"refusing to sign a challenge for audience {audience!r} (talking to {origin!r})"
        )

    try:
        card_certificate = authentication_certificate(
            tokens.token_certificates(token_label, module_path), token_label, cert_id
        )
        signature = tokens.sign(
            token_label, challenge_message(audience, nonce), card_certificate.key_id, pin, module_path
        )
    except tokens.TokenError as error:
        raise CardTokenError(str(error)) from None
    pem = x509.load_der_x509_certificate(card_certificate.der).public_bytes(serialization.Encoding.PEM)

    result = _post_json(
        opener,
        origin + VERIFY_PATH,
        {
            "nonce": nonce,
            "certificate": pem.decode("ascii"),
            "signature": base64.b64encode(signature).decode("ascii"),
        },
    )
    for cookie in jar:
        if cookie.expires is None:
            # curl reads expiry 0 as "session cookie"; the empty field Python writes would shift
            # curl's tab-separated columns and lose the cookie.
            cookie.expires = 0
    # ignore_discard: session cookies would otherwise not be written at all.
    jar.save(ignore_discard=True, ignore_expires=True)
    return str(result.get("subject") or result.get("idnat") or "")
