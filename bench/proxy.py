"""Proxy mode against what users compare it with, in one interleaved run, over a FAST upstream.

    .venv/bin/python bench/proxy.py [--seconds 4] [--runs 5] [--connections 32]

The upstream is nginx serving a static 1 KB page (bench/baselines.py), so that the figures measure the
proxies and not the portal. Targets: that upstream reached directly, nginx as a reverse proxy, Apache +
mod_auth_openidc on an authenticated route (session obtained through the Pro Santé Connect stand-in), the
no-logic WSGI proxy under the gateway's own server (the floor), a naive Flask + requests proxy, and the
gateway (2 workers x 16 threads, Redis sessions, audit file) on a public and on an authenticated route.

Each run measures every target in turn (interleaved), at --connections (wrk -t2) and at one connection;
the medians of the runs are printed with ratios to baselines of the same run, the CPU per request of each
target's own processes (read from /proc; the gateway's include its Redis), and the round-to-round spread
of the throughput (fastest run / slowest run).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baselines import PROTECTED, apache_oidc, nginx_proxy, static_site
from common import REPO, Load, gateway_config, measured, median_load, spread, wrk

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
GATEWAY_WORKER = "gateway.worker.GatewayWorker"
DIRECT, NGINX, APACHE = "static nginx (direct)", "nginx reverse proxy", "Apache + mod_auth_openidc, auth."
PUBLIC, AUTHENTICATED = "gateway, public route", "gateway, authenticated route"


@dataclass(frozen=True)
class Target:
    url: str
    #: Process groups whose CPU is this target's (the proxy's own processes, and its session store).
    groups: tuple[int, ...]
    headers: dict[str, str] | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4, help="duration of one wrk run")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs (the median is printed)")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = start_everything(stack, Path(tmp))
        throughput: dict[str, list[Load]] = {name: [] for name in targets}
        latency: dict[str, list[Load]] = {name: [] for name in targets}
        try:
            for run in range(args.runs):
                for name, target in targets.items():
                    throughput[name].append(load(target, args.seconds, args.connections))
                    latency[name].append(load(target, args.seconds, 1))
                print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        except RuntimeError:
            print((Path(tmp) / "gateway.log").read_text()[-5000:], file=sys.stderr)
            raise
    report(throughput, latency, args.connections)
    return 0


def load(target: Target, seconds: int, connections: int) -> Load:
    threads = min(2, connections)
    run: Callable[[], Load] = lambda: wrk(  # noqa: E731
        target.url, seconds=seconds, connections=connections, threads=threads, headers=target.headers
    )
    return measured(run, target.groups)


def report(throughput: dict[str, list[Load]], latency: dict[str, list[Load]], connections: int) -> None:
    runs = len(next(iter(throughput.values())))
    medians = {name: median_load(loads) for name, loads in throughput.items()}
    nginx, apache = medians[NGINX], medians[APACHE]
    print(f"\nthroughput: {connections} connections (wrk -t2), medians of {runs} interleaved runs")
    print(
        f"{'target':<36}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'x nginx':>9}{'x apache':>10}"
        f"{'CPU ms/req':>12}{'spread':>8}"
    )
    for name, median in medians.items():
        cpu = median.cpu_ms_per_request
        print(
            f"{name:<36}{median.requests_per_second:>8.0f}{median.p50_ms:>8.2f}{median.p99_ms:>8.2f}"
            f"{median.requests_per_second / nginx.requests_per_second:>9.2f}"
            f"{median.requests_per_second / apache.requests_per_second:>10.2f}"
            f"{cpu if cpu is not None else float('nan'):>12.3f}{spread(throughput[name]):>8.2f}"
        )
    single = {name: median_load(loads) for name, loads in latency.items()}
    direct = single[DIRECT].p50_ms
    print(f"\nlatency: 1 connection, medians of {runs} interleaved runs")
    print(f"{'target':<36}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'p50 added':>11}")
    for name, median in single.items():
        print(
            f"{name:<36}{median.requests_per_second:>8.0f}{median.p50_ms:>8.2f}{median.p99_ms:>8.2f}"
            f"{median.p50_ms - direct:>+11.2f}"
        )
    print("\nper run, req/s at", connections, "connections:")
    for name, loads in throughput.items():
        print(f"  {name:<34}" + " ".join(f"{one.requests_per_second:>7.0f}" for one in loads))
    print("per run, p50 ms at 1 connection:")
    for name, loads in latency.items():
        print(f"  {name:<34}" + " ".join(f"{one.p50_ms:>7.2f}" for one in loads))


def start_everything(stack: contextlib.ExitStack, directory: Path) -> dict[str, Target]:
    upstream_port = static_site(stack, directory / "static")
    upstream = f"http://127.0.0.1:{upstream_port}"
    proxy_port = nginx_proxy(stack, directory / "nginx", upstream_port)
    apache_port, apache_cookie = apache_oidc(stack, directory / "apache", upstream_port)
    redis = stack.enter_context(redis_server())
    gateway_port = free_port()
    config = gateway_config(
        directory,
        upstream,
        redis.url,
        policies=POLICIES,
        listen=f"127.0.0.1:{gateway_port}",
        extra={"server": {"workers": WORKERS, "threads": THREADS}},
    )
    gateway = stack.enter_context(running(serve_argv(config), gateway_port, log=directory / "gateway.log"))
    here = str(Path(__file__).parent)
    naive_port, minimal_port = free_port(), free_port()
    naive = gunicorn_argv(naive_port, WORKERS, THREADS, app="naive_proxy:app", chdir=here)
    naive_env = {"NAIVE_UPSTREAM": upstream, "PATH": "/usr/bin:/bin"}
    naive_process = stack.enter_context(running(naive, naive_port, env=naive_env))
    # The floor runs under the very server the gateway uses: the difference is the gateway's own work.
    minimal = gunicorn_argv(
        minimal_port, WORKERS, THREADS, app="minimal_proxy:app", chdir=here, worker_class=GATEWAY_WORKER
    )
    env = {"MINIMAL_UPSTREAM": f"127.0.0.1:{upstream_port}", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    minimal_process = stack.enter_context(running(minimal, minimal_port, env=env))
    identity = Identity("810001234567", LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")
    session = RedisSessionStore(redis.url).create(identity, time.time())
    gateway_groups = (gateway.pid, redis.process.pid) if redis.process else (gateway.pid,)
    nginx_group = _process_group(directory / "nginx" / "nginx.pid")
    return {
        DIRECT: Target(f"{upstream}/hello", (_process_group(directory / "static" / "nginx.pid"),)),
        NGINX: Target(f"http://127.0.0.1:{proxy_port}/hello", (nginx_group,)),
        APACHE: Target(
            f"http://127.0.0.1:{apache_port}{PROTECTED}",
            (_process_group(directory / "apache" / "httpd.pid"),),
            {"Cookie": apache_cookie},
        ),
        "minimal WSGI proxy (floor)": Target(
            f"http://127.0.0.1:{minimal_port}/hello", (minimal_process.pid,)
        ),
        "naive Flask+requests proxy": Target(f"http://127.0.0.1:{naive_port}/hello", (naive_process.pid,)),
        PUBLIC: Target(f"http://127.0.0.1:{gateway_port}/hello", gateway_groups),
        AUTHENTICATED: Target(
            f"http://127.0.0.1:{gateway_port}{PROTECTED}",
            gateway_groups,
            {"Cookie": f"__Host-gateway-session={session.id}"},
        ),
    }


def _process_group(pid_file: Path) -> int:
    """The process group of a server started by tests.support.processes.running (its own session)."""
    pid = int(pid_file.read_text().split()[0])
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])


if __name__ == "__main__":
    sys.exit(main())
