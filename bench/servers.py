"""The WSGI server choice: gunicorn (gthread, and the gateway's worker class) vs granian, same app and load.

    .venv/bin/python bench/servers.py [--seconds 4] [--runs 3]

Both serve tests.support.upstream (a tiny WSGI app) with one worker process; the figures show the server's
own cost. The script also asks each server for /echo with an encoded slash and prints whether the raw
request target reached the app: without it a gateway cannot refuse ``%2F`` and would judge another path
than the portal sees.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import urllib.request

from common import Load, median_load, print_table, wrk

from tests.support.processes import free_port, running
from tests.support.upstream import gunicorn_argv


def granian_argv(port: int, threads: int = 16) -> list[str]:
    return [
        sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--blocking-threads", str(threads), "tests.support.upstream:app",
    ]  # fmt: skip


def lingering_argv(port: int) -> list[str]:
    """gunicorn with the gateway's worker class (gthread whose threads linger on kept-alive connections)."""
    return gunicorn_argv(port, worker_class="gateway.worker.GatewayWorker")


def raw_target_seen(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/echo/a%2Fb", timeout=5) as answer:
        seen = json.load(answer)
    return f"RAW_URI={seen['raw_uri']!r}, PATH_INFO={seen['path']!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    servers = {
        "gunicorn gthread": gunicorn_argv,
        "gunicorn, gateway's worker": lingering_argv,
        "granian": granian_argv,
    }
    throughput: dict[str, list[Load]] = {name: [] for name in servers}
    latency: dict[str, list[Load]] = {name: [] for name in servers}
    with contextlib.ExitStack() as stack:
        ports = {}
        for name, argv in servers.items():
            ports[name] = port = free_port()
            stack.enter_context(running(argv(port), port))
            print(f"{name}: {raw_target_seen(port)}")
        for _ in range(args.runs):
            for name, port in ports.items():
                url = f"http://127.0.0.1:{port}/hello"
                throughput[name].append(wrk(url, seconds=args.seconds, connections=32))
                latency[name].append(wrk(url, seconds=args.seconds, connections=1))
    for title, loads, connections in (("throughput", throughput, 32), ("latency", latency, 1)):
        medians = {name: median_load(runs) for name, runs in loads.items()}
        print_table(f"{title}: {connections} connection(s), median of {args.runs} runs", list(medians.items()),
                    {"gunicorn": medians["gunicorn gthread"]})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
