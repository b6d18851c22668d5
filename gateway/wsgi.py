"""WSGI-level request facts: the one normalisation of the request target, the host, the header list.

The middleware runs before Flask routes anything, so Flask's routing, the policy engine and the upstream
all see the same normalised path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway.policy.paths import BadPath, NormalisedTarget, normalise_target

TARGET_KEY = "gateway.target"
BAD_TARGET_KEY = "gateway.bad_target"
#: Why a header the gateway reads is refused (the request is then answered 400, like a bad target).
BAD_HEADER_KEY = "gateway.bad_header"

_HOST = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*|\[[0-9a-f:.]+\])$"
)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: A route the gateway's worker answers from the request head alone, without WSGI (gateway/worker.py): called
#: with REMOTE_ADDR and the head's fields under their WSGI names (HTTP_*), it returns the status and headers
#: of an answer without body. The app lists its raw routes by path in its attribute RAW_ROUTES_ATTRIBUTE.
RawRoute = Callable[[dict[str, str]], tuple[int, list[tuple[str, str]]]]
RAW_ROUTES_ATTRIBUTE = "raw_routes"


class NormalisedTargetMiddleware:
    """Normalise the raw request target once; mark refused targets (and unreadable Cookie headers) for the
    app to answer 400."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if BAD_TARGET_KEY in environ or BAD_HEADER_KEY in environ:
            # Set by the gateway's worker for a request its HTTP parser refused (gateway/worker.py): the app
            # answers its page. (A client cannot name a WSGI key: its headers all become HTTP_*.)
            environ["PATH_INFO"] = "/"
            return self.app(environ, start_response)
        if not utf8_header(environ.get("HTTP_COOKIE", "")):
            # werkzeug decodes cookies as UTF-8 and raises on anything else, wherever a cookie is read
            # (the session, the login state, the refusal page itself): refuse, and keep the header from them.
            environ[BAD_HEADER_KEY] = "a Cookie header that is not valid UTF-8"
            del environ["HTTP_COOKIE"]
            environ["PATH_INFO"] = "/"
            return self.app(environ, start_response)
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if raw is None:
            # Without the raw target an encoded slash is indistinguishable from a real one: refuse.
            environ[BAD_TARGET_KEY] = "the server did not provide the raw request target"
            environ["PATH_INFO"] = "/"
            return self.app(environ, start_response)
        raw_path = raw.partition("?")[0]
        try:
            target = normalise_target(raw_path + _query(environ))
        except BadPath as exc:
            environ[BAD_TARGET_KEY] = str(exc)
            environ["PATH_INFO"] = "/"
            return self.app(environ, start_response)
        environ[TARGET_KEY] = target
        # WSGI carries the decoded path as latin-1 code points of its UTF-8 bytes.
        environ["PATH_INFO"] = target.decoded_path.encode("utf-8").decode("latin-1")
        return self.app(environ, start_response)


def raw_path_of(environ: dict[str, Any]) -> str | None:
    """The request target's path as the client sent it (before any normalisation), None when unknown."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    return None if raw is None else str(raw).partition("?")[0]


def utf8_header(value: str) -> bool:
    """True when a header value (WSGI: its bytes as latin-1 code points) is valid UTF-8."""
    if value.isascii():
        return True
    try:
        value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return False
    return True


def _query(environ: dict[str, Any]) -> str:
    query = environ.get("QUERY_STRING", "")
    return f"?{query}" if query else ""


def target_of(environ: dict[str, Any]) -> NormalisedTarget:
    return environ[TARGET_KEY]


def normalise_host(value: str) -> str | None:
    """Lower-case host without port or trailing dot, or None when it is not a valid host."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value.partition("]")
        host += "]"
        port = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    else:
        host, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    host = host.rstrip(".")
    return host if host and _HOST.match(host) else None


def request_headers(environ: dict[str, Any]) -> list[tuple[str, str]]:
    """The request's headers from a WSGI environ, with their HTTP spelling."""
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
    if environ.get("CONTENT_TYPE"):
        headers.append(("Content-Type", environ["CONTENT_TYPE"]))
    return headers


class RequestBodyTimeout(TimeoutError):
    """The client sent its request body too slowly (``server.body_timeout``, ``server.body_min_rate``);
    raised by the server from reads of ``wsgi.input``."""


class StrictTransportSecurity:
    """Adds ``Strict-Transport-Security`` to every answer (pages, redirects, proxied portal responses) for a
    request whose Host is one of the gateway's https origins (``server.public_origin``,
    ``card.login_origin``): once a browser has seen it, it never speaks plain http to that host again. Not
    ``includeSubDomains``: other hosts of the domain are not the gateway's to decide for."""

    HEADER = ("Strict-Transport-Security", "max-age=31536000")

    def __init__(self, app: WsgiApp, hosts: frozenset[str]) -> None:
        self.app = app
        #: Host header values (lower-case, with and without the port) the header is added for.
        self.hosts = hosts

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("HTTP_HOST", "").lower() not in self.hosts:
            return self.app(environ, start_response)

        def start_with_hsts(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(self.HEADER)
            return start_response(status, headers, exc_info)

        return self.app(environ, start_with_hsts)
