"""Everything outside /.gateway/: judged by the policies, then forwarded to the portal or refused.

This is plain WSGI in front of the Flask app, not a Flask view: on the path every portal request takes,
Flask's request context, routing and flask-limiter's hooks cost about 0.3 ms of CPU per request (README,
"Performance"). Refusals, rare by comparison, are rendered inside a Flask request context like every other
page. The gateway's own routes (/.gateway/...) and malformed request targets go to Flask untouched, except
the few named in ``hot_routes`` (the forward-auth decision, asked on every request nginx forwards).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from flask import Flask
from werkzeug.wrappers import Response

from gateway import metrics
from gateway.access import Access, check_access
from gateway.authn.card.headers import CARD_HOST_SECRET_HEADER
from gateway.policy.decision import Reason
from gateway.policy.paths import NormalisedTarget
from gateway.proxy.forward import ForwardedAnswer, forward, identity_headers
from gateway.proxy.headers import filter_request_headers, in_networks
from gateway.proxy.upstream import ClientBodyError, UpstreamError
from gateway.runtime import (
    GATEWAY_PREFIX,
    Gateway,
    audit_request_event,
    gateway_of,
    peer_of,
    refuse,
    refuse_method,
    refused_host,
    request_host_of,
    request_id_of,
    unexpected_error,
)
from gateway.wsgi import TARGET_KEY, WsgiApp, raw_path_of, request_headers

log = logging.getLogger("gateway.proxy")

ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_OWN_PATHS = GATEWAY_PREFIX + "/"
CARD_HOST_SECRET_KEY = "HTTP_" + CARD_HOST_SECRET_HEADER.upper().replace("-", "_")


#: A /.gateway/ route answered without Flask: (gateway, environ) -> response.
HotRoute = Callable[[Gateway, dict[str, Any]], Response]


class ProxyApp:
    """WSGI: portal requests are decided and forwarded here, ``hot_routes`` answered; the rest goes to
    ``gateway_routes`` (Flask)."""

    def __init__(
        self, app: Flask, gateway_routes: WsgiApp, *, hot_routes: Mapping[str, HotRoute] | None = None
    ) -> None:
        self.app = app
        self.gateway_routes = gateway_routes
        self.gateway = gateway_of(app)
        self.hot_routes = dict(hot_routes or {})

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        target = environ.get(TARGET_KEY)
        if target is None:
            return self.gateway_routes(environ, start_response)
        answer: Callable[[], WsgiApp]
        if target.decoded_path.startswith(_OWN_PATHS):
            hot_route = self.hot_routes.get(target.decoded_path)
            if hot_route is None or raw_path_of(environ) != target.decoded_path:
                # Only asked by its very path (nginx's): "/.gateway//auth" is a client that got past nginx.
                return self.gateway_routes(environ, start_response)
            answer = partial(hot_route, self.gateway, environ)
        else:
            answer = partial(self._proxy, environ, target)
        if environ["REQUEST_METHOD"] not in ALL_METHODS:
            answer = partial(self._in_flask, environ, partial(refuse_method, ALL_METHODS))
        try:
            response = answer()
        except Exception as exc:  # what Flask's error handler does for the gateway's own routes
            response = self._in_flask(environ, partial(unexpected_error, exc))
        return response(environ, start_response)

    def _proxy(self, environ: dict[str, Any], target: NormalisedTarget) -> WsgiApp:
        gateway = self.gateway
        host = request_host_of(gateway, environ)
        if host is None or host not in gateway.allowed_hosts:
            reason = refused_host(gateway, environ, host, environ.get("HTTP_HOST", ""))
            assert reason is not None
            return self._in_flask(environ, partial(refuse, reason))
        access = check_access(gateway, environ, environ["REQUEST_METHOD"], host, target)
        next_path = target.path_and_query
        if not access.decision.allowed:
            refusal = partial(
                refuse,
                access.decision.reason,
                retry_after=access.retry_after,
                next_path=next_path,
                rule=access.rule,
                session_ended=access.session_ended,
            )
            return self._in_flask(environ, refusal)
        try:
            return self._forward(environ, next_path, access)
        except ClientBodyError as exc:
            log.info("client body error (request %s): %s", request_id_of(environ), exc.detail)
            audit_request_event(
                gateway,
                environ,
                "bad_request",
                rule=access.rule.name if access.rule else None,
                reasons=[exc.reason.value],
                detail=exc.detail,
            )
            return self._in_flask(environ, partial(refuse, exc.reason, next_path=next_path))
        except UpstreamError as exc:
            log.warning("upstream error (request %s): %s", request_id_of(environ), exc.detail)
            rule = access.rule
            audit_request_event(
                gateway,
                environ,
                "upstream_error",
                rule=rule.name if rule else None,
                reasons=[exc.reason.value],
            )
            return self._in_flask(environ, partial(refuse, exc.reason, next_path=next_path))

    def _forward(self, environ: dict[str, Any], target: str, access: Access) -> ForwardedAnswer:
        gateway = self.gateway
        server = gateway.settings.server
        peer = peer_of(environ)
        card_host = gateway.card_host
        incoming = filter_request_headers(
            request_headers(environ),
            card_host_vouched=card_host is not None
            and card_host.vouches(peer, environ.get("HTTP_HOST"), environ.get(CARD_HOST_SECRET_KEY)),
            drop_cookies=gateway.protected_cookies,
        )
        if incoming.spoofed:
            audit_request_event(
                gateway,
                environ,
                "spoofed_header",
                reasons=[Reason.SPOOFED_HEADER.value],
                headers=sorted(incoming.spoofed),
            )
        extra = [("X-Request-Id", request_id_of(environ))]
        session, rule = access.session, access.rule
        if session is not None and rule is not None:
            # Bound to this request: the method and the normalised path the portal receives, no query.
            method, path = environ["REQUEST_METHOD"], target.partition("?")[0]
            assertion = gateway.signer.assertion(
                session.identity, session.id, rule.name, access.now, method=method, path=path
            )
            extra.extend(identity_headers(session.identity, assertion))
        client_host = environ.get("HTTP_HOST", "")
        preserve = gateway.settings.upstream.host_header == "preserve"
        with metrics.upstream_timer():
            return forward(
                gateway.upstream,
                environ,
                target=target,
                headers=incoming.forwardable,
                peer=peer,
                host=client_host,
                from_trusted_proxy=in_networks(peer, server.trusted_proxies),
                host_header=client_host if preserve else gateway.upstream.host_header,
                extra_headers=extra,
                protected_cookies=gateway.protected_cookies,
                portal_origin=gateway.portal_origin,
            )

    def _in_flask(self, environ: dict[str, Any], render: Callable[[], Response]) -> Response:
        """A page rendered by the Flask app (templates, language negotiation) for this request."""
        with self.app.request_context(environ):
            return render()
