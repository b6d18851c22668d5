"""A portal stand-in that records every request it receives, so a test proves what reached the portal (and
what never did). Plain WSGI, run under gunicorn like tests/support/upstream.py.

Each request appends one JSON line to ``$RECORDING_FILE``: method, raw request target, headers (lower-case
names), body. Answers: ``.../redirect-internal`` redirects to the portal's own address (``$PORTAL_ORIGIN``, or the
``to`` query parameter, ``{portal}`` standing for its host:port), ``.../content-location`` names that URL in
Content-Location, ``.../set-cookie`` tries to set the gateway's cookies, anything else echoes the record as JSON.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

CASE_HEADER = "X-Parity-Case"
_LOCK = threading.Lock()

#: What a compromised or careless portal could send to fixate the gateway's session (login CSRF).
GATEWAY_SET_COOKIES = (
    "__Host-gateway-session=fixated; Path=/; Secure; HttpOnly",
    "__host-gateway-session=fixated; path=/; secure",
    " __Host-gateway-login =fixated; Path=/; Secure",
)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    record = {
        "method": environ["REQUEST_METHOD"],
        "raw_uri": environ.get("RAW_URI"),
        "headers": {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")},
        "body": environ["wsgi.input"].read().decode("latin-1"),
    }
    line = json.dumps(record) + "\n"
    with _LOCK, open(os.environ["RECORDING_FILE"], "a", encoding="utf-8") as file:
        file.write(line)
    path = environ.get("PATH_INFO", "")
    origin = os.environ["PORTAL_ORIGIN"]
    # ?to=...: the URL to name instead, "{portal}" standing for the portal's host:port.
    named = parse_qs(environ.get("QUERY_STRING", "")).get("to", [origin + "/landing?from=portal"])[0]
    named = named.replace("{portal}", origin.partition("://")[2])
    if path.endswith("/redirect-internal"):
        start_response("302 Found", [("Location", named)])
        return [b""]
    headers = [("Content-Type", "application/json")]
    if path.endswith("/content-location"):
        headers.append(("Content-Location", named))
    if path.endswith(
        "/accel-redirect"
    ):  # what a portal's protected downloads often answer (nginx's own header)
        headers.append(("X-Accel-Redirect", named))
    if path.endswith(("/status-401", "/status-403", "/status-500")):  # the portal's own refusals and errors
        start_response(f"{path[-3:]} Portal", headers)
        return [b'{"portal": "its own answer"}']
    if path.endswith("/set-cookie"):
        headers += [("Set-Cookie", value) for value in GATEWAY_SET_COOKIES]
        headers.append(("Set-Cookie", "portal=ok; Path=/; Secure"))
    start_response("200 OK", headers)
    return [line.encode()]


def received(recording: Path, case: str) -> list[dict[str, Any]]:
    """The requests the portal received that carry ``X-Parity-Case: case``."""
    if not recording.exists():
        return []
    records = [json.loads(line) for line in recording.read_text(encoding="utf-8").splitlines()]
    return [r for r in records if r["headers"].get(CASE_HEADER.lower()) == case]
