"""X-Gateway-Assertion: a short-lived JWT (ES256) telling the portal whom the gateway let in.

The portal verifies it with the public key published at ``/.gateway/jwks.json`` and checks ``iss``,
``aud`` and ``exp``; unlike the plain X-Gateway-* headers it cannot be forged by a hop that reaches the
portal without going through the gateway.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

from gateway.identity import Identity

ALGORITHM = "ES256"
_CACHE_SIZE = 4096


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
    """Signs identity assertions; one token per session is reused while more than half its life remains."""

    def __init__(self, key_pem: bytes, *, issuer: str, audience: str, lifetime: float) -> None:
        self._key = ECKey.import_key(key_pem)
        if self._key.curve_name != "P-256":
            raise ValueError("the assertion key must be an EC P-256 key (ES256)")
        self._kid = self._key.thumbprint()
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self._cache: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def jwks(self) -> dict[str, Any]:
        public = self._key.as_dict(private=False)
        public.update({"kid": self._kid, "use": "sig", "alg": ALGORITHM})
        return {"keys": [public]}

    def assertion(self, identity: Identity, session_key: str, rule: str, now: float) -> str:
        cache_key = (session_key, rule)
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
            "exp": int(expires),
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
        token = jwt.encode({"alg": ALGORITHM, "kid": self._kid, "typ": "JWT"}, claims, self._key)
        with self._lock:
            self._cache[cache_key] = (token, expires)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return token
