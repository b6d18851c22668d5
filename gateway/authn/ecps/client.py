"""Pro Santé Connect (e-CPS) login: the gateway's single authlib client adapter.

Authorization code flow with PKCE S256, state and nonce kept in the Flask session (so bound to the browser's
login cookie) and single-use. Everything PSC sends back is verified here and turned into an
:class:`~gateway.identity.Identity`; every failure becomes an :class:`EcpsError` carrying a
:class:`~gateway.policy.decision.Reason`. Tokens and codes never appear in errors or logs.

Client authentication at the token endpoint (and at the pushed authorization request endpoint):
``client_secret_basic``, ``private_key_jwt`` (ES256 with an EC P-256 key, RS256 with an RSA key) or
``tls_client_auth`` (RFC 8705: the client certificate on the TLS connection; token, userinfo and PAR then go to
the provider's ``mtls_endpoint_aliases`` when it has them, so certificate-bound access tokens are presented with
the certificate they are bound to).

Pro Santé Connect being down never stops the gateway: discovery is retried in the background and the
provider's state is reported (:meth:`ProSanteConnect.status`), while card logins and public pages go on.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.flask_client import FlaskOAuth2App, OAuth
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.auth import encode_none
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oidc.core import CodeIDToken
from flask import Flask, redirect, request, session
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from werkzeug.wrappers import Response

from gateway.identity import UNKNOWN_AUTH_TIME, Identity, LoginMethod
from gateway.policy.decision import Reason

log = logging.getLogger(__name__)

DEFAULT_SCOPES = "openid scope_all"
DEFAULT_ACR_VALUES = "eidas1"
DEFAULT_ACCEPTED_ACR = frozenset({"eidas1", "eidas2", "eidas3"})
CLIENT_SECRET_BASIC = "client_secret_basic"  # noqa: S105 - a method name
PRIVATE_KEY_JWT = "private_key_jwt"
TLS_CLIENT_AUTH = "tls_client_auth"
CLIENT_AUTH_METHODS = (CLIENT_SECRET_BASIC, PRIVATE_KEY_JWT, TLS_CLIENT_AUTH)
#: RFC 8705 section 5: the endpoints a client using mutual TLS calls at their alias, when the provider has one.
MTLS_ALIASED_ENDPOINTS = ("token_endpoint", "userinfo_endpoint", "pushed_authorization_request_endpoint")
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
#: Only asymmetric algorithms: the JWKS is public, and "none"/HMAC must never verify a PSC token.
ACCEPTED_SIGNING_ALGORITHMS = ("RS256", "PS256", "ES256")
#: OAuth errors in a callback or a token response that mean "PSC is not working right now".
IDP_DOWN_ERRORS = frozenset({"server_error", "temporarily_unavailable"})
ERROR_CODE = re.compile(r"[a-z_]{1,40}")
REQUIRED_METADATA = ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
#: Background discovery retries: first after this many seconds, doubling up to the maximum.
DISCOVERY_RETRY_FIRST = 1.0
DISCOVERY_RETRY_MAX = 30.0
#: Who may spend a forced JWKS refetch: logins, and the (unauthenticated) back-channel logout endpoint, each
#: with its own budget so that forged logout tokens cannot use up what a login after a key rotation needs.
JWKS_BUDGET_LOGIN = "login"
JWKS_BUDGET_LOGOUT = "logout"


class ProviderState(enum.StrEnum):
    """What the gateway knows of Pro Santé Connect, from its last exchange with it."""

    STARTING = "starting"  # discovery not done yet
    UP = "up"
    DOWN = "down"  # unreachable, or answering 5xx / temporarily_unavailable
    #: Reachable, but it does not accept this gateway's client authentication: logins cannot work.
    MISCONFIGURED = "misconfigured"


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    state: ProviderState
    #: Safe for operators (no token, no secret): what failed last.
    detail: str = ""


class SingleUseStore(Protocol):
    """Shared memory of what was used once (consumed states, logout-token jti): ``add`` says whether the key
    was new. The nonce stores of gateway.authn.card.challenge (memory, Redis) fit."""

    def add(self, key: str, value: str, ttl_seconds: int, now: float) -> bool: ...


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
    #: PSC subject (``f:<uuid>:<idNat>``) and session id: back-channel logout tokens name them.
    sub: str
    sid: str | None


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    """A verified back-channel logout: end the gateway sessions of this PSC session or subject."""

    sub: str | None
    sid: str | None
    idnat: str | None


class _PscSession(OAuth2Session):
    """authlib's requests session, keeping its own ``verify`` (``ecps.server_ca_file``): requests lets
    REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's CA file unless each request names it."""

    def request(
        self, method: str, url: str, withhold_token: bool = False, auth: Any = None, **kwargs: Any
    ) -> Any:
        kwargs.setdefault("verify", self.verify)
        return super().request(method, url, withhold_token=withhold_token, auth=auth, **kwargs)


class _PscApp(FlaskOAuth2App):
    client_cls = _PscSession


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
        tls_client_certificate: tuple[str, str] | None = None,
        server_ca_file: str | None = None,
        pushed_authorization_requests: bool = False,
        single_use: SingleUseStore,
        on_state_change: Callable[[ProviderState], None] | None = None,
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
        if client_auth not in CLIENT_AUTH_METHODS:
            raise ValueError(f"unsupported client_auth {client_auth!r}")
        if client_auth == CLIENT_SECRET_BASIC and not client_secret:
            raise ValueError("client_secret_basic needs client_secret")
        if client_auth == PRIVATE_KEY_JWT and not private_key_pem:
            raise ValueError("private_key_jwt needs private_key_pem")
        if client_auth == TLS_CLIENT_AUTH and tls_client_certificate is None:
            raise ValueError("tls_client_auth needs tls_client_certificate (certificate and key files)")
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
        self.pushed_authorization_requests = pushed_authorization_requests
        self._clock = clock
        self._client_secret = client_secret if client_auth == CLIENT_SECRET_BASIC else None
        self._assertion_key: RSAKey | ECKey | None = None
        #: private_key_jwt: the algorithm of the client assertion, chosen by the key (RS256 or ES256).
        self.client_assertion_alg: str | None = None
        if client_auth == PRIVATE_KEY_JWT and private_key_pem:
            self._assertion_key, self.client_assertion_alg = client_assertion_key(private_key_pem)
        self._key_id = key_id
        # requests' own options (authlib hands them to every session it makes: discovery, JWKS, token...).
        self._session_options: dict[str, Any] = {"default_timeout": timeout}
        if tls_client_certificate is not None:
            self._session_options["cert"] = tls_client_certificate
        if server_ca_file is not None:
            self._session_options["verify"] = server_ca_file
        self._oauth = OAuth()
        self._remote: Any = None
        # Defence in depth against a replayed callback with an old copy of a (stateless) login cookie, and
        # against replayed logout tokens; shared by every instance when the store is (Redis).
        self._single_use = single_use
        self._jwks_refetch_lock = threading.Lock()
        self._last_jwks_refetch = {JWKS_BUDGET_LOGIN: float("-inf"), JWKS_BUDGET_LOGOUT: float("-inf")}
        self._status = ProviderStatus(ProviderState.STARTING, "discovery not done yet")
        self._status_lock = threading.Lock()
        self._on_state_change = on_state_change
        self._discovery: Mapping[str, Any] | None = None
        self._discovery_lock = threading.Lock()
        self._stop_discovery = threading.Event()

    # -- set-up ------------------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        self._oauth.init_app(app)
        self._remote = self._oauth.register(
            self.name,
            client_cls=_PscApp,
            client_id=self.client_id,
            client_secret=self._client_credential(),
            server_metadata_url=self.metadata_url,
            client_auth_methods=self._client_auth_methods(),
            client_kwargs={
                "scope": self.scopes,
                "code_challenge_method": "S256",
                "token_endpoint_auth_method": self.client_auth,
                **self._session_options,
            },
        )
        app.extensions["gateway.ecps"] = self

    def _client_credential(self) -> Any:
        return self._assertion_key if self.client_auth == PRIVATE_KEY_JWT else self._client_secret

    def _client_auth_methods(self) -> list[Any]:
        if self.client_auth == PRIVATE_KEY_JWT:
            headers = {"kid": self._key_id} if self._key_id else None
            return [PrivateKeyJWT(headers=headers, alg=self.client_assertion_alg)]
        if self.client_auth == TLS_CLIENT_AUTH:
            # RFC 8705 section 2: the certificate authenticates; the body still names the client.
            return [(TLS_CLIENT_AUTH, encode_none)]
        return []

    def start_background_discovery(self) -> None:
        """Fetch the discovery document now and, while PSC cannot be reached, again and again in a daemon
        thread (so the first login after an outage does not wait for it, and the state is known). The thread
        holds the client weakly: it ends with it (or with :meth:`stop_background_discovery`)."""
        threading.Thread(
            target=_discover_until_up,
            args=(weakref.ref(self), self._stop_discovery),
            name="psc-discovery",
            daemon=True,
        ).start()

    def stop_background_discovery(self) -> None:
        self._stop_discovery.set()

    def status(self) -> ProviderStatus:
        return self._status

    def _set_status(self, state: ProviderState, detail: str = "") -> None:
        with self._status_lock:
            changed = self._status.state is not state
            self._status = ProviderStatus(state, detail)
        if changed:
            log.log(
                logging.INFO if state is ProviderState.UP else logging.WARNING,
                "Pro Santé Connect is %s%s",
                state.value,
                f": {detail}" if detail else "",
            )
            if self._on_state_change is not None:
                self._on_state_change(state)

    # -- login ---------------------------------------------------------------------------------------

    def begin_login(self, next_path: str, max_age: int | None = None) -> Response:
        """Redirect the browser to PSC. ``max_age`` asks for a fresh authentication (step-up)."""
        metadata = self._usable_metadata()  # fail closed before anything is stored
        params: dict[str, Any] = {"acr_values": self.acr_values}
        if max_age is not None:
            params.update(max_age=str(int(max_age)), prompt="login")
        with self._idp_call("authorization request"):
            authorization = self._remote.create_authorization_url(self.redirect_uri, **params)
        url = authorization.pop("url")  # not kept: the login cookie must stay small
        if self._uses_par(metadata):
            url = self._push_authorization_request(url, metadata)
        self._forget_older_pending_logins()
        self._remote.save_authorize_data(
            redirect_uri=self.redirect_uri,
            next_path=safe_next_path(next_path),
            max_age=max_age,
            requested_at=self._clock(),
            **authorization,
        )
        return redirect(url)

    def _uses_par(self, metadata: Mapping[str, Any]) -> bool:
        return self.pushed_authorization_requests or bool(
            metadata.get("require_pushed_authorization_requests")
        )

    def _push_authorization_request(self, url: str, metadata: Mapping[str, Any]) -> str:
        """RFC 9126: send the request's parameters to PSC directly, authenticated like a token request;
        the browser then carries only ``client_id`` and the ``request_uri`` PSC gave back."""
        endpoint = str(metadata["pushed_authorization_request_endpoint"])
        parameters = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
        if self.client_auth == TLS_CLIENT_AUTH:
            parameters.pop("client_id")  # the client authentication adds it to the body (RFC 8705 2)
        with self._idp_call("pushed authorization request"), self._client_session() as client:
            answer = client.post(
                endpoint,
                data=parameters,
                auth=client.client_auth(self.client_auth),
                withhold_token=True,
                headers={"Accept": "application/json"},
            )
            if answer.status_code >= 500:
                raise EcpsError(
                    Reason.IDP_UNAVAILABLE, f"pushed authorization request answered {answer.status_code}"
                )
            body = answer.json()
        if answer.status_code not in (200, 201) or not isinstance(body, dict):
            code = body.get("error", "") if isinstance(body, dict) else ""
            raise EcpsError(
                Reason.IDP_ERROR, f"pushed authorization request refused: {_error_code(str(code))}"
            )
        request_uri = body.get("request_uri")
        if not isinstance(request_uri, str) or not request_uri:
            raise EcpsError(Reason.IDP_ERROR, "pushed authorization request answer without request_uri")
        query = urlencode({"client_id": self.client_id, "request_uri": request_uri})
        return f"{metadata['authorization_endpoint']}?{query}"

    @contextmanager
    def _client_session(self) -> Iterator[Any]:
        """A requests session authenticating as this client (what authlib's token request uses)."""
        client = _PscSession(
            client_id=self.client_id,
            client_secret=self._client_credential(),
            token_endpoint_auth_method=self.client_auth,
            **self._session_options,
        )
        for method in self._client_auth_methods():
            client.register_client_auth_method(method)
        with client:
            yield client

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
            sub=str(id_claims["sub"]),
            sid=str(sid) if sid else None,
        )

    def _consume_state(self) -> dict[str, Any]:
        state = request.args.get("state") or ""
        framework = self._remote.framework
        data = framework.get_state_data(session, state) if state else None
        if state:
            framework.clear_state_data(session, state)  # single-use, even when the rest fails
        if not data:
            self._drop_pending_logins()
            raise EcpsError(Reason.STATE_MISMATCH, "missing or unknown state")
        if not self._first_use("state", state, self.login_timeout + self.leeway):
            self._drop_pending_logins()
            raise EcpsError(Reason.STATE_MISMATCH, "state already used")
        if self._clock() - float(data.get("requested_at", 0)) > self.login_timeout:
            raise EcpsError(Reason.STATE_MISMATCH, "login request expired")
        return dict(data)

    def _drop_pending_logins(self) -> None:
        """An answer naming no login of this browser (another site may send it here with a forged state):
        every login the browser has pending ends, its state spent in the single-use store too, so that no
        copy of the login cookie can complete one after such a guess."""
        prefix = f"_state_{self.name}_"
        for key in [key for key in session if key.startswith(prefix)]:
            self._first_use("state", key.removeprefix(prefix), self.login_timeout + self.leeway)
            session.pop(key, None)

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
        if issuer is not None and issuer != self._usable_metadata()["issuer"]:
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
                # OIDC Core 2: REQUIRED only when max_age was requested (the step-up); optional otherwise.
                "auth_time": {"essential": max_age is not None},
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
        if claims.get("auth_time") is not None:
            self._check_auth_time(claims["auth_time"], now, max_age, login_request)
        self._check_acr(claims.get("acr"))
        return dict(claims)

    def _check_auth_time(
        self, auth_time: Any, now: float, max_age: int | None, login_request: Mapping[str, Any]
    ) -> None:
        if isinstance(auth_time, bool) or not isinstance(auth_time, int | float):
            raise EcpsError(Reason.TOKEN_INVALID, "auth_time is not a number")
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
        endpoint = self._usable_metadata().get("userinfo_endpoint")
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
        claims = dict(self._decode_signed(token, "logout token", jwks_budget=JWKS_BUDGET_LOGOUT).claims)
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
        if not self._first_use("logout-jti", str(jti), self.logout_token_max_age + 2 * self.leeway):
            raise EcpsError(Reason.TOKEN_INVALID, "logout token replayed")
        return LogoutRequest(
            sub=str(sub) if sub else None,
            sid=str(sid) if sid else None,
            idnat=idnat_from_sub(str(sub)) if sub else None,
        )

    # -- provider metadata, keys and signatures ------------------------------------------------------

    def _first_use(self, kind: str, value: str, ttl_seconds: float) -> bool:
        """Record ``value`` as used; False when it already was (here or on another instance)."""
        key = f"ecps-{kind}:{hashlib.sha256(value.encode()).hexdigest()}"
        try:
            return self._single_use.add(key, "1", max(1, int(ttl_seconds) + 1), self._clock())
        except Exception as error:  # whatever the store's failure, fail closed: no replay check, no login
            log.warning("single-use store unavailable for the e-CPS %s: %s", kind, type(error).__name__)
            raise EcpsError(Reason.SESSION_STORE_UNAVAILABLE, f"{kind} store unavailable") from None

    def _require_app(self) -> None:
        if self._remote is None:
            raise RuntimeError("ProSanteConnect.init_app(app) was not called")

    def _metadata(self) -> Mapping[str, Any]:
        """Discovery document, fetched once and cached; a failure is IDP_UNAVAILABLE and retried later.
        With tls_client_auth, the mTLS aliases of RFC 8705 replace the endpoints they name."""
        self._require_app()
        discovery = self._discovery
        if discovery is None:
            with self._discovery_lock:
                discovery = self._discovery or self._discover()
        return discovery

    def _discover(self) -> Mapping[str, Any]:
        with self._idp_call("discovery"):
            metadata = dict(self._remote.load_server_metadata())
        missing = [key for key in REQUIRED_METADATA if not metadata.get(key)]
        wrong_issuer = self.expected_issuer is not None and metadata.get("issuer") != self.expected_issuer
        if missing or wrong_issuer:
            self._remote.server_metadata.clear()  # do not cache a bad document
            detail = (
                f"discovery document lacks {missing}"
                if missing
                else "discovery issuer is not the expected one"
            )
            self._provider_down(detail)
        aliases = metadata.get("mtls_endpoint_aliases")
        if self.client_auth == TLS_CLIENT_AUTH and isinstance(aliases, dict):
            metadata.update(
                {k: v for k, v in aliases.items() if k in MTLS_ALIASED_ENDPOINTS and isinstance(v, str)}
            )
            # authlib reads the token endpoint from its own copy.
            self._remote.server_metadata.update(
                {k: metadata[k] for k in MTLS_ALIASED_ENDPOINTS if k in metadata}
            )
        problem = self._client_auth_problem(metadata)
        if problem is not None:
            log.error("Pro Santé Connect cannot accept this gateway's logins: %s", problem)
            self._set_status(ProviderState.MISCONFIGURED, problem)
        else:
            self._set_status(ProviderState.UP)
        self._discovery = MappingProxyType(metadata)
        return self._discovery

    def _client_auth_problem(self, metadata: Mapping[str, Any]) -> str | None:
        """What, in the provider's advertised capabilities, makes our token requests fail (None: nothing)."""
        methods = metadata.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and self.client_auth not in methods:
            return f"the provider does not accept client_auth {self.client_auth} (it advertises {sorted(map(str, methods))})"
        algs = metadata.get("token_endpoint_auth_signing_alg_values_supported")
        if (
            self.client_auth == PRIVATE_KEY_JWT
            and isinstance(algs, list)
            and self.client_assertion_alg not in algs
        ):
            return (
                f"the provider does not accept {self.client_assertion_alg} client assertions "
                f"(it advertises {sorted(map(str, algs))}): use a key of an advertised kind"
            )
        if self._uses_par(metadata) and not metadata.get("pushed_authorization_request_endpoint"):
            return "pushed authorization requests asked for, but the provider has no such endpoint"
        return None

    def _usable_metadata(self) -> Mapping[str, Any]:
        """The discovery document, or an error when the provider cannot accept our logins."""
        metadata = self._metadata()
        problem = self._client_auth_problem(metadata)
        if problem is not None:
            raise EcpsError(Reason.IDP_ERROR, problem)
        return metadata

    def _may_refetch_jwks(self, budget: str) -> bool:
        now = self._clock()
        with self._jwks_refetch_lock:
            if now - self._last_jwks_refetch[budget] < self.jwks_refetch_interval:
                return False
            self._last_jwks_refetch[budget] = now
            return True

    def _jwks(self, force: bool) -> KeySet:
        self._metadata()
        with self._idp_call("JWKS", reached=force):
            return KeySet.import_key_set(self._remote.fetch_jwk_set(force=force))

    def _decode_signed(self, token: str, what: str, jwks_budget: str = JWKS_BUDGET_LOGIN) -> jwt.Token:
        algorithms = list(ACCEPTED_SIGNING_ALGORITHMS)
        try:
            try:
                return jwt.decode(token, self._jwks(force=False), algorithms=algorithms)
            except InvalidKeyIdError:
                # PSC rotated its keys: fetch the JWKS again, but not for every forged kid, and never on
                # the budget of logins when anyone (the back-channel logout route) sent the token.
                if not self._may_refetch_jwks(jwks_budget):
                    raise
                return jwt.decode(token, self._jwks(force=True), algorithms=algorithms)
        except (JoseError, ValueError, TypeError, RecursionError) as error:
            # TypeError: joserfc reads some header members unchecked (a "crit" that is not a list of strings).
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
    def _idp_call(self, what: str, *, reached: bool = True) -> Iterator[None]:
        """Map transport and provider errors to reasons, without their text (it may hold a code); keep
        the provider's state up to date (``reached``: a success means PSC answered, not a cache)."""
        try:
            yield
        except requests.RequestException as error:
            log.warning("Pro Santé Connect %s failed: %s", what, type(error).__name__)
            self._provider_down(f"{what} failed: {type(error).__name__}")
        except OAuthError as error:
            if error.error in IDP_DOWN_ERRORS:
                self._provider_down(f"{what} refused: {_error_code(str(error.error))}")
            raise EcpsError(
                Reason.TOKEN_INVALID, f"{what} refused: {_error_code(str(error.error))}"
            ) from None
        except EcpsError as error:
            if error.reason is Reason.IDP_UNAVAILABLE:
                self._provider_down(error.detail)
            raise
        except ValueError as error:  # a 5xx page that is not JSON, a broken discovery document
            self._provider_down(f"{what} unreadable: {type(error).__name__}")
        else:
            if reached and self._status.state is ProviderState.DOWN:
                self._set_status(ProviderState.UP)

    def _provider_down(self, detail: str) -> None:
        self._set_status(ProviderState.DOWN, detail)
        raise EcpsError(Reason.IDP_UNAVAILABLE, detail) from None


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
    auth_time = id_claims.get("auth_time")
    return Identity(
        idnat=idnat,
        method=LoginMethod.ECPS,
        # Without auth_time PSC did not say when the professional authenticated (an SSO session may be
        # hours old): unknown counts as too old for every max_age rule, which then asks for a step-up.
        auth_time=float(auth_time) if auth_time is not None else UNKNOWN_AUTH_TIME,
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


def _discover_until_up(client_ref: weakref.ref[ProSanteConnect], stop: threading.Event) -> None:
    delay = DISCOVERY_RETRY_FIRST
    while not stop.is_set() and (client := client_ref()) is not None:
        try:
            client._metadata()
        except EcpsError as exc:
            if exc.reason is not Reason.IDP_UNAVAILABLE:
                return  # reachable but misconfigured: retrying cannot help; logins say why
        else:
            return
        del client
        stop.wait(delay)
        delay = min(delay * 2, DISCOVERY_RETRY_MAX)


def client_assertion_key(private_key_pem: str) -> tuple[RSAKey | ECKey, str]:
    """The private_key_jwt signing key and its algorithm, chosen by the key: RS256 for RSA, ES256 for EC P-256
    (authlib signs RS256 unless told otherwise). Other keys are refused (settings say so at start-up)."""
    for key_class, alg in ((RSAKey, "RS256"), (ECKey, "ES256")):
        try:
            key = key_class.import_key(private_key_pem)
        except (ValueError, TypeError, JoseError):
            continue
        if isinstance(key, ECKey) and key.curve_name != "P-256":
            raise ValueError(f"an EC key on {key.curve_name} cannot sign ES256: use P-256")
        if not key.is_private:
            raise ValueError("private_key_pem holds a public key")
        return key, alg
    raise ValueError("private_key_pem is neither an RSA nor an EC private key")
