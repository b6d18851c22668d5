"""A normal client's latency while 300 clients sit on unfinished request heads and 300 on idle connections.

    .venv/bin/python bench/slow_clients.py [--seconds 4] [--runs 5]

The gateway runs as `make bench` runs it (2 workers x 16 threads, Redis sessions) in front of the test
portal. Interleaved runs of wrk at one connection on a public route: alone, then with the stalled clients
connected (opened before, kept open during the run), medians of the runs and their ratio. The gateway's
header_timeout is raised to 10 minutes for the run so that the stalled clients stay for its whole length
(with the default 10 s they would be cut and would have to reconnect).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from common import Load, gateway_config, median_load, print_table, wrk

from tests.support.clients import stalled_connections
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running
from tests.support.redis import redis_server
from tests.support.upstream import gunicorn_argv

WORKERS, THREADS = 2, 16
STALLED_HEADS, IDLE = 300, 300


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    quiet, attacked = "alone", f"{STALLED_HEADS} unfinished heads + {IDLE} idle"
    loads: dict[str, list[Load]] = {quiet: [], attacked: []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        upstream_port, port = free_port(), free_port()
        stack.enter_context(running(gunicorn_argv(upstream_port, workers=1, threads=8), upstream_port))
        redis = stack.enter_context(redis_server())
        config = gateway_config(
            directory,
            f"http://127.0.0.1:{upstream_port}",
            redis.url,
            listen=f"127.0.0.1:{port}",
            extra={"server": {"workers": WORKERS, "threads": THREADS, "header_timeout": "10m"}},
        )
        stack.enter_context(running(serve_argv(config), port, log=directory / "gateway.log"))
        url = f"http://127.0.0.1:{port}/hello"
        for run in range(args.runs):
            loads[quiet].append(wrk(url, seconds=args.seconds, connections=1))
            with stalled_connections(port, unfinished_heads=STALLED_HEADS, idle=IDLE):
                loads[attacked].append(wrk(url, seconds=args.seconds, connections=1))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    medians = {name: median_load(runs) for name, runs in loads.items()}
    print_table(
        f"one connection to the gateway (public route), median of {args.runs} runs",
        list(medians.items()),
        {"alone": medians[quiet]},
    )
    for name, runs in loads.items():
        p99s = ", ".join(f"{load.p99_ms:.2f}" for load in runs)
        print(f"p99 ms per run, {name}: {p99s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
