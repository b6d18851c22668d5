"""The floor: a WSGI proxy with no logic at all, under the gateway's server and worker, with the gateway's own
portal client (gateway/proxy/upstream.py).

What the gateway adds beyond this is the cost of its own work: normalisation, policy, session, audit,
assertion, header rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from gateway.proxy.upstream import Upstream

_UPSTREAM = Upstream(
    "http://" + os.environ.get("MINIMAL_UPSTREAM", "127.0.0.1:8081"),
    connect_timeout=2,
    read_timeout=30,
    pool_size=64,
    max_concurrent=1024,
)
_HOP = {"connection", "keep-alive", "transfer-encoding"}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    answer = _UPSTREAM.send(
        environ["REQUEST_METHOD"], environ.get("RAW_URI", "/"), [("Host", _UPSTREAM.host_header)]
    )
    start_response(f"{answer.status} -", [(k, v) for k, v in answer.headers if k.lower() not in _HOP])
    return answer
