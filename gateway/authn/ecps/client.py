"""Pro Santé Connect (e-CPS) login: the gateway's single authlib client adapter.

Authorization code flow with PKCE S256, state and nonce kept in the Flask session (so bound to the browser's
login cookie) and single-use. Everything PSC sends back is verified here and turned into an
:class:`~gateway.identity.Identity`; every failure becomes an :class:`EcpsError` carrying a
:class:`~gateway.policy.decision.Reason`. Tokens and codes never appear in errors or logs.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.flask_client import OAuth
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oidc.core import CodeIDToken
from flask import Flask, redirect, request, session
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from werkzeug.wrappers import Response

from gateway.identity import Identity, LoginMethod
from gateway.policy.decision import Reason

log = logging.getLogger(__name__)

DEFAULT_SCOPES = "openid scope_all"
DEFAULT_ACR_VALUES = "eidas1"
DEFAULT_ACCEPTED_ACR = frozenset({"eidas1", "eidas2", "eidas3"})
CLIENT_SECRET_BASIC = "client_secret_basic"  # noqa: S105 - a method name
PRIVATE_KEY_JWT = "private_key_jwt"
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
#: Only asymmetric algorithms: the JWKS is public, and "none"/HMAC must never verify a PSC token.
ACCEPTED_SIGNING_ALGORITHMS = ("RS256", "PS256", "ES256")
#: OAuth errors in a callback or a token response that mean "PSC is not working right now".
IDP_DOWN_ERRORS = frozenset({"server_error", "temporarily_unavailable"})
ERROR_CODE = re.compile(r"[a-z_]{1,40}")
REQUIRED_METADATA = ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")


class EcpsError(Exception):
    """A refused e-CPS login or logout token. ``detail`` is safe to log: it never holds a token or code."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        #: Where the refused login was going, once the state proved the answer belongs to this browser.
        self.next_path: str | None = None


@dataclass(frozen=True, slots=True)
class EcpsLogin:
    identity: Identity
    #: Keep it server-side for RP-initiated logout (``id_token_hint``); never log it.
    id_token: str
    next_path: str
    #: PSC session id: back-channel logout tokens name it.
    sid: str | None


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    """A verified back-channel logout: end the gateway sessions of this PSC session or subject."""

    sub: str | None
    sid: str | None
    idnat: str | None


class ProSanteConnect:
    """Pro Santé Connect relying party. Build once, then :meth:`init_app`; immutable afterwards."""

    def __init__(
        self,
        *,
        metadata_url: str,
        client_id: str,
        redirect_uri: str,
        client_auth: str = CLIENT_SECRET_BASIC,
        client_secret: str | None = None,
        private_key_pem: str | None = None,
        key_id: str | None = None,
        scopes: str = DEFAULT_SCOPES,
        acr_values: str = DEFAULT_ACR_VALUES,
        accepted_acr: frozenset[str] | set[str] = DEFAULT_ACCEPTED_ACR,
        accept_missing_acr: bool = False,
        post_logout_redirect_uri: str | None = None,
        expected_issuer: str | None = None,
        timeout: float = 5.0,
        leeway: int = 60,
        login_timeout: int = 600,
        max_pending_logins: int = 3,
        logout_token_max_age: int = 300,
        jwks_refetch_interval: float = 30.0,
        name: str = "psc",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if client_auth == CLIENT_SECRET_BASIC and not client_secret:
            raise ValueError("client_secret_basic needs client_secret")
        if client_auth == PRIVATE_KEY_JWT and not private_key_pem:
            raise ValueError("private_key_jwt needs private_key_pem")
        if client_auth not in (CLIENT_SECRET_BASIC, PRIVATE_KEY_JWT):
            raise ValueError(f"unsupported client_auth {client_auth!r}")
        if "openid" not in scopes.split():
            raise ValueError("scopes must include openid")
        self.metadata_url = metadata_url
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.client_auth = client_auth
        self.scopes = scopes
        self.acr_values = acr_values
        self.accepted_acr = frozenset(accepted_acr)
        self.accept_missing_acr = accept_missing_acr
        self.post_logout_redirect_uri = post_logout_redirect_uri
        self.expected_issuer = expected_issuer
        self.timeout = timeout
        self.leeway = leeway
        self.login_timeout = login_timeout
        self.max_pending_logins = max(1, max_pending_logins)
        self.logout_token_max_age = logout_token_max_age
        self.jwks_refetch_interval = jwks_refetch_interval
        self.name = name
        self._clock = clock
        self._credential = client_secret if client_auth == CLIENT_SECRET_BASIC else private_key_pem
        self._key_id = key_id
        self._oauth = OAuth()
        self._remote: Any = None
        # Defence in depth against a replayed callback with an old copy of a (stateless) session cookie.
        self._consumed_states = _ExpiringSet()
        self._seen_logout_jtis = _ExpiringSet()
        self._jwks_refetch_lock = threading.Lock()
        self._last_jwks_refetch = float("-inf")

    # -- set-up ------------------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        self._oauth.init_app(app)
        auth_methods = [PrivateKeyJWT(headers={"kid": self._key_id} if self._key_id else None)]
        self._remote = self._oauth.register(
            self.name,
            client_id=self.client_id,
            client_secret=self._credential,
            server_metadata_url=self.metadata_url,
            client_auth_methods=auth_methods if self.client_auth == PRIVATE_KEY_JWT else None,
            client_kwargs={
                "scope": self.scopes,
                "code_challenge_method": "S256",
                "token_endpoint_auth_method": self.client_auth,
                "default_timeout": self.timeout,
            },
        )
        app.extensions["gateway.ecps"] = self

    # -- login ---------------------------------------------------------------------------------------

    def begin_login(self, next_path: str, max_age: int | None = None) -> Response:
        """Redirect the browser to PSC. ``max_age`` asks for a fresh authentication (step-up)."""
        self._metadata()  # fail closed before anything is stored
        params: dict[str, Any] = {"acr_values": self.acr_values}
        if max_age is not None:
            params.update(max_age=str(int(max_age)), prompt="login")
        with self._idp_call("authorization request"):
            authorization = self._remote.create_authorization_url(self.redirect_uri, **params)
        url = authorization.pop("url")  # not kept: the login cookie must stay small
        self._forget_older_pending_logins()
        self._remote.save_authorize_data(
            redirect_uri=self.redirect_uri,
            next_path=safe_next_path(next_path),
            max_age=max_age,
            requested_at=self._clock(),
            **authorization,
        )
        return redirect(url)

    def _forget_older_pending_logins(self) -> None:
        """Keep at most ``max_pending_logins`` - 1 unfinished logins, so the cookie cannot outgrow 4 KB."""
        prefix = f"_state_{self.name}_"
        pending = sorted(
            (key for key in session if key.startswith(prefix)),
            key=lambda key: float(session[key].get("exp", 0)),
        )
        for key in pending[: max(0, len(pending) - self.max_pending_logins + 1)]:
            session.pop(key, None)

    def complete_login(self) -> EcpsLogin:
        """Handle PSC's redirect back to the gateway (the current Flask request)."""
        self._require_app()
        login_request = self._consume_state()
        try:
            return self._complete_login(login_request)
        except EcpsError as error:
            # A cancelled (or refused) login keeps its destination: the next attempt goes back there.
            error.next_path = safe_next_path(str(login_request["next_path"]))
            raise

    def _complete_login(self, login_request: dict[str, Any]) -> EcpsLogin:
        self._refuse_other_issuer()
        self._refuse_error_callback()
        code = request.args.get("code")
        if not code:
            raise EcpsError(Reason.TOKEN_INVALID, "callback without an authorization code")
        token = self._exchange_code(code, login_request)
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise EcpsError(Reason.TOKEN_INVALID, "token response without id_token")
        id_claims = self._verify_id_token(id_token, token.get("access_token"), login_request)
        userinfo = self._fetch_userinfo(token)
        # OIDC Core 5.3.2: a userinfo answer about someone else must not be used.
        if userinfo is not None and userinfo.get("sub") != id_claims["sub"]:
            raise EcpsError(Reason.TOKEN_INVALID, "userinfo sub differs from id_token sub")
        identity = identity_from_claims(id_claims, userinfo or {})
        sid = id_claims.get("sid")
        return EcpsLogin(
            identity=identity,
            id_token=id_token,
            next_path=str(login_request["next_path"]),
            sid=str(sid) if sid else None,
        )

    def _consume_state(self) -> dict[str, Any]:
        state = request.args.get("state") or ""
        framework = self._remote.framework
        data = framework.get_state_data(session, state) if state else None
        if state:
            framework.clear_state_data(session, state)  # single-use, even when the rest fails
        if not data:
            raise EcpsError(Reason.STATE_MISMATCH, "missing or unknown state")
        if not self._consumed_states.add(state, self._clock() + self.login_timeout):
            raise EcpsError(Reason.STATE_MISMATCH, "state already used")
        if self._clock() - float(data.get("requested_at", 0)) > self.login_timeout:
            raise EcpsError(Reason.STATE_MISMATCH, "login request expired")
        return dict(data)

    def _refuse_error_callback(self) -> None:
        error = request.args.get("error")
        if not error:
            return
        if error == "access_denied":
            raise EcpsError(Reason.LOGIN_CANCELLED, "the professional refused the login")
        if error in IDP_DOWN_ERRORS:
            raise EcpsError(Reason.IDP_UNAVAILABLE, f"provider error {error}")
        # login_required, invalid_request...: the provider refused our request.
        raise EcpsError(Reason.IDP_ERROR, f"provider error {_error_code(error)}")

    def _refuse_other_issuer(self) -> None:
        """RFC 9207 mix-up defence: when the provider names itself in the callback, it must be PSC."""
        issuer = request.args.get("iss")
        if issuer is not None and issuer != self._metadata()["issuer"]:
            raise EcpsError(Reason.TOKEN_INVALID, "callback from another issuer")

    def _exchange_code(self, code: str, login_request: Mapping[str, Any]) -> dict[str, Any]:
        with self._idp_call("token request"):
            token = self._remote.fetch_access_token(
                redirect_uri=login_request["redirect_uri"],
                code=code,
                code_verifier=login_request["code_verifier"],
            )
        return dict(token)

    def _verify_id_token(
        self, id_token: str, access_token: str | None, login_request: Mapping[str, Any]
    ) -> dict[str, Any]:
        issuer = self._metadata()["issuer"]
        decoded = self._decode_signed(id_token, "id_token")
        max_age = login_request.get("max_age")
        claims = CodeIDToken(
            decoded.claims,
            decoded.header,
            {
                "iss": {"essential": True, "value": issuer},
                "aud": {"essential": True, "value": self.client_id},
                "sub": {"essential": True},
                "exp": {"essential": True},
                "iat": {"essential": True},
                "auth_time": {"essential": True},
            },
            {
                "nonce": login_request["nonce"],
                "client_id": self.client_id,
                "access_token": access_token,
                "max_age": max_age,
            },
        )
        now = self._clock()
        try:
            claims.validate(now=int(now), leeway=self.leeway)
        except JoseError as error:
            raise EcpsError(Reason.TOKEN_INVALID, f"id_token rejected: {_describe(error)}") from None
        self._check_auth_time(float(claims["auth_time"]), now, max_age, login_request)
        self._check_acr(claims.get("acr"))
        return dict(claims)

    def _check_auth_time(
        self, auth_time: float, now: float, max_age: int | None, login_request: Mapping[str, Any]
    ) -> None:
        if auth_time > now + self.leeway:
            raise EcpsError(Reason.TOKEN_INVALID, "auth_time in the future")
        if max_age is None:
            return
        # Step-up: the provider must have authenticated the professional again, after our request.
        if now - auth_time > max_age + self.leeway:
            raise EcpsError(Reason.TOKEN_INVALID, "auth_time older than the max_age requested")
        if auth_time < float(login_request["requested_at"]) - self.leeway:
            raise EcpsError(Reason.TOKEN_INVALID, "no fresh authentication despite prompt=login")

    def _check_acr(self, acr: Any) -> None:
        if acr is None:
            if not self.accept_missing_acr:
                raise EcpsError(Reason.ACR_NOT_ACCEPTED, "id_token without acr")
            return
        if acr not in self.accepted_acr:
            raise EcpsError(Reason.ACR_NOT_ACCEPTED, f"acr {str(acr)[:32]!r} not accepted")

    def _fetch_userinfo(self, token: Mapping[str, Any]) -> dict[str, Any] | None:
        endpoint = self._metadata().get("userinfo_endpoint")
        if not endpoint:
            return None
        with self._idp_call("userinfo request"):
            answer = self._remote.get(endpoint, token=dict(token))
        if answer.status_code >= 500:
            raise EcpsError(Reason.IDP_UNAVAILABLE, f"userinfo answered {answer.status_code}")
        if answer.status_code != 200:
            raise EcpsError(Reason.TOKEN_INVALID, f"userinfo answered {answer.status_code}")
        content_type = answer.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == "application/jwt":
            return self._verify_signed_userinfo(answer.text.strip())
        try:
            data = answer.json()
        except ValueError:
            raise EcpsError(Reason.TOKEN_INVALID, "userinfo is neither JSON nor a JWT") from None
        if not isinstance(data, dict):
            raise EcpsError(Reason.TOKEN_INVALID, "userinfo is not a JSON object")
        return data

    def _verify_signed_userinfo(self, token: str) -> dict[str, Any]:
        claims = dict(self._decode_signed(token, "userinfo").claims)
        self._check_registered_claims(claims, "userinfo", {"sub": {"essential": True}})
        return claims

    # -- logout ------------------------------------------------------------------------------------

    def end_session_url(self, id_token_hint: str, state: str | None = None) -> str | None:
        """PSC's RP-initiated logout URL, or None when PSC cannot be asked (no endpoint, or down)."""
        try:
            metadata = self._metadata()
        except EcpsError:
            return None
        if not metadata.get("end_session_endpoint"):
            return None
        result = self._remote.create_logout_url(
            post_logout_redirect_uri=self.post_logout_redirect_uri,
            id_token_hint=id_token_hint,
            state=state,
            client_id=self.client_id,
        )
        return str(result["url"])

    def verify_logout_token(self, token: str) -> LogoutRequest:
        """Verify a back-channel logout token (OpenID Connect Back-Channel Logout 1.0, section 2.6)."""
        claims = dict(self._decode_signed(token, "logout token").claims)
        self._check_registered_claims(claims, "logout token", {"iat": {"essential": True}})
        now = self._clock()
        if not now - self.logout_token_max_age <= float(claims["iat"]) <= now + self.leeway:
            raise EcpsError(Reason.TOKEN_INVALID, "logout token iat out of range")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
            raise EcpsError(Reason.TOKEN_INVALID, "logout token without the back-channel logout event")
        if "nonce" in claims:
            raise EcpsError(Reason.TOKEN_INVALID, "logout token with a nonce")
        sub, sid = claims.get("sub"), claims.get("sid")
        if not sub and not sid:
            raise EcpsError(Reason.TOKEN_INVALID, "logout token names neither sub nor sid")
        jti = claims.get("jti")
        if not jti:
            raise EcpsError(Reason.TOKEN_INVALID, "logout token without jti")
        if not self._seen_logout_jtis.add(str(jti), now + self.logout_token_max_age + self.leeway):
            raise EcpsError(Reason.TOKEN_INVALID, "logout token replayed")
        return LogoutRequest(
            sub=str(sub) if sub else None,
            sid=str(sid) if sid else None,
            idnat=idnat_from_sub(str(sub)) if sub else None,
        )

    # -- provider metadata, keys and signatures ------------------------------------------------------

    def check_metadata(self) -> None:
        """Readiness: PSC's discovery document can be had (cached after the first success)."""
        self._metadata()

    def _require_app(self) -> None:
        if self._remote is None:
            raise RuntimeError("ProSanteConnect.init_app(app) was not called")

    def _metadata(self) -> dict[str, Any]:
        """Discovery document, fetched once and cached; a failure is IDP_UNAVAILABLE and retried later."""
        self._require_app()
        with self._idp_call("discovery"):
            metadata = self._remote.load_server_metadata()
        missing = [key for key in REQUIRED_METADATA if not metadata.get(key)]
        wrong_issuer = self.expected_issuer is not None and metadata.get("issuer") != self.expected_issuer
        if missing or wrong_issuer:
            self._remote.server_metadata.clear()  # do not cache a bad document
            detail = (
                f"discovery document lacks {missing}"
                if missing
                else "discovery issuer is not the expected one"
            )
            raise EcpsError(Reason.IDP_UNAVAILABLE, detail)
        return dict(metadata)

    def _may_refetch_jwks(self) -> bool:
        now = self._clock()
        with self._jwks_refetch_lock:
            if now - self._last_jwks_refetch < self.jwks_refetch_interval:
                return False
            self._last_jwks_refetch = now
            return True

    def _jwks(self, force: bool) -> KeySet:
        self._metadata()
        with self._idp_call("JWKS"):
            return KeySet.import_key_set(self._remote.fetch_jwk_set(force=force))

    def _decode_signed(self, token: str, what: str) -> jwt.Token:
        algorithms = list(ACCEPTED_SIGNING_ALGORITHMS)
        try:
            try:
                return jwt.decode(token, self._jwks(force=False), algorithms=algorithms)
            except InvalidKeyIdError:
                # PSC rotated its keys: fetch the JWKS again, but not for every forged kid (the
                # back-channel logout route is reachable by anyone).
                if not self._may_refetch_jwks():
                    raise
                return jwt.decode(token, self._jwks(force=True), algorithms=algorithms)
        except (JoseError, ValueError) as error:
            code = getattr(error, "error", type(error).__name__)
            raise EcpsError(Reason.TOKEN_INVALID, f"{what} signature or format rejected: {code}") from None

    def _check_registered_claims(self, claims: dict[str, Any], what: str, extra: dict[str, Any]) -> None:
        options = {
            "iss": {"essential": True, "value": self._metadata()["issuer"]},
            "aud": {"essential": True, "value": self.client_id},
            **extra,
        }
        try:
            jwt.JWTClaimsRegistry(now=int(self._clock()), leeway=self.leeway, **options).validate(claims)
        except JoseError as error:
            raise EcpsError(Reason.TOKEN_INVALID, f"{what} rejected: {_describe(error)}") from None

    @contextmanager
    def _idp_call(self, what: str) -> Iterator[None]:
        """Map transport and provider errors to reasons, without their text (it may hold a code)."""
        try:
            yield
        except requests.RequestException as error:
            log.warning("Pro Santé Connect %s failed: %s", what, type(error).__name__)
            raise EcpsError(Reason.IDP_UNAVAILABLE, f"{what} failed: {type(error).__name__}") from None
        except OAuthError as error:
            reason = Reason.IDP_UNAVAILABLE if error.error in IDP_DOWN_ERRORS else Reason.TOKEN_INVALID
            raise EcpsError(reason, f"{what} refused: {_error_code(str(error.error))}") from None
        except ValueError as error:  # a 5xx page that is not JSON, a broken discovery document
            raise EcpsError(Reason.IDP_UNAVAILABLE, f"{what} unreadable: {type(error).__name__}") from None


def _error_code(error: str) -> str:
    """An OAuth error code, or a placeholder: the value comes from the network and ends up in logs."""
    return error if ERROR_CODE.fullmatch(error) else "unrecognised_error"


def _describe(error: JoseError) -> str:
    """joserfc's descriptions name the claim ("Invalid claim: 'iss'"), never its value."""
    return str(error.description or error.error)[:120]


# -- claims -> Identity --------------------------------------------------------------------------------


def identity_from_claims(id_claims: Mapping[str, Any], userinfo: Mapping[str, Any]) -> Identity:
    """Build the Identity from the ``scope_all`` claims; userinfo wins over the id_token."""
    claims = {**id_claims, **userinfo}
    idnat = str(claims.get("SubjectNameID") or claims.get("preferred_username") or "").strip()
    if not idnat:
        raise EcpsError(Reason.TOKEN_INVALID, "no SubjectNameID nor preferred_username")
    sub = str(claims["sub"])
    sub_idnat = idnat_from_sub(sub)
    if sub_idnat is not None and sub_idnat != idnat:
        raise EcpsError(Reason.TOKEN_INVALID, "SubjectNameID does not match sub")
    extra = {"sub": sub}
    if claims.get("email"):
        extra["email"] = str(claims["email"])
    if id_claims.get("sid"):
        extra["sid"] = str(id_claims["sid"])
    return Identity(
        idnat=idnat,
        method=LoginMethod.ECPS,
        auth_time=float(id_claims["auth_time"]),
        surname=str(claims.get("family_name", "")),
        given_name=str(claims.get("given_name", "")),
        professions=professions_of(claims.get("SubjectRefPro")),
        auth_mode=str(claims.get("authMode", "")),
        acr=str(id_claims.get("acr", "")),
        extra=extra,
    )


def professions_of(ref_pro: Any) -> tuple[str, ...]:
    """TRE_G15 codes from ``SubjectRefPro.exercices[].codeProfession``, in order, without duplicates."""
    if not isinstance(ref_pro, Mapping):
        return ()
    codes: list[str] = []
    for exercice in ref_pro.get("exercices") or []:
        code = exercice.get("codeProfession") if isinstance(exercice, Mapping) else None
        if code and str(code) not in codes:
            codes.append(str(code))
    return tuple(codes)


def idnat_from_sub(sub: str) -> str | None:
    """PSC subjects look like ``f:<uuid>:<idNat>``."""
    parts = sub.split(":")
    return parts[-1] if len(parts) >= 3 and parts[-1] else None


def safe_next_path(next_path: str) -> str:
    """Only a local absolute path: never an open redirect to another site after login."""
    if (
        not next_path.startswith("/")
        or next_path.startswith("//")
        or "\\" in next_path
        or any(ord(c) < 0x20 for c in next_path)
    ):
        return "/"
    return next_path


class _ExpiringSet:
    """A small thread-safe set whose members expire; ``add`` says whether the member was new."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, float] = {}

    def add(self, member: str, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            self._members = {k: v for k, v in self._members.items() if v > now}
            if member in self._members:
                return False
            self._members[member] = expires_at
            return True
