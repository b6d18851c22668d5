"""``GET /.gateway/auth``: the decision for nginx ``auth_request`` sub-requests (forward-auth mode).

nginx asks "may this request through?" and forwards it to the portal itself. Forward-auth is the production
data plane, so it must be exactly as strong as proxy mode; what makes it so:

- The original method, URI and host arrive in X-Original-Method / X-Original-URI / X-Forwarded-Host, believed
  only from ``forward_auth.trusted_nginx``: from anyone else they would let a client have a different request
  judged than the one nginx forwards.
- nginx forwards the raw URI, never the gateway's normal form of it. So an X-Original-URI whose path is not
  already in normal form (dot or empty segments, encoded unreserved characters, lower-case escapes...) is
  refused (400): what reaches the portal is then exactly the path the policy judged.
- The session is the one nginx keyed its decision cache on (X-Gateway-Session, taken from the cookie by the
  template's map), never a cookie the gateway would read differently: a cached answer can only ever be
  served to requests that present the same session id.
- Only decisions that depend on nothing but (session, method, host, URI) are cacheable: allowed and a safe
  method (a state-changing one is judged on its Origin too); on a protected route only when nginx's access
  stream is read (``forward_auth.access_log``, gateway/access_stream.py): nginx then logs every access,
  cached or not, the gateway records each one and counts quotas from it, so a decision is only needed when
  the answer can change (a new session, rule or resource). Without the stream every protected request is
  judged and audited here. A cached allow lives ``forward_auth.cache_seconds`` at most (X-Accel-Expires),
  never past the login's ``max_age`` nor the session's end.
- Every answer carries the decision token (``X-Gateway-Decision``) that nginx writes in its access log.

nginx's auth_request understands 2xx (allow), 401 and 403 only (any other status becomes its 500). So a
refusal here only names its reason (X-Gateway-Reason, with X-Gateway-Retry-After and X-Gateway-Session-Ended
when they apply), and the template's error_page asks ``GET /.gateway/refused`` (:func:`refused_page`) for the
page: the very page proxy mode answers (status, French or English wording, login choices, Retry-After).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, request
from werkzeug.wrappers import Response

from gateway.access import Access, check_access
from gateway.access_stream import DECISION_HEADER, PUBLIC, DecisionToken
from gateway.audit import AuditError
from gateway.limits import STORAGE_ERRORS
from gateway.policy.decision import Outcome, Reason
from gateway.policy.model import Action
from gateway.policy.origin import SAFE_METHODS
from gateway.policy.paths import BadPath, normalise_target
from gateway.proxy.forward import identity_headers
from gateway.proxy.headers import in_networks
from gateway.runtime import (
    GATEWAY_PREFIX,
    REQUEST_ID_KEY,
    SESSION_ID_KEY,
    Gateway,
    audit_request_event,
    gateway_of,
    peer_of,
    refuse,
    refused_host,
    request_id_of,
)
from gateway.wsgi import RawRoute, normalise_host, raw_path_of, utf8_header

log = logging.getLogger("gateway.forward_auth")

AUTH_PATH = GATEWAY_PREFIX + "/auth"
#: The refusal page of a request the decision endpoint refused (asked by nginx's error_page).
REFUSED_PATH = GATEWAY_PREFIX + "/refused"
RETRY_AFTER = "X-Gateway-Retry-After"
SESSION_ENDED = "X-Gateway-Session-Ended"
ORIGINAL_METHOD = "X-Original-Method"
ORIGINAL_URI = "X-Original-URI"
#: "1" when nginx may cache this answer (for X-Accel-Expires seconds; see the module docstring).
CACHEABLE = "X-Gateway-Cacheable"
#: nginx's $request_id (32 hex digits): the audit trail and the portal then share one id per request.
_REQUEST_ID = re.compile(r"^[0-9A-Za-z-]{8,64}$")
#: What no request target may hold (RFC 9112 3.2: printable ASCII only), proxy mode's parser (gunicorn)
#: refuses, and nginx lets through in a query: raw bytes above 0x7e.
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x21-\x7e]")
#: A Retry-After nginx relays (the decision's): whole seconds, short enough for int() (no 500 for a long one).
_RETRY_AFTER = re.compile(r"[0-9]{1,9}")
_NOT_CACHED = [(CACHEABLE, "0"), ("X-Accel-Expires", "0")]


@dataclass(slots=True)
class Answer:
    """What the decision endpoint answers nginx: a status and headers, no body."""

    status: int
    headers: list[tuple[str, str]]

    def response(self) -> Response:
        return Response(status=self.status, headers=self.headers)


def decide(gateway: Gateway, environ: dict[str, Any]) -> Response:
    """The WSGI route (endpoints/proxy.py dispatches here): see :func:`answer`."""
    return answer(gateway, environ).response()


def raw_route(gateway: Gateway) -> RawRoute:
    """The route the gateway's worker answers from nginx's request head, without WSGI (gateway/worker.py):
    the decision costs no more than the decision itself. Failures are answered as proxy mode's error
    handler answers them (runtime.unexpected_error), without a page: nginx shows its own."""

    def serve(environ: dict[str, str]) -> tuple[int, list[tuple[str, str]]]:
        try:
            if utf8_header(environ.get("HTTP_COOKIE", "")):
                decided = answer(gateway, environ)
            else:  # nginx sends no Cookie here; the usual way (gateway/wsgi.py) refuses this one as malformed
                detail = "a Cookie header that is not valid UTF-8"
                reasons = [Reason.BAD_REQUEST_HEADER.value]
                audit_request_event(gateway, environ, "bad_request", reasons=reasons, detail=detail)
                decided = _refusal(environ, 400, Reason.BAD_REQUEST_HEADER)
        except AuditError:
            decided = _refusal(environ, 503, Reason.AUDIT_UNAVAILABLE)
        except STORAGE_ERRORS as exc:
            log.warning(
                "limits storage unavailable (request %s): %s", request_id_of(environ), type(exc).__name__
            )
            decided = _refusal(environ, 503, Reason.LIMITS_UNAVAILABLE)
        except Exception:
            log.exception("unexpected error (request %s)", request_id_of(environ))
            decided = _refusal(environ, 500, Reason.INTERNAL_ERROR)
        return decided.status, decided.headers

    return serve


def answer(gateway: Gateway, environ: dict[str, Any]) -> Answer:
    """The answer to one nginx sub-request, described by ``environ``'s HTTP_* and REMOTE_ADDR entries."""
    if not in_networks(peer_of(environ), gateway.settings.forward_auth.trusted_nginx):
        return _untrusted_peer(gateway, environ)
    request_id = environ.get("HTTP_X_REQUEST_ID", "")
    if _REQUEST_ID.match(request_id):
        environ[REQUEST_ID_KEY] = request_id
    session_id = environ[SESSION_ID_KEY] = environ.get("HTTP_X_GATEWAY_SESSION") or None
    if session_id is not None and not utf8_header(session_id):
        # What proxy mode answers for such a Cookie header (gateway/wsgi.py): a browser never sends one.
        detail = "a session cookie that is not valid UTF-8"
        _audit_refusal(gateway, environ, "bad_request", Reason.BAD_REQUEST_HEADER, detail=detail)
        return _refusal(environ, 400, Reason.BAD_REQUEST_HEADER)
    method = (environ.get("HTTP_X_ORIGINAL_METHOD") or "GET").upper()
    raw_uri = environ.get("HTTP_X_ORIGINAL_URI", "")
    try:
        target = normalise_target(raw_uri)
    except BadPath as exc:
        _audit_refusal(gateway, environ, "bad_request", Reason.BAD_REQUEST_PATH, detail=str(exc))
        return _refusal(environ, 400, Reason.BAD_REQUEST_PATH)
    if _NOT_PRINTABLE_ASCII.search(target.query):
        # Proxy mode never gets such a target (400): nor does the portal, which could read those bytes its way.
        detail = "a byte that is not printable ASCII in the query (browsers percent-encode it)"
        _audit_refusal(gateway, environ, "bad_request", Reason.BAD_REQUEST_PATH, detail=detail)
        return _refusal(environ, 400, Reason.BAD_REQUEST_PATH)
    if target.path != raw_uri.partition("?")[0]:
        # nginx would forward the raw form: the portal could resolve it to another resource than the one judged.
        detail = f"not in normal form (nginx would forward it as received); normal form: {target.path}"
        _audit_refusal(gateway, environ, "bad_request", Reason.BAD_REQUEST_PATH, detail=detail)
        return _refusal(environ, 400, Reason.BAD_REQUEST_PATH)
    raw_host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
    host = normalise_host(raw_host)
    if host is None or host not in gateway.allowed_hosts:
        return _refusal(environ, 400, refused_host(gateway, environ, host, raw_host) or Reason.BAD_HOST)
    stream = gateway.stream_health
    if stream is not None and stream.problem() is not None:
        # The trail lags or cannot be written: what nginx would serve now might never be recorded.
        return _refusal(environ, 503, Reason.AUDIT_UNAVAILABLE)
    access = check_access(gateway, environ, method, host, target, audit=stream is None)
    if access.decision.allowed:
        return _allowed(gateway, environ, access, method, target.path)
    headers = [(DECISION_HEADER, _token(environ, access).encode())]
    if access.retry_after is not None:
        headers.append((RETRY_AFTER, str(access.retry_after)))
    if access.session_ended:
        headers.append((SESSION_ENDED, "1"))
    status = 401 if access.decision.outcome is Outcome.LOGIN else 403
    return _refusal(environ, status, access.decision.reason, headers)


def _allowed(gateway: Gateway, environ: dict[str, Any], access: Access, method: str, path: str) -> Answer:
    rule, session = access.rule, access.session
    headers = [(DECISION_HEADER, _token(environ, access).encode())]
    if rule is not None:
        headers.append(("X-Gateway-Rule", rule.name))
    lifetime = cache_lifetime(gateway, access, method)
    if lifetime:
        headers += [(CACHEABLE, "1"), ("X-Accel-Expires", str(lifetime))]
    else:
        headers += _NOT_CACHED
    if session is not None and rule is not None:
        assertion = gateway.signer.assertion(
            session.identity, session.id, rule.name, access.now, method=method, path=path
        )
        headers.extend(identity_headers(session.identity, assertion))
    return Answer(200, headers)


def cache_lifetime(gateway: Gateway, access: Access, method: str) -> int:
    """Whole seconds nginx may serve this allow from its cache; 0: not at all.

    Never a state-changing request's (nginx's cache key does not hold the Origin and Sec-Fetch-Site headers
    the cross-site check judged, and each such request gets its own assertion). Never a protected route's
    without the access stream (the cached accesses would go unaudited and uncounted). Never past the moment
    the answer would change by itself: the end of the login's ``max_age``, the session's end.
    """
    rule, session = access.rule, access.session
    settings = gateway.settings
    if rule is None or method not in SAFE_METHODS:
        return 0
    seconds = settings.forward_auth.cache_seconds
    if rule.action is not Action.PUBLIC:
        if gateway.stream_health is None or session is None:
            return 0
        ends = [
            session.created_at + settings.sessions.absolute_timeout,
            session.last_seen + settings.sessions.idle_timeout,
        ]
        if rule.login.max_age is not None:
            ends.append(session.identity.auth_time + rule.login.max_age)
        seconds = min(seconds, min(ends) - access.now)
    return max(0, math.floor(seconds))


def _token(environ: dict[str, Any], access: Access) -> DecisionToken:
    rule, session = access.rule, access.session
    identity = session.identity if session is not None else None
    allowed = access.decision.allowed
    public = allowed and rule is not None and rule.action is Action.PUBLIC
    return DecisionToken(
        outcome=PUBLIC if public else access.decision.outcome.value,
        decision_id=request_id_of(environ),
        rule=rule.name if rule is not None else "",
        reasons=tuple(reason.value for reason in access.decision.reasons),
        idnat=identity.idnat if identity is not None else "",
        method=identity.method.value if identity is not None else "",
        auth_mode=(identity.auth_mode or "") if identity is not None else "",
        resource=access.resource if allowed else None,
    )


def _untrusted_peer(gateway: Gateway, environ: dict[str, Any]) -> Answer:
    sent = [name for name in (ORIGINAL_METHOD, ORIGINAL_URI) if _environ_key(name) in environ]
    _audit_refusal(gateway, environ, "spoofed_header", Reason.SPOOFED_HEADER, headers=sorted(sent))
    return _refusal(environ, 403, Reason.SPOOFED_HEADER)


def _refusal(
    environ: dict[str, Any], status: int, reason: Reason, headers: list[tuple[str, str]] | None = None
) -> Answer:
    if headers is None:
        token = DecisionToken(Outcome.DENY.value, request_id_of(environ), reasons=(reason.value,))
        headers = [(DECISION_HEADER, token.encode())]
    # X-Accel-Expires: nginx's own "never cache this", in case its config forgets.
    return Answer(
        status,
        [*headers, ("X-Gateway-Reason", reason.value), *_NOT_CACHED, ("Cache-Control", "no-store")],
    )


def _audit_refusal(
    gateway: Gateway, environ: dict[str, Any], event: str, reason: Reason, **fields: Any
) -> None:
    audit_request_event(gateway, environ, event, decision="deny", reasons=[reason.value], **fields)


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def blueprint() -> Blueprint:
    pages = Blueprint("gateway_forward_auth", __name__)
    pages.add_url_rule(REFUSED_PATH, "refused", refused_page, methods=["GET"])
    return pages


def refused_page() -> Response:
    """The page for a request the decision endpoint refused, as proxy mode answers it.

    Asked by nginx (``forward_auth.trusted_nginx`` only, by this very path; anyone else finds nothing here) with the refused
    request's method, URI, host and id (the page's reference; none for a page nginx shares), the reason the
    decision named, and the client's Accept, Accept-Language
    and Cookie (language, page or JSON, the logout link). It decides nothing: the refusal was decided, and
    audited, by the decision endpoint."""
    gateway = gateway_of()
    environ = request.environ
    trusted = in_networks(peer_of(environ), gateway.settings.forward_auth.trusted_nginx)
    # By its very path only (nginx's): "/.gateway//refused" is a client that got past nginx's 404.
    if not trusted or raw_path_of(environ) != REFUSED_PATH:
        return Response("not found", 404, content_type="text/plain; charset=utf-8")
    request_id = environ.get("HTTP_X_REQUEST_ID", "")
    if _REQUEST_ID.match(request_id):
        environ[REQUEST_ID_KEY] = request_id
    try:
        reason = Reason(request.headers.get("X-Gateway-Reason", ""))
    except ValueError:
        reason = Reason.INTERNAL_ERROR  # a refusal without a reason: nothing to say but that it failed
    retry_after = request.headers.get(RETRY_AFTER, "")
    try:
        target = normalise_target(request.headers.get(ORIGINAL_URI, ""))
    except BadPath:
        next_path, rule = "/", None
    else:
        method = request.headers.get(ORIGINAL_METHOD, "GET").upper()
        host = normalise_host(request.headers.get("X-Forwarded-Host", "")) or ""
        next_path, rule = target.path_and_query, gateway.policies.match(method, host, target.path)
    return refuse(
        reason,
        retry_after=int(retry_after) if _RETRY_AFTER.fullmatch(retry_after) else None,
        next_path=next_path,
        rule=rule,
        session_ended=request.headers.get(SESSION_ENDED) == "1",
        # Without the refused request's id, nginx caches the page for every client (@cps_rate_limited): it
        # must name no request, or one client's reference would be shown to others.
        reference=None if _REQUEST_ID.match(request_id) else "",
    )
