"""X-Gateway-Assertion: a short-lived JWT (ES256) telling the portal whom the gateway let in, for which request.

The portal verifies it with the public key published at ``/.gateway/jwks.json`` and checks ``iss``, ``aud``,
``exp`` and ``nbf``; unlike the plain X-Gateway-* headers it cannot be forged by a hop that reaches the
portal without going through the gateway. It is bound to the request like a DPoP proof (RFC 9449): ``htm``
is the method and ``htu`` the normalised path the portal receives (without the query), so a token lifted
from one request is worthless on another path or method; ``rule`` names the policy rule that let it through.

Signing costs about 0.1 ms of CPU through joserfc, of which the signature is half: the token is therefore
put together here (its header encoded once, the signature by ``cryptography``); joserfc imports the key and
publishes it. Tokens are reused too (README, "What the portal receives"):

- safe methods (GET, HEAD, OPTIONS): one token per (session, rule, method, path), reused while more than half
  its lifetime remains. Its ``jti`` names the token, not the request: identical reads share it, and a
  portal must not refuse a repeated ``jti`` on them;
- other methods (POST, PUT, PATCH, DELETE) get a fresh token every time, never cached: a portal MAY keep the
  ``jti`` of state-changing requests for the token lifetime and refuse a repeat (replay).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc.jwk import ECKey

from gateway.identity import Identity
from gateway.policy.origin import SAFE_METHODS

ALGORITHM = "ES256"
#: Tokens kept per process (least recently used dropped first): one per live (session, rule, method, path).
_CACHE_SIZE = 8192


def generate_key_file(path: Path) -> None:
    """Write a new P-256 private key (PEM, mode 0600) if ``path`` does not exist yet."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.touch(mode=0o600)
    path.write_bytes(pem)


class AssertionSigner:
    """Signs identity assertions bound to a request; reuses tokens for safe methods (module doc)."""

    def __init__(self, key_pem: bytes, *, issuer: str, audience: str, lifetime: float) -> None:
        self._key = ECKey.import_key(key_pem)
        if self._key.curve_name != "P-256":
            raise ValueError("the assertion key must be an EC P-256 key (ES256)")
        self._kid = self._key.thumbprint()
        private_key = self._key.private_key
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise ValueError("the assertion key must be a private EC P-256 key (ES256)")
        self._private_key = private_key
        header = {"alg": ALGORITHM, "kid": self._kid, "typ": "JWT"}
        self._encoded_header = _b64(json.dumps(header, separators=(",", ":")).encode())
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self._cache: OrderedDict[tuple[str, str, str, str], tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def jwks(self) -> dict[str, Any]:
        public = self._key.as_dict(private=False)
        public.update({"kid": self._kid, "use": "sig", "alg": ALGORITHM})
        return {"keys": [public]}

    def assertion(
        self, identity: Identity, session_key: str, rule: str, now: float, *, method: str, path: str
    ) -> str:
        """The token for ``method path`` (the normalised path as forwarded, without the query)."""
        reusable = method in SAFE_METHODS
        cache_key = (session_key, rule, method, path)
        if reusable:
            with self._lock:
                cached = self._cache.get(cache_key)
                if cached is not None and cached[1] - now > self.lifetime / 2:
                    self._cache.move_to_end(cache_key)
                    return cached[0]
        expires = now + self.lifetime
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": identity.idnat,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(expires),
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": path,
            "auth_time": int(identity.auth_time),
            "amr": [identity.method.value],
            "auth_mode": identity.auth_mode,
            "professions": list(identity.professions),
            "family_name": identity.surname,
            "given_name": identity.given_name,
            "rule": rule,
        }
        if identity.card_kind is not None:
            claims["card_kind"] = identity.card_kind.value
        if identity.is_staff_or_organisation:
            # No profession to tell the portal: who the holder works for, and their number there.
            claims.update(
                structure_id=identity.structure_id,
                structure_name=identity.structure_name,
                employee_id=identity.employee_id,
            )
        token = self._sign(claims)
        if reusable:
            with self._lock:
                self._cache[cache_key] = (token, expires)
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return token

    def _sign(self, claims: dict[str, Any]) -> str:
        """The compact JWS (RFC 7515) of ``claims``: ES256 is the raw r || s, 32 bytes each (RFC 7518 3.4)."""
        signing_input = self._encoded_header + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
        r, s = decode_dss_signature(self._private_key.sign(signing_input, _ES256))
        signature = _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return (signing_input + b"." + signature).decode("ascii")


_ES256 = ec.ECDSA(hashes.SHA256())


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")
