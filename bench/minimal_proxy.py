"""The floor: a WSGI proxy with no logic at all (urllib3 pool, buffered), under the gateway's server and worker.

What the gateway adds beyond this is the cost of its own work: normalisation, policy, session, audit,
assertion, header rules, streaming.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import urllib3

_HOST, _, _PORT = os.environ.get("MINIMAL_UPSTREAM", "127.0.0.1:8081").rpartition(":")
_POOL = urllib3.HTTPConnectionPool(_HOST, int(_PORT), maxsize=32)
_HOP = {"connection", "keep-alive", "transfer-encoding"}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    answer = _POOL.urlopen(environ["REQUEST_METHOD"], environ.get("RAW_URI", "/"), retries=False)
    start_response(f"{answer.status} -", [(k, v) for k, v in answer.headers.items() if k.lower() not in _HOP])
    return [answer.data]
