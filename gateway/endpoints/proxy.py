"""Everything outside /.gateway/: judged by the policies, then forwarded to the portal or refused."""

from __future__ import annotations

import logging

from flask import Response, request

from gateway import metrics
from gateway.access import Access, check_access
from gateway.policy.decision import Reason
from gateway.proxy.forward import forward, identity_headers
from gateway.proxy.headers import filter_request_headers, in_networks
from gateway.proxy.upstream import UpstreamError
from gateway.runtime import (
    Gateway,
    audit_event,
    gateway_of,
    peer,
    refuse,
    request_host,
    request_id,
)
from gateway.wsgi import request_headers, target_of

log = logging.getLogger("gateway.proxy")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def proxy_view(path: str = "") -> Response:
    gateway = gateway_of()
    target = target_of(request.environ)
    host = request_host(gateway)
    if host is None:
        audit_event(
            gateway, "bad_request", reasons=[Reason.BAD_HOST.value], host=request.headers.get("Host", "")
        )
        return refuse(Reason.BAD_HOST)
    access = check_access(gateway, request.method, host, target)
    next_path = target.path_and_query
    if not access.decision.allowed:
        return refuse(access.decision.reason, retry_after=access.retry_after, next_path=next_path)
    return _forward(gateway, next_path, access)


def _forward(gateway: Gateway, target: str, access: Access) -> Response:
    server = gateway.settings.server
    incoming = filter_request_headers(
        request_headers(request.environ),
        from_tls_terminator=in_networks(peer(), server.tls_terminators),
        drop_cookies=gateway.protected_cookies,
    )
    if incoming.spoofed:
        audit_event(
            gateway, "spoofed_header", reasons=[Reason.SPOOFED_HEADER.value], headers=sorted(incoming.spoofed)
        )
    extra = [("X-Request-Id", request_id())]
    session, rule = access.session, access.rule
    if session is not None and rule is not None:
        assertion = gateway.signer.assertion(session.identity, session.id, rule.name, access.now)
        extra.extend(identity_headers(session.identity, assertion))
    client_host = request.headers.get("Host", "")
    preserve = gateway.settings.upstream.host_header == "preserve"
    try:
        with metrics.upstream_timer():
            return forward(
                gateway.upstream,
                request,
                target=target,
                headers=incoming.forwardable,
                peer=peer(),
                host=client_host,
                from_trusted_proxy=in_networks(peer(), server.trusted_proxies),
                host_header=client_host if preserve else gateway.upstream.host_header,
                extra_headers=extra,
                protected_cookies=gateway.protected_cookies,
            )
    except UpstreamError as exc:
        log.warning("upstream error (request %s): %s", request_id(), exc.detail)
        audit_event(gateway, "upstream_error", rule=rule.name if rule else None, reasons=[exc.reason.value])
        return refuse(exc.reason, next_path=target)
