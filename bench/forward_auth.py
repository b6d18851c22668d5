"""Benchmark: nginx forward-auth with the gateway vs nginx as a plain reverse proxy, same portal, same wrk.

Run on demand (bounded: about 2 x 3 x --seconds of load plus start-up):
    .venv/bin/python bench/forward_auth.py [--seconds 5] [--connections 32]

Both setups are measured 3 times, interleaved, and the medians printed with the ratio to the plain proxy.
The route is authenticated, without quota (``/patients/<id>``, GET): after the first request of a
session nginx answers from its few-second decision cache, which is what the target (>= 50% of plain
nginx throughput) relies on. A second line measures the same route with the cache disabled (every request
asks the gateway) to show what the cache buys. A last table gives p50 at one connection, added over the
portal reached directly (the latency budget of the issue).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from common import Load, gateway_config
from common import median_load as median
from common import wrk as common_wrk

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.identity import Identity, LoginMethod  # noqa: E402
from gateway.sessions import RedisSessionStore  # noqa: E402
from tests.support.gateways import serve_argv  # noqa: E402
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, running_nginx  # noqa: E402
from tests.support.processes import free_port, running  # noqa: E402
from tests.support.redis import redis_server  # noqa: E402
from tests.support.upstream import gunicorn_argv  # noqa: E402

ROUTE = "/patients/180017512345678"
COOKIE = "__Host-gateway-session"
PLAIN_PROXY = """\
upstream cps_portal { server __PORTAL__; keepalive 32; }
server {
    listen __LISTEN__;
    location / {
        proxy_pass http://cps_portal;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
    }
}
"""


def wrk(url: str, *, seconds: int, connections: int, headers: dict[str, str]) -> Load:
    threads = min(2, connections)
    return common_wrk(url, seconds=seconds, connections=connections, threads=threads, headers=headers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateway-workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-forward-auth-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        upstream_port, gateway_port = free_port(), free_port()
        stack.enter_context(running(gunicorn_argv(upstream_port, workers=2), upstream_port))
        portal = f"127.0.0.1:{upstream_port}"
        redis = stack.enter_context(redis_server())
        config = gateway_config(
            directory,
            f"http://{portal}",
            redis.url,
            listen=f"127.0.0.1:{gateway_port}",
            extra={
                "server": {"workers": args.gateway_workers, "threads": 16},
                "forward_auth": {"trusted_nginx": ["127.0.0.1/32"]},
                "audit": {"file": str(directory / "audit.log")},
            },
        )
        serve = serve_argv(config)
        stack.enter_context(running(serve, gateway_port, log=directory / "gateway.log"))

        plain_template = directory / "plain-proxy.conf"
        plain_template.write_text(PLAIN_PROXY)
        uncached_template = directory / "forward-auth-uncached.conf"
        uncached_template.write_text(
            FORWARD_AUTH_TEMPLATE.read_text().replace("proxy_cache cps_gateway_auth;", "proxy_cache off;")
        )
        values = {"PORTAL": portal, "GATEWAY": f"127.0.0.1:{gateway_port}"}
        plain = stack.enter_context(running_nginx(directory / "plain", plain_template, values))
        cached = stack.enter_context(running_nginx(directory / "fa", FORWARD_AUTH_TEMPLATE, values))
        uncached = stack.enter_context(running_nginx(directory / "fa-nocache", uncached_template, values))

        identity = Identity(
            "810001234567", LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD"
        )
        session = RedisSessionStore(redis.url, absolute_timeout=3600).create(identity, time.time())
        headers = {"Cookie": f"{COOKIE}={session.id}"}
        targets = {
            "nginx plain proxy": plain.base_url + ROUTE,
            "nginx forward-auth (decision cache)": cached.base_url + ROUTE,
            "nginx forward-auth (no cache)": uncached.base_url + ROUTE,
        }
        direct = f"http://{portal}{ROUTE}"
        runs: dict[str, list[Load]] = {name: [] for name in targets}
        one: dict[str, list[Load]] = {name: [] for name in ["portal, direct", *targets]}
        for url in targets.values():  # warm-up: connections, workers, caches
            wrk(url, seconds=1, connections=args.connections, headers=headers)
        for _ in range(args.rounds):
            for name, url in targets.items():
                runs[name].append(
                    wrk(url, seconds=args.seconds, connections=args.connections, headers=headers)
                )
            for name, url in [("portal, direct", direct), *targets.items()]:
                one[name].append(wrk(url, seconds=args.seconds, connections=1, headers=headers))

    results = {name: median(loads) for name, loads in runs.items()}
    baseline = results["nginx plain proxy"]
    print(f"\nGET {ROUTE} (authenticated, no quota), wrk -t2 -c{args.connections} -d{args.seconds}s,")
    print(f"median of {args.rounds} interleaved runs; gateway: {args.gateway_workers} gunicorn workers")
    print(f"{'setup':<40}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x plain':>9}")
    for name, load in results.items():
        ratio = load.requests_per_second / baseline.requests_per_second
        print(
            f"{name:<40}{load.requests_per_second:>10.0f}{load.p50_ms:>9.2f}{load.p99_ms:>9.2f}{ratio:>9.2f}"
        )
    latency = {name: median(loads) for name, loads in one.items()}
    floor = latency["portal, direct"].p50_ms
    print(f"\none connection (wrk -t1 -c1), median of {args.rounds} interleaved runs")
    print(f"{'setup':<40}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}")
    for name, load in latency.items():
        print(f"{name:<40}{load.p50_ms:>9.2f}{load.p99_ms:>9.2f}{load.p50_ms - floor:>+11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
