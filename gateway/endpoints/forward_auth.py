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
- Only decisions that depend on nothing but (session, method, host, URI) are cacheable: allowed, a safe
  method (a state-changing one is judged on its Origin too), and a rule without quota (a cached answer would
  skip the count).

nginx's auth_request understands 2xx (allow), 401 and 403 only; the template maps the gateway's 400 back onto
a 400 for the client, other refusals onto 401/403, the precise reason travelling in X-Gateway-Reason.
"""

from __future__ import annotations

import re
from typing import Any

from werkzeug.wrappers import Response

from gateway.access import Access, check_access
from gateway.policy.decision import Outcome, Reason
from gateway.policy.origin import SAFE_METHODS
from gateway.policy.paths import BadPath, normalise_target
from gateway.proxy.forward import identity_headers
from gateway.proxy.headers import in_networks
from gateway.responses import login_link
from gateway.runtime import (
    GATEWAY_PREFIX,
    REQUEST_ID_KEY,
    SESSION_ID_KEY,
    Gateway,
    audit_request_event,
    peer_of,
    refused_host,
)
from gateway.wsgi import normalise_host

AUTH_PATH = GATEWAY_PREFIX + "/auth"
ORIGINAL_METHOD = "X-Original-Method"
ORIGINAL_URI = "X-Original-URI"
#: "1" when nginx may cache this answer for a few seconds (see the module docstring).
CACHEABLE = "X-Gateway-Cacheable"
#: nginx's $request_id (32 hex digits): the audit trail and the portal then share one id per request.
_REQUEST_ID = re.compile(r"^[0-9A-Za-z-]{8,64}$")


def decide(gateway: Gateway, environ: dict[str, Any]) -> Response:
    """The answer to one nginx sub-request. Plain WSGI like the proxy (endpoints/proxy.py dispatches here):
    routes with a quota ask on every request."""
    if not in_networks(peer_of(environ), gateway.settings.forward_auth.trusted_nginx):
        return _untrusted_peer(gateway, environ)
    request_id = environ.get("HTTP_X_REQUEST_ID", "")
    if _REQUEST_ID.match(request_id):
        environ[REQUEST_ID_KEY] = request_id
    environ[SESSION_ID_KEY] = environ.get("HTTP_X_GATEWAY_SESSION") or None
    method = (environ.get("HTTP_X_ORIGINAL_METHOD") or "GET").upper()
    raw_uri = environ.get("HTTP_X_ORIGINAL_URI", "")
    try:
        target = normalise_target(raw_uri)
    except BadPath as exc:
        _audit_refusal(gateway, environ, "bad_request", Reason.BAD_REQUEST_PATH, detail=str(exc))
        return _answer(400, Reason.BAD_REQUEST_PATH)
    if target.path != raw_uri.partition("?")[0]:
        # nginx would forward the raw form: the portal could resolve it to another resource than the one judged.
        detail = f"not in normal form (nginx would forward it as received); normal form: {target.path}"
        _audit_refusal(gateway, environ, "bad_request", Reason.BAD_REQUEST_PATH, detail=detail)
        return _answer(400, Reason.BAD_REQUEST_PATH)
    raw_host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
    host = normalise_host(raw_host)
    if host is None or host not in gateway.allowed_hosts:
        return _answer(400, refused_host(gateway, environ, host, raw_host) or Reason.BAD_HOST)
    access = check_access(gateway, environ, method, host, target)
    if access.decision.allowed:
        return _allowed(gateway, access, method, target.path)
    if access.decision.outcome is Outcome.LOGIN:
        next_path = target.path_and_query
        response = _answer(401, access.decision.reason)
        response.headers["X-Gateway-Login"] = login_link(f"{GATEWAY_PREFIX}/login", next_path)
        return response
    return _answer(403, access.decision.reason)


def _allowed(gateway: Gateway, access: Access, method: str, path: str) -> Response:
    response = Response(status=200)
    rule, session = access.rule, access.session
    # Never cache a state-changing request's answer: nginx's cache key does not hold the Origin and
    # Sec-Fetch-Site headers the cross-site check judged, and each such request gets its own assertion.
    cacheable = rule is not None and rule.quota is None and method in SAFE_METHODS
    if rule is not None:
        response.headers["X-Gateway-Rule"] = rule.name
    response.headers[CACHEABLE] = "1" if cacheable else "0"
    if not cacheable:
        response.headers["X-Accel-Expires"] = "0"
    if session is not None and rule is not None:
        assertion = gateway.signer.assertion(
            session.identity, session.id, rule.name, access.now, method=method, path=path
        )
        response.headers.extend(identity_headers(session.identity, assertion))
    return response


def _untrusted_peer(gateway: Gateway, environ: dict[str, Any]) -> Response:
    sent = [name for name in (ORIGINAL_METHOD, ORIGINAL_URI) if _environ_key(name) in environ]
    _audit_refusal(gateway, environ, "spoofed_header", Reason.SPOOFED_HEADER, headers=sorted(sent))
    return _answer(403, Reason.SPOOFED_HEADER)


def _answer(status: int, reason: Reason) -> Response:
    response = Response(status=status)
    response.headers["X-Gateway-Reason"] = reason.value
    response.headers[CACHEABLE] = "0"
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Expires"] = "0"  # nginx's own "never cache this", in case its config forgets
    return response


def _audit_refusal(
    gateway: Gateway, environ: dict[str, Any], event: str, reason: Reason, **fields: Any
) -> None:
    audit_request_event(gateway, environ, event, decision="deny", reasons=[reason.value], **fields)


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")
