"""CPU per request of the gateway's WSGI app, called in-process (no HTTP server), against a real upstream.

    .venv/bin/python bench/in_process.py [--requests 3000] [--runs 3]

The median CPU time (this thread, user + system: the upstream's work is not counted) of one request through
the no-logic floor proxy and through the gateway (public route, authenticated route with a Redis session),
interleaved runs, medians of the runs. It isolates the gateway's own cost from the server's and the machine's
scheduling noise: compare it with the floor in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from common import gateway_config
from proxy import POLICIES
from werkzeug.test import EnvironBuilder

from gateway.app import create_app
from gateway.identity import Identity, LoginMethod
from gateway.sessions import RedisSessionStore
from gateway.settings import load_settings
from gateway.wsgi import WsgiApp
from tests.support.processes import free_port, running
from tests.support.redis import redis_server
from tests.support.upstream import gunicorn_argv

RECORD = "/patients/180017512345678"


def environ(path: str, cookie: str | None = None) -> dict[str, Any]:
    headers = {"Host": "127.0.0.1:8080", "Accept": "*/*"}
    if cookie:
        headers["Cookie"] = f"__Host-gateway-session={cookie}"
    built = EnvironBuilder(
        path=path, headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"}
    ).get_environ()
    built["RAW_URI"] = path  # what gunicorn adds: the request target as received
    return built


def cpu_per_request(app: WsgiApp, make_environ: Callable[[], dict[str, Any]], requests: int) -> float:
    """Median CPU seconds of one request (status checked: a refusal would measure the wrong path)."""
    times = []
    for _ in range(requests):
        request = make_environ()
        statuses: list[str] = []
        start_response = partial(_keep_status, statuses)
        started = time.thread_time()
        body = app(request, start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
        times.append(time.thread_time() - started)
        if not statuses[0].startswith("200"):
            raise RuntimeError(f"{request['PATH_INFO']} answered {statuses[0]}")
    return statistics.median(times)


def _keep_status(statuses: list[str], status: str, headers: Any, exc_info: Any = None) -> None:
    statuses.append(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per measurement")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (the median is printed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        upstream_port = free_port()
        stack.enter_context(running(gunicorn_argv(upstream_port, workers=1, threads=4), upstream_port))
        redis = stack.enter_context(redis_server())
        config = gateway_config(directory, f"http://127.0.0.1:{upstream_port}", redis.url, policies=POLICIES)
        os.chdir(config.parent)  # the audit file is relative to the settings
        gateway = create_app(load_settings(config))
        identity = Identity(
            "810001234567", LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD"
        )
        session = RedisSessionStore(redis.url).create(identity, time.time())
        os.environ["MINIMAL_UPSTREAM"] = f"127.0.0.1:{upstream_port}"  # read when the module loads
        minimal_proxy = importlib.import_module("minimal_proxy")
        targets: dict[str, tuple[WsgiApp, Callable[[], dict[str, Any]]]] = {
            "minimal WSGI proxy (floor)": (minimal_proxy.app, lambda: environ("/hello")),
            "gateway, public route": (gateway, lambda: environ("/hello")),
            "gateway, authenticated route": (gateway, lambda: environ(RECORD, session.id)),
        }
        runs: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.runs):
            for name, (app, make_environ) in targets.items():
                runs[name].append(cpu_per_request(app, make_environ, args.requests))
    floor = statistics.median(runs["minimal WSGI proxy (floor)"])
    print(f"\nCPU per request, in-process, median of {args.runs} runs of {args.requests} requests")
    print(f"{'target':<40}{'CPU us':>10}{'over floor':>12}")
    for name, values in runs.items():
        value = statistics.median(values)
        print(f"{name:<40}{value * 1e6:>10.0f}{(value - floor) * 1e6:>+12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
