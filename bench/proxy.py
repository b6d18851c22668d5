"""Gateway throughput and latency against direct, nginx and a naive Flask+requests proxy, in one run.

    .venv/bin/python bench/proxy.py [--seconds 4] [--runs 3]

Every target serves the same upstream page. Runs are interleaved (target A, B, C..., then again) and the
medians of the runs are printed, with ratios to the baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Load, gateway_config, median_load, nginx_argv, print_table, wrk

from gateway.identity import Identity, LoginMethod
from gateway.sessions import RedisSessionStore
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running
from tests.support.redis import redis_server
from tests.support.upstream import gunicorn_argv

POLICIES = """\
rules:
  - name: hello
    match: { path: /hello, methods: [GET] }
    action: public
  - name: records
    match: { path: /patients/*, methods: [GET] }
    action: authenticate
    login: { professions: [10] }
"""
WORKERS, THREADS = 2, 16
GATEWAY_WORKER = "gateway.server.GatewayWorker"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=4, help="duration of one wrk run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (the median is printed)")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        targets, cookie = start_everything(stack, directory)
        headers = {"Cookie": f"__Host-gateway-session={cookie}"}
        throughput: dict[str, list[Load]] = {name: [] for name in targets}
        latency: dict[str, list[Load]] = {name: [] for name in targets}
        for run in range(args.runs):
            for name, url in targets.items():
                extra = headers if "authenticated" in name else None
                throughput[name].append(
                    wrk(url, seconds=args.seconds, connections=args.connections, headers=extra)
                )
                latency[name].append(wrk(url, seconds=args.seconds, connections=1, headers=extra))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        report("throughput", throughput, args.connections)
        report("latency", latency, 1)
        one = {name: median_load(loads) for name, loads in latency.items()}
        added = one["gateway, public route"].p50_ms - one["direct (upstream)"].p50_ms
        added_auth = one["gateway, authenticated route"].p50_ms - one["direct (upstream)"].p50_ms
        print(
            f"\np50 added over direct at 1 connection: public {added:.2f} ms, authenticated {added_auth:.2f} ms"
        )
    return 0


def report(title: str, loads: dict[str, list[Load]], connections: int) -> None:
    medians = {name: median_load(runs) for name, runs in loads.items()}
    baselines = {
        "direct": medians["direct (upstream)"],
        "nginx": medians["nginx proxy"],
        "naive": medians["naive Flask+requests proxy"],
    }
    print_table(
        f"{title}: {connections} connection(s), median of {len(next(iter(loads.values())))} runs",
        list(medians.items()),
        baselines,
    )


def start_everything(stack: contextlib.ExitStack, directory: Path) -> tuple[dict[str, str], str]:
    upstream_port, nginx_port, gateway_port, naive_port, minimal_port = (free_port() for _ in range(5))
    stack.enter_context(
        running(gunicorn_argv(upstream_port, workers=WORKERS, threads=THREADS), upstream_port)
    )
    upstream = f"http://127.0.0.1:{upstream_port}"
    stack.enter_context(running(nginx_argv(directory / "nginx", nginx_port, upstream_port), nginx_port))
    redis = stack.enter_context(redis_server())
    config = gateway_config(
        directory,
        upstream,
        redis.url,
        policies=POLICIES,
        listen=f"127.0.0.1:{gateway_port}",
        extra={"server": {"workers": WORKERS, "threads": THREADS}},
    )
    stack.enter_context(
        running(
            serve_argv(config),
            gateway_port,
            log=directory / "gateway.log",
        )
    )
    here = str(Path(__file__).parent)
    naive = gunicorn_argv(naive_port, WORKERS, THREADS, app="naive_proxy:app", chdir=here)
    stack.enter_context(running(naive, naive_port, env={"NAIVE_UPSTREAM": upstream, "PATH": "/usr/bin:/bin"}))
    # The floor runs under the very server the gateway uses: the difference is the gateway's own work.
    minimal = gunicorn_argv(
        minimal_port, WORKERS, THREADS, app="minimal_proxy:app", chdir=here, worker_class=GATEWAY_WORKER
    )
    env = {
        "MINIMAL_UPSTREAM": f"127.0.0.1:{upstream_port}",
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
    }
    stack.enter_context(running(minimal, minimal_port, env=env))
    store = RedisSessionStore(redis.url)
    identity = Identity("810001234567", LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")
    session = store.create(identity, time.time())
    targets = {
        "direct (upstream)": f"{upstream}/hello",
        "nginx proxy": f"http://127.0.0.1:{nginx_port}/hello",
        "naive Flask+requests proxy": f"http://127.0.0.1:{naive_port}/hello",
        "minimal urllib3 WSGI proxy (floor)": f"http://127.0.0.1:{minimal_port}/hello",
        "gateway, public route": f"http://127.0.0.1:{gateway_port}/hello",
        "gateway, authenticated route": f"http://127.0.0.1:{gateway_port}/patients/180017512345678",
    }
    return targets, session.id


if __name__ == "__main__":
    sys.exit(main())
