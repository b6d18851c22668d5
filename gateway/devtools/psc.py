"""A stand-in for Pro Santé Connect: a real OpenID Connect provider for development and tests.

Built on authlib's server side (code flow + PKCE + OpenID Connect), with in-memory storage. It imitates
what matters to the gateway: the Keycloak-like issuer path, the NON-standard discovery path
``<issuer>/.well-known/wallet-openid-configuration``, RS256 id_tokens with the ``scope_all`` claim shapes,
userinfo as a signed JWT, RP-initiated and back-channel logout.

The "approve on your phone" page stands in for the e-CPS mobile app. Everything under ``/_test/`` and the
``psc_test_auto_approve`` parameter are STAND-IN FEATURES for tests: no real provider has them.
Never expose this process beyond the loopback interface.

Client authentication: client_secret_basic, private_key_jwt (RS256 or ES256 assertions, the algorithms
advertised being settable) and tls_client_auth (RFC 8705). For the latter the stand-in sits behind a TLS
terminator that asks for the client certificate (nginx with ``ssl_verify_client``) and hands it over in
``X-SSL-Client-Cert`` / ``X-SSL-Client-Verify`` (``--client-certificate-header``); access tokens issued to a
client that presented a certificate are bound to it (``cnf.x5t#S256``), and userinfo then demands that same
certificate. ``--mtls-url`` publishes that terminator's endpoints as ``mtls_endpoint_aliases``. Pushed
authorization requests (RFC 9126) are served, and can be required (``--require-par``).

Run::

    python -m gateway.devtools.psc --port 9080 [--issuer-path /auth/realms/esante-wallet] \
        [--identities identities.yaml] [--clients clients.yaml] \
        [--client-id gateway --client-secret S --redirect-uri https://gw.example/.gateway/ecps/callback \
         --post-logout-redirect-uri URI --backchannel-logout-uri URI \
         --client-public-key pub.pem --key-id K --userinfo-format jwt|json] \
        [--public-url https://127.0.0.1:9443 --mtls-url https://127.0.0.1:9444 --client-certificate-header] \
        [--client-assertion-alg RS256 ...] [--require-par]

The issuer is ``<public-url><issuer-path>`` (public URL by default ``http://127.0.0.1:<port>``); discovery is
at ``<issuer>/.well-known/wallet-openid-configuration`` (and the standard path).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import requests
import yaml
from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector, current_token
from authlib.integrations.flask_oauth2.requests import FlaskOAuth2Payload, FlaskOAuth2Request
from authlib.oauth2 import OAuth2Error, OAuth2Request
from authlib.oauth2.rfc6749 import InvalidClientError, InvalidRequestError, grants
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin, ClientMixin, TokenMixin
from authlib.oauth2.rfc6750 import BearerTokenValidator, InvalidTokenError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core.grants import OpenIDCode
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, Response, jsonify, redirect, request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from werkzeug.datastructures import MultiDict
from werkzeug.serving import WSGIRequestHandler, make_server

DEFAULT_ISSUER_PATH = "/auth/realms/esante-wallet"
PSC_DISCOVERY_SUFFIX = "/.well-known/wallet-openid-configuration"
STANDARD_DISCOVERY_SUFFIX = "/.well-known/openid-configuration"
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
SUPPORTED_SCOPES = ("openid", "scope_all")
DEFAULT_ACR = "eidas1"
ID_TOKEN_LIFETIME = 300
ACCESS_TOKEN_LIFETIME = 120  # PSC: 2 minutes
CODE_LIFETIME = 60
PAR_LIFETIME = 60
PAR_REQUEST_URI_PREFIX = "urn:ietf:params:oauth:request_uri:"
TOKEN_PATH = "/protocol/openid-connect/token"  # noqa: S105 - a path
USERINFO_PATH = "/protocol/openid-connect/userinfo"
PAR_PATH = "/protocol/openid-connect/ext/par/request"  # Keycloak's
CLIENT_AUTH_METHODS = ("client_secret_basic", "private_key_jwt", "tls_client_auth")
DEFAULT_CLIENT_ASSERTION_ALGS = ("RS256", "ES256")
#: Set by the TLS terminator in front (nginx: $ssl_client_escaped_cert and $ssl_client_verify).
CLIENT_CERT_HEADER = "X-SSL-Client-Cert"
CLIENT_VERIFY_HEADER = "X-SSL-Client-Verify"
#: Stand-in feature: ``psc_test_auto_approve=1&login_hint=<idNat>`` approves without the page,
#: ``psc_test_auto_approve=deny`` refuses (as if the user pressed "Refuser").
AUTO_APPROVE_PARAM = "psc_test_auto_approve"
FAULT_NAMES = frozenset(
    {
        "wrong_nonce",
        "wrong_issuer",
        "bad_signature",
        "expired_token",
        "wrong_audience",
        "unavailable",
        "omit_acr",  # id_token without acr (observed at PSC)
        "acr",  # force this acr value instead of the requested one
        "omit_auth_time",  # id_token without auth_time, even when max_age was requested
    }
)


# ---------------------------------------------------------------------------------------------------
# Test identities and registered clients


@dataclass(frozen=True, slots=True)
class TestIdentity:
    """A professional who can approve logins on the stand-in "phone"."""

    idnat: str
    family_name: str
    given_name: str
    profession: str  # TRE_G15 code
    auth_mode: str  # "MOBILE" (e-CPS app) or "CARD"
    categorie: str = "C"  # codeCategorieProfessionnelle: C civil
    savoir_faire: str = ""
    civilite: str = "M"
    email: str = ""
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def sub(self) -> str:
        return f"f:{self.uuid}:{self.idnat}"

    def claims(self) -> dict[str, Any]:
        """The ``scope_all`` claims of domain.md."""
        return {
            "sub": self.sub,
            "SubjectNameID": self.idnat,
            "preferred_username": self.idnat,
            "given_name": self.given_name,
            "family_name": self.family_name,
            "email": self.email,
            "authMode": self.auth_mode,
            "SubjectRefPro": {
                "codeCivilite": self.civilite,
                "exercices": [
                    {
                        "codeProfession": self.profession,
                        "codeCategorieProfessionnelle": self.categorie,
                        "codeSavoirFaire": self.savoir_faire,
                        "nomDexercice": self.family_name,
                        "prenomDexercice": self.given_name,
                        "activities": [
                            {
                                "codeModeExercice": "L",
                                "codeSecteurDactivite": "SA07",
                                "codeRole": "FON-01",
                                "numeroFinessSite": "",
                                "numeroSiretSite": "",
                                "raisonSocialeSite": "CABINET DE TEST",
                            }
                        ],
                    }
                ],
            },
        }


DEFAULT_IDENTITIES: tuple[TestIdentity, ...] = (
    TestIdentity(
        "810001234567", "DUPONT", "JEAN", "10", "MOBILE", savoir_faire="SM54", email="jean.dupont@test"
    ),
    TestIdentity("810009876543", "MARTIN", "CLAIRE", "21", "MOBILE", civilite="MME", email="c.martin@test"),
    TestIdentity("810005555555", "DURAND", "PAUL", "10", "CARD", savoir_faire="SM26", email="p.durand@test"),
)


@dataclass(frozen=True, slots=True)
class RegisteredClient(ClientMixin):
    """A relying party registered with the stand-in (like a service registered with ANS)."""

    client_id: str
    redirect_uris: tuple[str, ...]
    client_secret: str = ""
    #: One of CLIENT_AUTH_METHODS: private_key_jwt needs ``jwks`` (the public keys), tls_client_auth
    #: ``tls_client_auth_subject_dn`` (RFC 8705 2.1.2, compared with the certificate's RFC 4514 subject).
    token_endpoint_auth_method: str = "client_secret_basic"  # noqa: S105 - a method name
    jwks: dict[str, Any] | None = None
    tls_client_auth_subject_dn: str = ""
    post_logout_redirect_uris: tuple[str, ...] = ()
    backchannel_logout_uri: str = ""
    #: "jwt" (signed, application/jwt) or "json".
    userinfo_format: str = "jwt"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in scope.split() if s in SUPPORTED_SCOPES)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(self.client_secret) and secrets.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint in ("token", "par") and method == self.token_endpoint_auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegisteredClient:
        jwks = data.get("jwks")
        if jwks is None and data.get("public_key_pem"):
            public = public_jwk(str(data["public_key_pem"]))
            if data.get("key_id"):
                public["kid"] = str(data["key_id"])
            jwks = {"keys": [public]}
        return cls(
            client_id=str(data["client_id"]),
            redirect_uris=tuple(str(u) for u in data.get("redirect_uris", ())),
            client_secret=str(data.get("client_secret", "")),
            token_endpoint_auth_method=str(data.get("token_endpoint_auth_method", "client_secret_basic")),
            jwks=jwks,
            tls_client_auth_subject_dn=str(data.get("tls_client_auth_subject_dn", "")),
            post_logout_redirect_uris=tuple(str(u) for u in data.get("post_logout_redirect_uris", ())),
            backchannel_logout_uri=str(data.get("backchannel_logout_uri", "")),
            userinfo_format=str(data.get("userinfo_format", "jwt")),
        )


def public_jwk(public_key_pem: str) -> dict[str, Any]:
    """The JWK of an RSA or EC public key (a client registering for private_key_jwt)."""
    key = serialization.load_pem_public_key(public_key_pem.encode())
    key_class = ECKey if isinstance(key, ec.EllipticCurvePublicKey) else RSAKey
    return dict(key_class.import_key(public_key_pem).as_dict(private=False))


@dataclass(frozen=True, slots=True)
class PscConfig:
    issuer: str
    clients: tuple[RegisteredClient, ...]
    identities: tuple[TestIdentity, ...] = DEFAULT_IDENTITIES
    #: Accept the stand-in auto-approve parameter (tests); the page is always available.
    allow_auto_approve: bool = True
    #: Believe the client certificate headers of the TLS terminator in front (mTLS).
    client_certificate_header: bool = False
    #: Base URL of the terminator's mTLS endpoints, published as mtls_endpoint_aliases (RFC 8705 5).
    mtls_url: str = ""
    client_assertion_algs: tuple[str, ...] = DEFAULT_CLIENT_ASSERTION_ALGS
    require_par: bool = False


# ---------------------------------------------------------------------------------------------------
# In-memory storage


@dataclass(slots=True)
class Approval:
    """The professional who approved a login on the phone, and when (the OIDC ``auth_time``)."""

    identity: TestIdentity
    auth_time: int
    sid: str


@dataclass(slots=True)
class AuthorizationCode(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    acr: str
    approval: Approval
    code_challenge: str
    code_challenge_method: str
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.approval.auth_time

    def get_acr(self) -> str:
        return self.acr

    def get_amr(self) -> list[str]:
        return []


@dataclass(slots=True)
class AccessToken(TokenMixin):
    access_token: str
    client: RegisteredClient
    scope: str
    approval: Approval
    expires_at: float
    #: RFC 8705 3: SHA-256 thumbprint of the client certificate the token is bound to ("" when unbound).
    certificate_thumbprint: str = ""

    def check_client(self, client: ClientMixin) -> bool:
        return client.get_client_id() == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return int(self.expires_at - time.time())

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at

    def is_revoked(self) -> bool:
        return False

    def get_user(self) -> Approval:
        return self.approval

    def get_client(self) -> RegisteredClient:
        return self.client


@dataclass
class ProviderState:
    """Everything the stand-in remembers; one lock because Flask's dev server is threaded."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    tokens: dict[str, AccessToken] = field(default_factory=dict)
    used_nonces: set[tuple[str, str]] = field(default_factory=set)
    used_assertion_ids: set[str] = field(default_factory=set)
    #: Pushed authorization requests: request_uri -> (parameters, expiry).
    pushed_requests: dict[str, tuple[MultiDict[str, str], float]] = field(default_factory=dict)
    #: sid -> (identity, client ids that received an id_token in that PSC session)
    sessions: dict[str, tuple[TestIdentity, set[str]]] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        with self.lock:
            self.codes.clear()
            self.tokens.clear()
            self.used_nonces.clear()
            self.used_assertion_ids.clear()
            self.pushed_requests.clear()
            self.sessions.clear()
            self.faults.clear()


# ---------------------------------------------------------------------------------------------------
# The provider


class Provider:
    """Keys, storage and token minting shared by the grant classes and the views."""

    def __init__(self, config: PscConfig) -> None:
        self.config = config
        self.issuer = config.issuer.rstrip("/")
        self.clients = {c.client_id: c for c in config.clients}
        self.identities = {i.idnat: i for i in config.identities}
        self.state = ProviderState()
        #: Published keys, newest last; older ones stay published after a rotation, like a real IdP.
        self.keys: list[RSAKey] = []
        self.rotate_keys()

    def rotate_keys(self) -> None:
        kid = secrets.token_hex(8)
        self.keys.append(RSAKey.generate_key(2048, {"kid": kid, "use": "sig", "alg": "RS256"}))
        # Same kid, different key: tokens that look right but whose signature does not verify.
        self.rogue_key = RSAKey.generate_key(2048, {"kid": kid, "use": "sig", "alg": "RS256"})

    @property
    def signing_key(self) -> RSAKey:
        return self.keys[-1]

    def url(self, suffix: str) -> str:
        return self.issuer + suffix

    def mtls_url(self, suffix: str) -> str:
        return self.config.mtls_url.rstrip("/") + _path_of(self.issuer) + suffix

    @property
    def token_endpoint(self) -> str:
        return self.url(TOKEN_PATH)

    def presented_certificate(self) -> x509.Certificate | None:
        """The client certificate the TLS terminator verified on this request, if it says so."""
        if (
            not self.config.client_certificate_header
            or request.headers.get(CLIENT_VERIFY_HEADER) != "SUCCESS"
        ):
            return None
        escaped = request.headers.get(CLIENT_CERT_HEADER, "")
        try:
            return x509.load_pem_x509_certificate(unquote(escaped).encode())
        except ValueError:
            return None

    def fault(self, name: str) -> Any:
        return self.state.faults.get(name)

    def sign(self, claims: dict[str, Any], *, typ: str | None = None) -> str:
        key = self.rogue_key if self.fault("bad_signature") else self.signing_key
        header = {"alg": "RS256", "kid": key.kid}
        if typ:
            header["typ"] = typ
        return jwt.encode(header, claims, key)

    def public_jwks(self) -> dict[str, Any]:
        return dict(KeySet(list(self.keys)).as_dict(private=False))

    def registered_claims(self, client_id: str) -> dict[str, Any]:
        """iss/aud/iat/exp, bent by the fault switches."""
        now = int(time.time())
        iat = now - 2 * ID_TOKEN_LIFETIME if self.fault("expired_token") else now
        return {
            "iss": self.issuer + "-evil" if self.fault("wrong_issuer") else self.issuer,
            "aud": "someone-else" if self.fault("wrong_audience") else client_id,
            "iat": iat,
            "exp": iat + ID_TOKEN_LIFETIME,
        }

    def id_token(self, code: AuthorizationCode) -> str:
        approval = code.approval
        claims = approval.identity.claims()
        claims.update(self.registered_claims(code.client_id))
        claims.update({"sid": approval.sid, "azp": code.client_id})
        if not self.fault("omit_auth_time"):
            claims["auth_time"] = approval.auth_time
        if code.nonce:
            claims["nonce"] = "not-your-nonce" if self.fault("wrong_nonce") else code.nonce
        acr = self.fault("acr") or code.acr
        if not self.fault("omit_acr"):
            claims["acr"] = acr
        return self.sign(claims)

    def userinfo(self, token: AccessToken) -> Response:
        claims = token.approval.identity.claims()
        if token.client.userinfo_format == "json":
            return jsonify(claims)
        claims.update(self.registered_claims(token.client.client_id))
        return Response(self.sign(claims), content_type="application/jwt")

    def logout_token(self, identity: TestIdentity, sid: str | None, client_id: str) -> str:
        """``sid=None``: a token naming only the subject (the RP ends all its sessions of that sub)."""
        claims = self.registered_claims(client_id)
        claims.update(
            {"sub": identity.sub, "jti": secrets.token_urlsafe(16), "events": {BACKCHANNEL_LOGOUT_EVENT: {}}}
        )
        if sid is not None:
            claims["sid"] = sid
        return self.sign(claims, typ="logout+jwt")

    def metadata(self) -> dict[str, Any]:
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": self.url("/protocol/openid-connect/auth"),
            "token_endpoint": self.token_endpoint,
            "userinfo_endpoint": self.url(USERINFO_PATH),
            "pushed_authorization_request_endpoint": self.url(PAR_PATH),
            "require_pushed_authorization_requests": self.config.require_par,
            "end_session_endpoint": self.url("/protocol/openid-connect/logout"),
            "jwks_uri": self.url("/protocol/openid-connect/certs"),
            "scopes_supported": list(SUPPORTED_SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "userinfo_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": list(CLIENT_AUTH_METHODS),
            "token_endpoint_auth_signing_alg_values_supported": list(self.config.client_assertion_algs),
            "tls_client_certificate_bound_access_tokens": True,
            "code_challenge_methods_supported": ["S256"],
            "acr_values_supported": ["eidas1", "eidas2", "eidas3"],
            "claims_parameter_supported": False,
            "frontchannel_logout_supported": False,
            "backchannel_logout_supported": True,
            "backchannel_logout_session_supported": True,
        }
        if self.config.mtls_url:
            document["mtls_endpoint_aliases"] = {
                "token_endpoint": self.mtls_url(TOKEN_PATH),
                "userinfo_endpoint": self.mtls_url(USERINFO_PATH),
                "pushed_authorization_request_endpoint": self.mtls_url(PAR_PATH),
            }
        return document


class PkceRequiredForEveryClient(CodeChallenge):
    """``CodeChallenge(required=True)`` only forces PKCE on public clients; PSC's RPs are confidential."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: missing 'code_challenge'")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE is required with code_challenge_method=S256")
        super().validate_code_challenge(grant, redirect_uri)

    def get_authorization_code_challenge(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.code_challenge

    def get_authorization_code_challenge_method(self, authorization_code: AuthorizationCode) -> str:
        return authorization_code.code_challenge_method


def build_grant_classes(provider: Provider) -> tuple[type[grants.AuthorizationCodeGrant], OpenIDCode]:
    state = provider.state

    class PscAuthorizationCodeGrant(grants.AuthorizationCodeGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = list(CLIENT_AUTH_METHODS)

        def save_authorization_code(self, code: str, request: Any) -> None:
            data = request.payload.data
            requested_acr = (data.get("acr_values") or DEFAULT_ACR).split()
            with state.lock:
                if data.get("nonce"):
                    state.used_nonces.add((request.client.client_id, data["nonce"]))
                state.codes[code] = AuthorizationCode(
                    code=code,
                    client_id=request.client.client_id,
                    redirect_uri=request.payload.redirect_uri,
                    scope=request.payload.scope,
                    nonce=data.get("nonce"),
                    acr=requested_acr[0] if requested_acr else DEFAULT_ACR,
                    approval=request.user,
                    code_challenge=data.get("code_challenge", ""),
                    code_challenge_method=data.get("code_challenge_method", ""),
                    expires_at=time.time() + CODE_LIFETIME,
                )

        def query_authorization_code(self, code: str, client: RegisteredClient) -> AuthorizationCode | None:
            with state.lock:
                found = state.codes.get(code)
            if found and found.client_id == client.client_id and time.time() < found.expires_at:
                return found
            return None

        def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
            with state.lock:
                state.codes.pop(authorization_code.code, None)

        def authenticate_user(self, authorization_code: AuthorizationCode) -> Approval:
            return authorization_code.approval

    class PscOpenIDCode(OpenIDCode):
        def exists_nonce(self, nonce: str, request: Any) -> bool:
            # Checked on every visit of the approval page; recorded only once a code is issued.
            with state.lock:
                return (request.payload.client_id, nonce) in state.used_nonces

        def encode_id_token(self, token: dict[str, Any], request: Any) -> str:
            code: AuthorizationCode = request.authorization_code
            with state.lock:
                _, clients = state.sessions.setdefault(code.approval.sid, (code.approval.identity, set()))
                clients.add(code.client_id)
            return provider.id_token(code)

    return PscAuthorizationCodeGrant, PscOpenIDCode(require_nonce=True)


def build_client_assertion(provider: Provider) -> JWTBearerClientAssertion:
    class PrivateKeyJwtAssertion(JWTBearerClientAssertion):
        CLIENT_AUTH_METHOD = "private_key_jwt"

        def get_audiences(self) -> list[str]:
            return [provider.token_endpoint, provider.issuer]

        def validate_jti(self, claims: Any, jti: str) -> bool:
            key = f"{claims['sub']}:{jti}"
            with provider.state.lock:
                if key in provider.state.used_assertion_ids:
                    return False
                provider.state.used_assertion_ids.add(key)
            return True

        def resolve_client_public_key(self, client: RegisteredClient) -> KeySet:
            return KeySet.import_key_set(client.jwks or {"keys": []})  # type: ignore[arg-type]

    return PrivateKeyJwtAssertion()


def build_tls_client_auth(provider: Provider) -> Any:
    """RFC 8705 2.1: the client is who its certificate's subject says (the terminator verified the chain)."""

    def authenticate(query_client: Any, oauth_request: Any) -> RegisteredClient | None:
        client = query_client(oauth_request.payload.data.get("client_id", ""))
        certificate = provider.presented_certificate()
        if client is None or certificate is None or not client.tls_client_auth_subject_dn:
            return None
        if certificate.subject.rfc4514_string() != client.tls_client_auth_subject_dn:
            return None
        return client

    return authenticate


def certificate_thumbprint(certificate: x509.Certificate) -> str:
    """``x5t#S256`` (RFC 8705 3.1)."""
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def build_resource_protector(provider: Provider) -> ResourceProtector:
    class InMemoryBearerTokenValidator(BearerTokenValidator):
        def authenticate_token(self, token_string: str) -> AccessToken | None:
            with provider.state.lock:
                return provider.state.tokens.get(token_string)

        def validate_token(self, token: AccessToken, scopes: Any, request: Any) -> None:
            super().validate_token(token, scopes, request)
            if token.certificate_thumbprint:
                # A certificate-bound token is only good with the certificate it is bound to.
                presented = provider.presented_certificate()
                if presented is None or certificate_thumbprint(presented) != token.certificate_thumbprint:
                    raise InvalidTokenError(description="the token is bound to another client certificate")

    protector = ResourceProtector()
    protector.register_token_validator(InMemoryBearerTokenValidator())
    return protector


# ---------------------------------------------------------------------------------------------------
# Views


class PushedPayload(FlaskOAuth2Payload):
    """The parameters of a pushed authorization request, standing in for those of the browser's request."""

    def __init__(self, parameters: MultiDict[str, str]) -> None:
        self._parameters = parameters

    @property
    def data(self) -> MultiDict[str, str]:
        return self._parameters


class PushedAuthorizationRequest(FlaskOAuth2Request):
    def __init__(self, parameters: MultiDict[str, str]) -> None:
        super().__init__(request)
        self.payload = PushedPayload(parameters)

    @property
    def args(self) -> MultiDict[str, str]:
        return self.payload.data


class PscAuthorizationServer(AuthorizationServer):
    def create_oauth2_request(self, oauth_request: Any) -> OAuth2Request:
        # The authorization endpoint passes a pushed request's parameters in; anything else is Flask's.
        if isinstance(oauth_request, OAuth2Request):
            return oauth_request
        return super().create_oauth2_request(oauth_request)


def create_app(config: PscConfig) -> Flask:
    provider = Provider(config)
    app = Flask(__name__)
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": ACCESS_TOKEN_LIFETIME}
    app.extensions["psc_provider"] = provider

    def save_token(token: dict[str, Any], oauth_request: Any) -> None:
        certificate = provider.presented_certificate()
        with provider.state.lock:
            provider.state.tokens[token["access_token"]] = AccessToken(
                access_token=token["access_token"],
                client=oauth_request.client,
                scope=token.get("scope", ""),
                approval=oauth_request.user,
                expires_at=time.time() + int(token.get("expires_in", ACCESS_TOKEN_LIFETIME)),
                certificate_thumbprint=certificate_thumbprint(certificate) if certificate else "",
            )

    server = PscAuthorizationServer(app, query_client=provider.clients.get, save_token=save_token)
    grant_cls, openid_code = build_grant_classes(provider)
    server.register_grant(grant_cls, [PkceRequiredForEveryClient(), openid_code])
    server.register_client_auth_method("private_key_jwt", build_client_assertion(provider))
    server.register_client_auth_method("tls_client_auth", build_tls_client_auth(provider))
    require_oauth = build_resource_protector(provider)
    base = _path_of(provider.issuer)

    @app.before_request
    def simulate_outage() -> Response | None:
        if provider.fault("unavailable") and not request.path.startswith("/_test/"):
            body = jsonify(error="temporarily_unavailable", error_description="stand-in outage")
            body.status_code = 503
            return body
        return None

    @app.get(base + PSC_DISCOVERY_SUFFIX)
    @app.get(base + STANDARD_DISCOVERY_SUFFIX)
    def discovery() -> Response:
        return jsonify(provider.metadata())

    @app.get(base + "/protocol/openid-connect/certs")
    def jwks() -> Response:
        return jsonify(provider.public_jwks())

    @app.route(base + "/protocol/openid-connect/auth", methods=["GET", "POST"])
    def authorize() -> Any:
        request_uri = request.args.get("request_uri", "")
        pushed = _pushed_request(provider, request_uri) if request_uri else None
        if request_uri and pushed is None:
            return jsonify(
                error="invalid_request_uri", error_description="unknown or expired request_uri"
            ), 400
        if pushed is None and config.require_par:
            return jsonify(
                error="invalid_request", error_description="pushed authorization request required"
            ), 400
        oauth_request = PushedAuthorizationRequest(pushed) if pushed is not None else None
        try:
            grant = server.get_consent_grant(oauth_request, end_user=None)
        except OAuth2Error as error:
            return server.handle_error_response(request, error)
        if request.method == "POST":
            approval = _approval_from_form(provider)
        elif (auto := request.args.get(AUTO_APPROVE_PARAM)) and config.allow_auto_approve:
            approval = None if auto == "deny" else _approval_for(provider, request.args.get("login_hint", ""))
        else:
            return Response(_approval_page(provider, grant), content_type="text/html; charset=utf-8")
        if request_uri:
            with provider.state.lock:  # single use, once answered
                provider.state.pushed_requests.pop(request_uri, None)
        return server.create_authorization_response(oauth_request, grant=grant, grant_user=approval)

    @app.post(base + TOKEN_PATH)
    def issue_token() -> Any:
        return server.create_token_response()

    @app.post(base + PAR_PATH)
    def push_authorization_request() -> Any:
        return _push_authorization_request(provider, server)

    @app.route(base + USERINFO_PATH, methods=["GET", "POST"])
    @require_oauth("openid")
    def userinfo() -> Response:
        return provider.userinfo(current_token)

    @app.route(base + "/protocol/openid-connect/logout", methods=["GET", "POST"])
    def end_session() -> Any:
        return _end_session(provider)

    register_test_endpoints(app, provider)
    return app


def register_test_endpoints(app: Flask, provider: Provider) -> None:
    """STAND-IN FEATURES: fault switches and provider-initiated back-channel logout."""

    @app.post("/_test/faults")
    def set_faults() -> Any:
        wanted = request.get_json(force=True, silent=True) or {}
        unknown = sorted(set(wanted) - FAULT_NAMES)
        if unknown:
            return jsonify(error=f"unknown faults: {unknown}"), 400
        with provider.state.lock:
            provider.state.faults.update({k: v for k, v in wanted.items() if v})
            for name in [k for k, v in wanted.items() if not v]:
                provider.state.faults.pop(name, None)
            return jsonify(faults=provider.state.faults)

    @app.post("/_test/rotate-keys")
    def rotate_keys() -> Any:
        with provider.state.lock:
            provider.rotate_keys()
        return jsonify(kid=provider.signing_key.kid)

    @app.post("/_test/reset")
    def reset() -> Any:
        provider.state.reset()
        return jsonify(ok=True)

    @app.post("/_test/backchannel-logout")
    def backchannel_logout() -> Any:
        """End the PSC sessions of ``idnat``, ``sub`` or ``sid``; ``omit_sid`` sends tokens naming only sub."""
        wanted = request.get_json(force=True, silent=True) or {}
        deliveries = _send_backchannel_logouts(
            provider, wanted.get("idnat"), wanted.get("sub"), wanted.get("sid"), bool(wanted.get("omit_sid"))
        )
        return jsonify(deliveries=deliveries)

    @app.post("/_test/logout-token")
    def mint_logout_token() -> Any:
        """A logout token for the PSC session ``sid`` and ``client_id``, handed back instead of delivered."""
        wanted = request.get_json(force=True, silent=True) or {}
        with provider.state.lock:
            entry = provider.state.sessions.get(str(wanted.get("sid", "")))
        if entry is None:
            return jsonify(error="unknown sid"), 404
        token = provider.logout_token(entry[0], str(wanted["sid"]), str(wanted.get("client_id", "")))
        return jsonify(logout_token=token)

    @app.get("/_test/sessions")
    def sessions() -> Any:
        with provider.state.lock:
            listed = [
                {"sid": sid, "idnat": identity.idnat, "sub": identity.sub, "clients": sorted(clients)}
                for sid, (identity, clients) in provider.state.sessions.items()
            ]
        return jsonify(sessions=listed)


def _path_of(issuer: str) -> str:
    return urlsplit(issuer).path.rstrip("/")


def _push_authorization_request(provider: Provider, server: AuthorizationServer) -> Any:
    """RFC 9126 2: authenticate the client like at the token endpoint, keep the parameters, hand back a
    single-use request_uri."""
    oauth_request = server.create_oauth2_request(request)
    try:
        client = server.authenticate_client(oauth_request, list(CLIENT_AUTH_METHODS), endpoint="par")
    except OAuth2Error as error:
        return server.handle_error_response(request, error)
    parameters = MultiDict(request.form)
    repeated = any(len(parameters.getlist(name)) > 1 for name in parameters)
    if repeated or "request_uri" in parameters or parameters.get("client_id") != client.client_id:
        return server.handle_error_response(request, InvalidRequestError("bad pushed request parameters"))
    if not client.check_redirect_uri(parameters.get("redirect_uri", "")):
        return server.handle_error_response(request, InvalidClientError("unregistered redirect_uri"))
    for name in ("client_assertion", "client_assertion_type", "client_secret"):
        parameters.pop(name, None)
    request_uri = PAR_REQUEST_URI_PREFIX + secrets.token_urlsafe(24)
    with provider.state.lock:
        provider.state.pushed_requests[request_uri] = (parameters, time.time() + PAR_LIFETIME)
    return jsonify(request_uri=request_uri, expires_in=PAR_LIFETIME), 201


def _pushed_request(provider: Provider, request_uri: str) -> MultiDict[str, str] | None:
    """The pushed parameters, with the browser's own stand-in parameters (auto-approve) added."""
    with provider.state.lock:
        entry = provider.state.pushed_requests.get(request_uri)
    if entry is None or entry[1] < time.time() or request.args.get("client_id") != entry[0].get("client_id"):
        return None
    parameters = MultiDict(entry[0])
    for name in (AUTO_APPROVE_PARAM, "login_hint"):
        if name in request.args:
            parameters[name] = request.args[name]
    return parameters


def _approval_for(provider: Provider, idnat: str) -> Approval | None:
    identity = provider.identities.get(idnat)
    if identity is None:
        return None
    # Every approval is a fresh authentication on the phone: auth_time is now, and a new PSC session.
    return Approval(identity=identity, auth_time=int(time.time()), sid=secrets.token_urlsafe(16))


def _approval_from_form(provider: Provider) -> Approval | None:
    if request.form.get("decision") != "approve":
        return None
    return _approval_for(provider, request.form.get("idnat", ""))


def _approval_page(provider: Provider, grant: Any) -> str:
    payload = grant.request.payload
    action = html.escape(request.full_path, quote=True)
    rows = []
    for identity in provider.config.identities:
        rows.append(
            "<tr>"
            f"<td>{html.escape(identity.idnat)}</td>"
            f"<td>{html.escape(identity.family_name)} {html.escape(identity.given_name)}</td>"
            f"<td>{html.escape(identity.profession)}</td><td>{html.escape(identity.auth_mode)}</td>"
            f'<td><form method="post" action="{action}">'
            f'<input type="hidden" name="idnat" value="{html.escape(identity.idnat, quote=True)}">'
            '<button name="decision" value="approve">Approuver</button>'
            '<button name="decision" value="deny">Refuser</button></form></td>'
            "</tr>"
        )
    return (
        '<!doctype html><html lang="fr"><head><meta charset="utf-8">'
        "<title>Pro Santé Connect (stand-in)</title></head><body>"
        "<h1>Validez la connexion sur votre téléphone</h1>"
        "<p>Stand-in de l'application e-CPS : aucun vrai fournisseur n'affiche cette page.</p>"
        f"<p>Service : <code>{html.escape(payload.client_id or '')}</code> — "
        f"scope : <code>{html.escape(payload.scope or '')}</code> — "
        f"acr_values : <code>{html.escape(payload.data.get('acr_values') or DEFAULT_ACR)}</code></p>"
        "<table><tr><th>idNat</th><th>Nom</th><th>Profession</th><th>authMode</th><th></th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def _end_session(provider: Provider) -> Any:
    hint = request.values.get("id_token_hint", "")
    redirect_uri = request.values.get("post_logout_redirect_uri", "")
    state = request.values.get("state")
    try:
        # An expired id_token is still a valid hint (OIDC RP-Initiated Logout): check signature and iss only.
        claims = jwt.decode(hint, KeySet(list(provider.keys))).claims
    except (JoseError, ValueError):
        return jsonify(error="invalid_request", error_description="invalid id_token_hint"), 400
    if claims.get("iss") != provider.issuer:
        return jsonify(error="invalid_request", error_description="id_token_hint from another issuer"), 400
    client = provider.clients.get(str(claims.get("aud")))
    with provider.state.lock:
        provider.state.sessions.pop(str(claims.get("sid", "")), None)
    if not redirect_uri:
        return Response("<p>Vous êtes déconnecté de Pro Santé Connect.</p>", content_type="text/html")
    if client is None or redirect_uri not in client.post_logout_redirect_uris:
        return jsonify(
            error="invalid_request", error_description="unregistered post_logout_redirect_uri"
        ), 400
    query = urlencode({"state": state}) if state else ""
    return redirect(f"{redirect_uri}{'&' if '?' in redirect_uri else '?'}{query}" if query else redirect_uri)


def _send_backchannel_logouts(
    provider: Provider, idnat: str | None, sub: str | None, only_sid: str | None, omit_sid: bool
) -> list[dict[str, Any]]:
    with provider.state.lock:
        matching = [
            (sid, identity, sorted(clients))
            for sid, (identity, clients) in provider.state.sessions.items()
            if (idnat and identity.idnat == idnat) or (sub and identity.sub == sub) or sid == only_sid
        ]
        for sid, _, _ in matching:
            provider.state.sessions.pop(sid, None)
    deliveries = []
    for sid, identity, client_ids in matching:
        for client_id in client_ids:
            client = provider.clients.get(client_id)
            if client is None or not client.backchannel_logout_uri:
                continue
            token = provider.logout_token(identity, None if omit_sid else sid, client_id)
            try:
                answer = requests.post(client.backchannel_logout_uri, data={"logout_token": token}, timeout=5)
                status: int | str = answer.status_code
            except requests.RequestException as error:
                status = type(error).__name__
            deliveries.append({"client_id": client_id, "sid": sid, "status": status})
    return deliveries


# ---------------------------------------------------------------------------------------------------
# Command line


def load_identities(path: Path) -> tuple[TestIdentity, ...]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    entries = data.get("identities", []) if isinstance(data, dict) else data
    return tuple(TestIdentity(**{k: str(v) for k, v in entry.items()}) for entry in entries)


def load_clients(path: Path) -> tuple[RegisteredClient, ...]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    entries = data.get("clients", []) if isinstance(data, dict) else data
    return tuple(RegisteredClient.from_dict(entry) for entry in entries)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.devtools.psc", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer-path", default=DEFAULT_ISSUER_PATH)
    parser.add_argument("--identities", type=Path, help="YAML list of test identities")
    parser.add_argument("--clients", type=Path, help="YAML list of registered clients")
    parser.add_argument("--client-id")
    parser.add_argument("--client-secret", default="")
    parser.add_argument("--redirect-uri", action="append", default=[])
    parser.add_argument("--post-logout-redirect-uri", action="append", default=[])
    parser.add_argument("--backchannel-logout-uri", default="")
    parser.add_argument(
        "--client-public-key", type=Path, help="PEM public key: the client uses private_key_jwt"
    )
    parser.add_argument("--key-id", default="")
    parser.add_argument("--userinfo-format", choices=("jwt", "json"), default="jwt")
    parser.add_argument(
        "--public-url", default="", help="base URL users reach (default http://127.0.0.1:PORT)"
    )
    parser.add_argument(
        "--mtls-url", default="", help="base URL of the mTLS terminator (mtls_endpoint_aliases)"
    )
    parser.add_argument(
        "--client-certificate-header",
        action="store_true",
        help=f"believe {CLIENT_CERT_HEADER}/{CLIENT_VERIFY_HEADER} from the TLS terminator in front",
    )
    parser.add_argument(
        "--client-assertion-alg",
        action="append",
        choices=("RS256", "PS256", "ES256"),
        help="advertised private_key_jwt algorithm (repeatable; default RS256 and ES256)",
    )
    parser.add_argument(
        "--require-par", action="store_true", help="refuse authorization requests not pushed first"
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PscConfig:
    clients = list(load_clients(args.clients)) if args.clients else []
    if args.client_id:
        entry: dict[str, Any] = {
            "client_id": args.client_id,
            "client_secret": args.client_secret,
            "redirect_uris": args.redirect_uri,
            "post_logout_redirect_uris": args.post_logout_redirect_uri,
            "backchannel_logout_uri": args.backchannel_logout_uri,
            "userinfo_format": args.userinfo_format,
        }
        if args.client_public_key:
            entry["token_endpoint_auth_method"] = "private_key_jwt"  # noqa: S105 - a method name
            entry["public_key_pem"] = args.client_public_key.read_text(encoding="utf-8")
            entry["key_id"] = args.key_id
        clients.append(RegisteredClient.from_dict(entry))
    identities = load_identities(args.identities) if args.identities else DEFAULT_IDENTITIES
    base = args.public_url.rstrip("/") or f"http://127.0.0.1:{args.port}"
    return PscConfig(
        issuer=base + args.issuer_path.rstrip("/"),
        clients=tuple(clients),
        identities=identities,
        client_certificate_header=args.client_certificate_header,
        mtls_url=args.mtls_url,
        client_assertion_algs=tuple(args.client_assertion_alg or DEFAULT_CLIENT_ASSERTION_ALGS),
        require_par=args.require_par,
    )


class RequestLogWithoutSecrets(WSGIRequestHandler):
    """Request lines with the query's parameter names only: their values carry tokens (id_token_hint),
    authorization codes, state and nonces, which a log must never show."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = self.path
        target, _, query = path.partition("?")
        if query:
            names = (pair.partition("=")[0] for pair in query.split("&") if pair)
            self.path = target + "?" + "&".join(f"{name}=…" for name in names)
        try:
            super().log_request(code, size)
        finally:
            self.path = path


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    app = create_app(config_from_args(args))
    # Loopback only: this is a test double with test-only endpoints. Werkzeug's server without app.run()'s
    # banner ("development server" warnings): one line says what this is.
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=RequestLogWithoutSecrets)
    print(f"Pro Santé Connect stand-in (tests and demos only) on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
