"""Forward-auth (nginx + the gateway's decisions) against nginx and Apache + mod_auth_openidc, one run.

    .venv/bin/python bench/forward_auth.py [--seconds 4] [--runs 5] [--connections 32]
                                           [--compare main=/path/to/another/checkout]

Issue 14, goals 1 and 3. Over a FAST upstream (nginx serving a static 1 KB page, bench/baselines.py), each
run measures in turn (interleaved): nginx as a plain reverse proxy, Apache + mod_auth_openidc on an
authenticated route (session obtained through the Pro Santé Connect stand-in), and the shipped forward-auth
template (deploy/nginx/forward-auth.conf, verbatim) in front of the gateway (2 workers x 16 threads, Redis,
audit file, nginx's access stream read into the audit trail) on a route with a quota:

- repeated reads: every request reads the same, already granted record: nginx serves the decision from its
  cache, the gateway only records the access from the stream (target: >= 0.9 x nginx proxy);
- new resources: every request reads a record never read before (wrk script): each asks the gateway, which
  checks the session and the quota and signs an assertion (target: >= 1 x mod_auth_openidc).

Both forward-auth targets spread their requests over 1,000 sessions of one professional (SESSIONS): the
template limits each session to 50 requests a second, so one session would measure mostly 429s.

Printed: medians of the runs, ratios to nginx and to mod_auth_openidc of the same run, the CPU per request
of each target's own processes from /proc (forward-auth: nginx, the gateway and its Redis), the gateway's
CPU per decision (the gateway and Redis only, new resources) and the round-to-round spread. ``--compare``
adds both forward-auth targets for a gateway run from another source tree (e.g. main, for an A/B in one run).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baselines import apache_oidc, nginx_proxy, static_site
from common import Load, cpu_seconds, gateway_config, median_load, spread, wrk

from gateway.identity import Identity, LoginMethod
from gateway.sessions import RedisSessionStore
from tests.support.nginx import FORWARD_AUTH_TEMPLATE, running_nginx
from tests.support.processes import PYTHON, free_port, running
from tests.support.redis import redis_server

ROUTE = "/patients/180017512345678"
#: Limits no benchmark reaches: the guard's full work (both sorted sets, the breach marker) on every decision.
POLICIES = """\
rules:
  - name: records
    match: { path: /patients/*, methods: [GET] }
    action: authenticate
    login: { professions: [10] }
    quota: { window: 1h, max_requests: 100000000, max_distinct: 100000000, resource: { path_segment: 2 } }
"""
#: Every request of every wrk thread reads a record never read before in this benchmark ({run}: unique per run).
NEW_RESOURCES = """\
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  counter = 0
  prefix = "/patients/" .. "{run}" .. tid .. "x"
end
function request()
  counter = counter + 1
  return wrk.format("GET", prefix .. counter, { Cookie = next_cookie() })
end
"""
#: Every request of every wrk thread reads the same record (nginx's decision cache, once per session).
REPEATED_READS = """\
function request()
  return wrk.format("GET", "%s", { Cookie = next_cookie() })
end
"""
#: Sessions the load is spread over: the template allows one session 50 requests a second (its limit_req), so
#: a benchmark of many requests a second is many professionals, each under their limit (1,000 x 50/s).
SESSIONS = 1000
WORKERS, THREADS = 2, 16
NGINX, APACHE = "nginx reverse proxy", "Apache + mod_auth_openidc, auth."
REPEATED, NEW = "forward-auth, quota route, repeated", "forward-auth, quota route, new res."


@dataclass(frozen=True)
class Target:
    url: str
    #: Process groups whose CPU is this target's (nginx, the gateway, its Redis).
    groups: tuple[int, ...]
    headers: dict[str, str]
    script: Path | None = None
    #: The gateway's own process groups (and Redis): the CPU of its decisions.
    decision_groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Measured:
    load: Load
    cpu_ms_per_request: float
    decision_cpu_ms: float | None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4, help="duration of one wrk run")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs (the median is printed)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=DIR",
        help="also measure new-resource decisions by a gateway from this source tree",
    )  # fmt: skip
    args = parser.parse_args()
    others = dict(one.split("=", 1) for one in args.compare)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = start_everything(stack, Path(tmp), others)
        results: dict[str, list[Measured]] = {name: [] for name in targets}
        for target in targets.values():  # warm-up: connections, caches, the first decisions
            measure(target, 1, args.connections)
        for run in range(args.runs):
            for name, target in targets.items():
                results[name].append(measure(target, args.seconds, args.connections))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    report(results, args.connections)
    return 0


def measure(target: Target, seconds: int, connections: int) -> Measured:
    script = None
    if target.script is not None:
        script = target.script.with_suffix(f".{secrets.token_hex(6)}.lua")
        script.write_text(target.script.read_text().replace("{run}", secrets.token_hex(6)))
    run: Callable[[], Load] = lambda: wrk(  # noqa: E731
        target.url,
        seconds=seconds,
        connections=connections,
        threads=min(2, connections),
        headers=target.headers,
        script=script,
    )
    groups = set(target.groups) | set(target.decision_groups)
    before = {group: cpu_seconds([group]) for group in groups}
    try:
        load = run()
    except RuntimeError as exc:  # e.g. one connection reset by Apache under load: that run is measured again
        print(f"measured again: {str(exc).splitlines()[0]}", file=sys.stderr)
        before = {group: cpu_seconds([group]) for group in groups}
        load = run()
    used = {group: cpu_seconds([group]) - before[group] for group in groups}
    per_request = 1000 / load.requests if load.requests else float("nan")
    decision = sum(used[group] for group in target.decision_groups) * per_request
    return Measured(
        load,
        sum(used[group] for group in target.groups) * per_request,
        decision if target.decision_groups and target.script is not None else None,
    )


def report(results: dict[str, list[Measured]], connections: int) -> None:
    runs = len(next(iter(results.values())))
    medians = {name: median_load([one.load for one in measured]) for name, measured in results.items()}
    nginx, apache = medians[NGINX].requests_per_second, medians[APACHE].requests_per_second
    print(f"\n{connections} connections (wrk -t2), medians of {runs} interleaved runs")
    print(
        f"{'target':<38}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'x nginx':>9}{'x apache':>10}"
        f"{'CPU ms/req':>12}{'ms/decision':>13}{'spread':>8}"
    )
    for name, median in medians.items():
        cpu = statistics.median(one.cpu_ms_per_request for one in results[name])
        decisions = [one.decision_cpu_ms for one in results[name] if one.decision_cpu_ms is not None]
        decision = f"{statistics.median(decisions):.3f}" if decisions else "-"
        print(
            f"{name:<38}{median.requests_per_second:>8.0f}{median.p50_ms:>8.2f}{median.p99_ms:>8.2f}"
            f"{median.requests_per_second / nginx:>9.2f}{median.requests_per_second / apache:>10.2f}"
            f"{cpu:>12.3f}{decision:>13}{spread([one.load for one in results[name]]):>8.2f}"
        )
    print("\nper run, req/s:")
    for name, measured in results.items():
        print(f"  {name:<36}" + " ".join(f"{one.load.requests_per_second:>7.0f}" for one in measured))
    print("per run, gateway + Redis CPU ms per decision (new resources):")
    for name, measured in results.items():
        if measured[0].decision_cpu_ms is not None:
            print(f"  {name:<36}" + " ".join(f"{one.decision_cpu_ms or 0:>7.3f}" for one in measured))


def start_everything(
    stack: contextlib.ExitStack, directory: Path, others: dict[str, str]
) -> dict[str, Target]:
    upstream_port = static_site(stack, directory / "static")
    proxy_port = nginx_proxy(stack, directory / "nginx", upstream_port)
    apache_port, apache_cookie = apache_oidc(stack, directory / "apache", upstream_port)
    redis = stack.enter_context(redis_server())
    redis_groups = (redis.process.pid,) if redis.process else ()
    identity = Identity("810001234567", LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")
    store = RedisSessionStore(redis.url, absolute_timeout=3600)
    ids = [store.create(identity, time.time()).id for _ in range(SESSIONS)]
    cookies = (
        "local cookies = {" + ",".join(f'"__Host-gateway-session={i}"' for i in ids) + "}\n"
        "local turn = 0\n"
        "function next_cookie()\n  turn = turn + 1\n  return cookies[turn % #cookies + 1]\nend\n"
    )
    script = directory / "new-resources.lua"
    script.write_text(cookies + NEW_RESOURCES)
    repeated = directory / "repeated-reads.lua"
    repeated.write_text(cookies + REPEATED_READS % ROUTE)
    targets = {
        NGINX: Target(
            f"http://127.0.0.1:{proxy_port}{ROUTE}", (_process_group(directory / "nginx" / "nginx.pid"),), {}
        ),
        APACHE: Target(
            f"http://127.0.0.1:{apache_port}{ROUTE}",
            (_process_group(directory / "apache" / "httpd.pid"),),
            {"Cookie": apache_cookie},
        ),
    }
    gateways = {"": None, **{f" ({name})": Path(source) for name, source in others.items()}}
    for suffix, source in gateways.items():
        name = suffix.strip(" ()") or "gateway"
        nginx_pid, gateway_pid, nginx_port = forward_auth_stack(
            stack, directory / name, upstream_port, redis.url, source
        )
        groups = (nginx_pid, gateway_pid, *redis_groups)
        decision_groups = (gateway_pid, *redis_groups)
        url = f"http://127.0.0.1:{nginx_port}"
        targets[REPEATED + suffix] = Target(url + ROUTE, groups, {}, repeated, decision_groups)
        targets[NEW + suffix] = Target(url + "/", groups, {}, script, decision_groups)
    return targets


def forward_auth_stack(
    stack: contextlib.ExitStack, directory: Path, upstream_port: int, redis_url: str, source: Path | None
) -> tuple[int, int, int]:
    """The shipped template in front of a gateway (from ``source`` when given): (nginx's process group,
    the gateway's, nginx's port)."""
    gateway_port = free_port()
    values = {"PORTAL": f"127.0.0.1:{upstream_port}", "GATEWAY": f"127.0.0.1:{gateway_port}"}
    nginx = stack.enter_context(running_nginx(directory / "nginx", FORWARD_AUTH_TEMPLATE, values))
    config = gateway_config(
        directory,
        f"http://127.0.0.1:{upstream_port}",
        redis_url,
        policies=POLICIES,
        listen=f"127.0.0.1:{gateway_port}",
        extra={
            "server": {"workers": WORKERS, "threads": THREADS},
            "forward_auth": {
                "trusted_nginx": ["127.0.0.1/32"],
                "access_log": str(nginx.prefix / "access.log"),
            },
            "audit": {"file": str(directory / "audit.log")},
        },
    )
    argv = [PYTHON, "-m", "gateway.cli", "serve", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(source)} if source is not None else None
    gateway = stack.enter_context(
        running(argv, gateway_port, env=env, cwd=source, log=directory / "gateway.log")
    )
    return _process_group(nginx.prefix / "nginx.pid"), gateway.pid, nginx.port


def _process_group(pid_file: Path) -> int:
    """The process group of a server started by tests.support.processes.running (its own session)."""
    pid = int(pid_file.read_text().split()[0])
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])


if __name__ == "__main__":
    sys.exit(main())
