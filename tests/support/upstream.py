"""A real upstream HTTP server for proxy tests and benchmarks (plain WSGI under gunicorn).

Endpoints: ``/hello`` (a small page), ``/echo/**`` (what arrived, as JSON), ``/bytes/<n>`` (n bytes
streamed), ``/upload`` (counts and hashes the body as it streams in), ``/slow/<seconds>``,
``/set-cookie`` (tries to set the gateway's session cookie).

``recording_app`` is the same portal that also appends one JSON line per request it received (method, raw
target, headers, body length, or the error reading the body) to the file named by ``$UPSTREAM_RECORD``:
the proof of what reached the portal.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CHUNK = 64 * 1024
_HELLO = b"<!doctype html><title>hello</title><p>hello from the portal</p>" + b"." * 400


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/hello" or path == "/" or path.startswith("/patients/") or path.startswith("/static/"):
        return _answer(start_response, _HELLO, "text/html")
    if path.startswith("/echo"):
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        body = environ["wsgi.input"].read()
        payload = {
            "method": environ["REQUEST_METHOD"],
            "raw_uri": environ.get("RAW_URI"),
            "path": path,
            "query": environ.get("QUERY_STRING", ""),
            "headers": headers,
            "body_length": len(body),
        }
        return _answer(start_response, json.dumps(payload).encode(), "application/json")
    if path.startswith("/bytes/"):
        size = int(path.rsplit("/", 1)[1])
        start_response(
            "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        )
        return _zeros(size)
    if path == "/upload":
        digest = hashlib.sha256()
        received = 0
        stream = environ["wsgi.input"]
        while chunk := stream.read(CHUNK):
            received += len(chunk)
            digest.update(chunk)
        payload = {"received": received, "sha256": digest.hexdigest()}
        return _answer(start_response, json.dumps(payload).encode(), "application/json")
    if path.startswith("/slow/"):
        time.sleep(float(path.rsplit("/", 1)[1]))
        return _answer(start_response, b"slow", "text/plain")
    if path == "/set-cookie":
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Set-Cookie", "__Host-gateway-session=fixated; Path=/; Secure"),
                ("Set-Cookie", "portal=ok; Path=/"),
            ],
        )
        return [b"cookies"]
    return _answer(start_response, b"not found", "text/plain", "404 Not Found")


def recording_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    record: dict[str, Any] = {
        "method": environ["REQUEST_METHOD"],
        "raw_uri": environ.get("RAW_URI"),
        "headers": {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")},
        "content_length": environ.get("CONTENT_LENGTH"),
    }
    try:
        body = environ["wsgi.input"].read()
        record["body_length"] = len(body)
    except Exception as exc:  # a truncated or malformed body still reached the portal: record that
        record["body_error"] = type(exc).__name__
        body = b""
    with open(os.environ["UPSTREAM_RECORD"], "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    environ["wsgi.input"] = _Replay(body)
    return app(environ, start_response)


class _Replay:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def read(self, size: int = -1) -> bytes:
        chunk, self._body = (self._body, b"") if size < 0 else (self._body[:size], self._body[size:])
        return chunk


def recorded(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What the recording portal received so far."""
    try:
        with open(path, encoding="utf-8") as log:
            return [json.loads(line) for line in log if line.strip()]
    except FileNotFoundError:
        return []


def _answer(
    start_response: Callable[..., Any], body: bytes, kind: str, status: str = "200 OK"
) -> list[bytes]:
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]


def _zeros(size: int) -> Iterator[bytes]:
    block = b"\0" * CHUNK
    while size > 0:
        piece = block if size >= CHUNK else block[:size]
        size -= len(piece)
        yield piece


def gunicorn_argv(
    port: int,
    workers: int = 1,
    threads: int = 16,
    app: str = "tests.support.upstream:app",
    chdir: str | None = None,
    worker_class: str = "gthread",
) -> list[str]:
    """gunicorn (threaded workers, keep-alive) serving ``app`` on 127.0.0.1:``port``."""
    where = ["--chdir", chdir] if chdir else []
    return [
        sys.executable, "-m", "gunicorn", "--no-control-socket", "-k", worker_class,
        "--workers", str(workers), "--threads", str(threads), "--bind", f"127.0.0.1:{port}",
        "--keep-alive", "75", *where, app,
    ]  # fmt: skip
