"""CPU per forward-auth decision: the gateway asked directly, as nginx's auth_request asks it (issue 14 goal 3).

    .venv/bin/python bench/decision.py [--seconds 3] [--runs 5] [--connections 16]
                                       [--compare main=/path/to/another/checkout]

wrk sends nginx's sub-request (deploy/nginx/forward-auth.conf: X-Original-URI, X-Gateway-Session...) straight
to the gateway (1 worker x 16 threads, Redis, audit file, access stream configured), each time for a record
never read before on a route with a quota: the session lookup, the policy, the quota script in Redis and a
new signed assertion, every time. No nginx, no access log lines: the CPU of the gateway's worker and of Redis
per decision, read from /proc, is the decision's alone (bench/forward_auth.py measures the whole path).
``--compare`` runs gateways from other source trees in the same interleaved runs (A/B).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_seconds, gateway_config, wrk
from forward_auth import POLICIES

from gateway.identity import Identity, LoginMethod
from gateway.sessions import RedisSessionStore
from tests.support.processes import PYTHON, free_port, running
from tests.support.redis import redis_server

#: nginx's sub-request for a new record each time ({session}, {run}: filled in per run).
SUB_REQUESTS = """\
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local id = string.format("{run}%02d%010d", tid, counter)
  return wrk.format("GET", "/.gateway/auth", {
    ["Host"] = "cps_gateway", ["X-Original-Method"] = "GET", ["X-Original-URI"] = "/patients/" .. id,
    ["X-Forwarded-Host"] = "portal.test", ["X-Forwarded-For"] = "192.0.2.7",
    ["X-Gateway-Session"] = "{session}", ["X-Request-Id"] = id .. "00000000"})
end
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=DIR")
    args = parser.parse_args()
    sources: dict[str, Path | None] = {"this checkout": None}
    sources.update({name: Path(source) for name, source in (one.split("=", 1) for one in args.compare)})
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sources}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        redis = stack.enter_context(redis_server())
        assert redis.process is not None
        gateways = {
            name: start_gateway(stack, directory / f"gateway-{index}", redis.url, source)
            for index, (name, source) in enumerate(sources.items())
        }
        identity = Identity("810001234567", LoginMethod.CARD, time.time(), professions=("10",))
        session = RedisSessionStore(redis.url, absolute_timeout=3600).create(identity, time.time())
        for run in range(args.runs + 1):  # the first run warms up
            for name, (port, group) in gateways.items():
                script = directory / f"{secrets.token_hex(4)}.lua"
                script.write_text(
                    SUB_REQUESTS.replace("{session}", session.id).replace(
                        "{run}", f"{secrets.randbits(24):08d}"
                    )
                )
                groups = (group, redis.process.pid)
                before = cpu_seconds(groups)
                load = wrk(
                    f"http://127.0.0.1:{port}/",
                    seconds=args.seconds,
                    connections=args.connections,
                    script=script,
                )
                used = cpu_seconds(groups) - before
                if run:
                    results[name].append((load.requests_per_second, used * 1000 / load.requests))
            print(f"run {run}/{args.runs} done", file=sys.stderr)
    print(f"\ndecisions for new records, wrk -c{args.connections}, medians of {args.runs} interleaved runs")
    print(f"{'gateway':<24}{'decisions/s':>12}{'CPU ms per decision (gateway + Redis)':>40}")
    for name, runs in results.items():
        rate = statistics.median(one[0] for one in runs)
        cpu = statistics.median(one[1] for one in runs)
        each = " ".join(f"{one[1]:.3f}" for one in runs)
        print(f"{name:<24}{rate:>12.0f}{cpu:>40.3f}   runs: {each}")
    return 0


def start_gateway(
    stack: contextlib.ExitStack, directory: Path, redis_url: str, source: Path | None
) -> tuple[int, int]:
    """A gateway trusting loopback as its nginx, its access stream configured: (port, process group)."""
    port = free_port()
    directory.mkdir(parents=True)
    access_log = directory / "access.log"
    access_log.touch()
    config = gateway_config(
        directory,
        "http://127.0.0.1:9",  # never asked: decisions only
        redis_url,
        policies=POLICIES,
        listen=f"127.0.0.1:{port}",
        extra={
            "server": {"workers": 1, "threads": 16},
            "forward_auth": {"trusted_nginx": ["127.0.0.1/32"], "access_log": str(access_log)},
            "audit": {"file": str(directory / "audit.log")},
        },
    )
    argv = [PYTHON, "-m", "gateway.cli", "serve", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(source)} if source is not None else None
    process = stack.enter_context(running(argv, port, env=env, cwd=source, log=directory / "gateway.log"))
    return port, process.pid


if __name__ == "__main__":
    sys.exit(main())
