"""Capacity model inputs: CPU and Redis commands per request type, measured on real processes (issue 14 goal 6).

    .venv/bin/python bench/capacity.py [--seconds 3] [--runs 3] [--connections 32] [--login-seconds 4]

Over a FAST upstream (nginx serving a static 1 KB page, bench/baselines.py), with one Redis, this measures in
interleaved runs:

- proxy mode (2 workers x 16 threads, Redis sessions, audit file): a public request; an authenticated
  request spread over --sessions sessions (10,000: a session comes back less often than the gateway's 1 s
  per-process session cache keeps it, as real page views do, so each request reads its session in Redis);
- forward-auth (deploy/nginx/forward-auth.conf verbatim, bench/forward_auth.py's stack, quota route): a
  cached read (nginx answers from its decision cache; the gateway records the access from nginx's stream)
  and a new-resource decision, both over 1,000 sessions as bench/forward_auth.py does;
- an e-CPS login end to end through the Pro Santé Connect stand-in (gateway.devtools.psc): the protected
  page's login answer (401), the e-CPS button (302 to PSC), PSC's approval (the stand-in's, not counted), the
  callback (code exchange, userinfo, the session created: 303). Gateway and Redis CPU only.

For each: the CPU of the gateway's processes and of Redis (and of nginx for forward-auth) from /proc per
request, and Redis commands per request (``INFO commandstats`` deltas over the run, INFO itself excluded).
Medians of the runs are printed, then the memory of a session in Redis (``MEMORY USAGE``) and Redis's
``used_memory`` growth per new-resource decision (the quota's sorted sets). A card login is not measured
end to end: the card host's TLS handshake with the card (nginx's and the card's work) is not
measured; the benchmark plays that nginx and measures the gateway's part of the login (login page, binding,
the card's certificate verified, the session handed over to the main host).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from baselines import static_site
from common import cpu_seconds, gateway_config, wrk
from cryptography.hazmat.primitives.serialization import Encoding
from forward_auth import NEW_RESOURCES, REPEATED_READS, ROUTE, forward_auth_stack
from proxy import POLICIES as PROXY_POLICIES

from gateway.devtools.pki import ensure_dev_pki
from gateway.identity import Identity, LoginMethod
from gateway.proxy.assertion import generate_key_file
from gateway.sessions import RedisSessionStore
from tests.support.card_stack import card_host_headers, card_settings
from tests.support.config import write_config
from tests.support.ecps import DOCTOR, IDENTITIES, Browser, gateway_registration, running_ecps_gateway
from tests.support.gateways import serve_argv
from tests.support.pki import software_card
from tests.support.processes import free_port, running
from tests.support.psc import running_psc
from tests.support.redis import redis_server

WORKERS, THREADS = 2, 16
FORWARD_AUTH_SESSIONS = 1000
LOGIN_CLIENTS = 4
#: Logins are the benchmark's business here: no limit in its way (every login comes from 127.0.0.1).
NO_LOGIN_LIMITS = {
    "ban_after": 1000,
    "login_attempts_per_ip": "1000000/minute",
    "login_requests_per_ip": "1000000/minute",
    "login_attempts_per_identity": "1000000/minute",
}
PUBLIC, AUTHENTICATED = "proxy, public request", "proxy, authenticated request"
CACHED, DECISION = "forward-auth, cached read", "forward-auth, new-resource decision"
LOGIN, CARD_LOGIN = "e-CPS login", "card login (gateway's part)"
#: The card host's public origin: requests carrying its Host header and nginx's headers are the card host's.
CARD_ORIGIN = "https://card.example:8443"
CARD_IDNAT = "810002813839"  # tests.support.pki.software_card's


@dataclass(frozen=True)
class Kind:
    """One request type: how to load it, and whose CPU is its cost."""

    run: Callable[[float], int]  # runs for that many seconds, returns the requests (or logins) done
    gateway_groups: tuple[int, ...]  # the gateway's processes and Redis (last)
    nginx_groups: tuple[int, ...] = ()


@dataclass
class Sample:
    gateway_cpu_ms: float  # the gateway's processes and Redis
    nginx_cpu_ms: float
    redis_cpu_ms: float
    redis_commands: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    used_memory: int = 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="duration of one wrk run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (medians are printed)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--sessions", type=int, default=10000, help="sessions of the authenticated proxy load"
    )
    parser.add_argument("--login-seconds", type=float, default=4, help="duration of one run of logins")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        server = stack.enter_context(redis_server())
        assert server.process is not None
        client = redis.Redis.from_url(server.url)
        kinds = start_everything(stack, directory, server.url, server.process.pid, args)
        samples: dict[str, list[Sample]] = {name: [] for name in kinds}
        for kind in kinds.values():  # warm-up: connections, caches, first decisions
            kind.run(1)
        for run in range(args.runs):
            for name, kind in kinds.items():
                seconds = args.login_seconds if name in (LOGIN, CARD_LOGIN) else args.seconds
                samples[name].append(measure(kind, seconds, client))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        per_script = {name: script_commands(kind, server.url) for name, kind in kinds.items()}
        report(samples, per_script, args)
        report_memory(client)
    return 0


def measure(kind: Kind, seconds: float, client: redis.Redis) -> Sample:
    groups = (*kind.gateway_groups, *kind.nginx_groups)
    commands_before, memory_before = _commands(client), int(client.info("memory")["used_memory"])
    before = {group: cpu_seconds([group]) for group in groups}
    requests = kind.run(seconds)
    time.sleep(0.3)  # the access stream's reader records the run's last lines
    used = {group: cpu_seconds([group]) - before[group] for group in groups}
    commands = _commands(client)
    commands.subtract(commands_before)
    per = 1000 / requests if requests else float("nan")
    return Sample(
        sum(used[g] for g in kind.gateway_groups) * per,
        sum(used[g] for g in kind.nginx_groups) * per,
        used[kind.gateway_groups[-1]] * per,
        +commands,
        requests,
        int(client.info("memory")["used_memory"]) - memory_before,
    )


def script_commands(kind: Kind, url: str, seconds: float = 1) -> dict[str, float]:
    """Commands a script runs per script call (EVALSHA), by command, from MONITOR during a short separate
    run (MONITOR slows Redis: not during the CPU measurement): what ``INFO commandstats`` counts beside the
    gateway's own round trips."""
    stop = f"capacity-stop-{time.monotonic_ns()}"
    in_scripts: Counter[str] = Counter()
    calls = [0]
    ready = threading.Event()

    def read() -> None:
        with redis.Redis.from_url(url).monitor() as monitor:
            ready.set()
            while True:
                line = monitor.connection.read_response()
                text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
                if stop in text:
                    return
                if '] "' not in text:
                    continue
                command = text.split('] "', 1)[1].split('"', 1)[0].lower()
                if "lua]" in text:
                    in_scripts[command] += 1
                elif command.startswith("eval"):
                    calls[0] += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready.wait(10)
    time.sleep(0.2)
    kind.run(seconds)
    time.sleep(0.3)
    redis.Redis.from_url(url).echo(stop)
    reader.join(30)
    return {command: count / calls[0] for command, count in in_scripts.items()} if calls[0] else {}


def round_trips(sample: Sample, per_script: dict[str, float]) -> Counter[str]:
    """The commands the gateway sends per request (a MULTI..EXEC or a script is one round trip): the scripts'
    own commands taken out of commandstats."""
    scripts = sum(n for c, n in sample.redis_commands.items() if c.startswith("eval"))
    return Counter(
        {c: (n - per_script.get(c, 0) * scripts) / sample.requests for c, n in sample.redis_commands.items()}
    )


def _commands(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter(
        {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name != "cmdstat_info"
        }
    )


def start_everything(
    stack: contextlib.ExitStack, directory: Path, redis_url: str, redis_pid: int, args: argparse.Namespace
) -> dict[str, Kind]:
    upstream_port = static_site(stack, directory / "static")
    upstream = f"http://127.0.0.1:{upstream_port}"
    gateway_port = free_port()
    config = gateway_config(
        directory / "proxy",
        upstream,
        redis_url,
        policies=PROXY_POLICIES,
        listen=f"127.0.0.1:{gateway_port}",
        extra={
            "server": {"workers": WORKERS, "threads": THREADS},
            "audit": {"file": str(directory / "proxy-audit.log")},
        },
    )
    proxy = stack.enter_context(running(serve_argv(config), gateway_port, log=directory / "proxy.log"))
    nginx_group, fa_gateway_group, nginx_port = forward_auth_stack(
        stack, directory / "forward-auth", upstream_port, redis_url, None
    )
    proxy_reads = _cookie_script(
        directory / "proxy-reads.lua", redis_url, args.sessions, REPEATED_READS % ROUTE
    )
    fa_reads = _cookie_script(
        directory / "fa-reads.lua", redis_url, FORWARD_AUTH_SESSIONS, REPEATED_READS % ROUTE
    )
    fa_new = _cookie_script(directory / "fa-new.lua", redis_url, FORWARD_AUTH_SESSIONS, NEW_RESOURCES)
    gateway_url, nginx_url = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{nginx_port}"

    def load(url: str, script: Path | None = None) -> Callable[[float], int]:
        def run(seconds: float) -> int:
            if script is not None:  # a new run marker: new records stay new from run to run
                fresh = script.with_suffix(f".{time.monotonic_ns()}.lua")
                fresh.write_text(script.read_text().replace("{run}", str(time.monotonic_ns())))
            result = wrk(url, seconds=max(1, round(seconds)), connections=args.connections, threads=2,
                         script=fresh if script is not None else None)  # fmt: skip
            return result.requests

        return run

    proxy_groups = (proxy.pid, redis_pid)
    fa_groups = (fa_gateway_group, redis_pid)
    return {
        PUBLIC: Kind(load(gateway_url + "/hello"), proxy_groups),
        AUTHENTICATED: Kind(load(gateway_url + ROUTE, proxy_reads), proxy_groups),
        CACHED: Kind(load(nginx_url + ROUTE, fa_reads), fa_groups, (nginx_group,)),
        DECISION: Kind(load(nginx_url + "/", fa_new), fa_groups, (nginx_group,)),
        LOGIN: ecps_logins(stack, directory / "ecps", upstream, redis_url, redis_pid),
        CARD_LOGIN: card_logins(stack, directory / "card", upstream, redis_url, redis_pid),
    }


def _cookie_script(path: Path, redis_url: str, sessions: int, body: str) -> Path:
    """A wrk script whose requests take turns over ``sessions`` fresh sessions (``next_cookie()``)."""
    identity = Identity(DOCTOR, LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")
    store = RedisSessionStore(redis_url, absolute_timeout=3600)
    ids = [store.create(identity, time.time()).id for _ in range(sessions)]
    path.write_text(
        "local cookies = {" + ",".join(f'"__Host-gateway-session={i}"' for i in ids) + "}\n"
        "local turn = 0\n"
        "function next_cookie()\n  turn = turn + 1\n  return cookies[turn % #cookies + 1]\nend\n" + body
    )
    return path


def ecps_logins(
    stack: contextlib.ExitStack, directory: Path, upstream: str, redis_url: str, redis_pid: int
) -> Kind:
    """A gateway with e-CPS login (Redis sessions, 2 x 16) and the PSC stand-in; logins by a few clients."""
    directory.mkdir(parents=True)
    port = free_port()
    psc = stack.enter_context(
        running_psc(directory, [gateway_registration(f"http://127.0.0.1:{port}")], identities=IDENTITIES)
    )
    key = directory / "assertion.pem"
    generate_key_file(key)
    world = stack.enter_context(
        running_ecps_gateway(
            directory / "gateway",
            psc,
            port=port,
            upstream_url=upstream,
            assertion_key=key,
            limits=NO_LOGIN_LIMITS,
            policies=PROXY_POLICIES,
            extra={
                "server": {"workers": WORKERS, "threads": THREADS},
                "sessions": {"store": redis_url},
                "audit": {"file": str(directory / "audit.log")},
            },
        )
    )
    gateway_group = _process_group_of_port(directory / "gateway" / "gateway.log", port)

    def log_in() -> None:
        browser = Browser()
        page = browser.get(world.gateway_url + ROUTE)
        start = browser.get(world.gateway_url + "/.gateway/login/ecps", params={"next": ROUTE})
        if page.status_code != 401 or start.status_code != 302:
            raise RuntimeError(f"login did not start: {page.status_code} {start.status_code}")
        callback = psc.approve(start.headers["Location"], DOCTOR)
        done = browser.get(callback)
        if done.status_code != 303 or "__Host-gateway-session" not in browser.cookies:
            raise RuntimeError(f"login failed: {done.status_code} {done.headers.get('X-Gateway-Reason')}")

    return Kind(_logins(log_in), (gateway_group, redis_pid))


def card_logins(
    stack: contextlib.ExitStack, directory: Path, upstream: str, redis_url: str, redis_pid: int
) -> Kind:
    """A gateway with card login (Redis sessions, 2 x 16); the benchmark plays the card host's nginx, which
    has checked the card's key in the TLS handshake and forwards its certificate (that handshake, nginx's and
    the card's, is not measured): the main host's login page and binding, the card host's verification, the
    main host's completion."""
    directory.mkdir(parents=True)
    pki = ensure_dev_pki(directory / "pki")
    pem = software_card(pki, idnat=CARD_IDNAT).public_bytes(Encoding.PEM)
    port = free_port()
    key = directory / "assertion.pem"
    generate_key_file(key)
    config = write_config(
        directory / "gateway",
        upstream_url=upstream,
        assertion_key=key,
        policies=PROXY_POLICIES,
        listen=f"127.0.0.1:{port}",
        extra={
            "server": {"workers": WORKERS, "threads": THREADS, "tls_terminators": ["127.0.0.1/32"]},
            "sessions": {"store": redis_url},
            "card": card_settings(pki, CARD_ORIGIN),
            "limits": NO_LOGIN_LIMITS,
            "audit": {"file": str(directory / "audit.log")},
        },
    )
    gateway = stack.enter_context(running(serve_argv(config), port, log=directory / "gateway.log"))
    origin = f"http://127.0.0.1:{port}"

    def log_in() -> None:
        browser = Browser()
        page = browser.get(origin + ROUTE)
        start = browser.get(origin + "/.gateway/card/start", params={"next": ROUTE})
        if page.status_code != 401 or start.status_code != 303:
            raise RuntimeError(f"card login did not start: {page.status_code} {start.status_code}")
        card_host = start.headers["Location"].removeprefix(CARD_ORIGIN)
        handoff = browser.get(origin + card_host, headers=card_host_headers(pem, CARD_ORIGIN))
        if handoff.status_code != 303:
            raise RuntimeError(
                f"card refused: {handoff.status_code} {handoff.headers.get('X-Gateway-Reason')}"
            )
        path = "/" + handoff.headers["Location"].split("://", 1)[1].split("/", 1)[1]
        done = browser.get(origin + path)
        if done.status_code != 303 or "__Host-gateway-session" not in browser.cookies:
            raise RuntimeError(
                f"card login failed: {done.status_code} {done.headers.get('X-Gateway-Reason')}"
            )

    return Kind(_logins(log_in), (gateway.pid, redis_pid))


def _logins(log_in: Callable[[], None]) -> Callable[[float], int]:
    """Logins by :data:`LOGIN_CLIENTS` clients at once for that many seconds; returns how many were done."""

    def run(seconds: float) -> int:
        deadline, done, errors = time.monotonic() + seconds, [0] * LOGIN_CLIENTS, []

        def client(index: int) -> None:
            try:
                while time.monotonic() < deadline:
                    log_in()
                    done[index] += 1
            except Exception as exc:  # reported below: a benchmark of failing logins measures nothing
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(LOGIN_CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 30)
        if errors:
            raise errors[0]
        return sum(done)

    return run


def _process_group_of_port(log: Path, port: int) -> int:
    """The process group of the gateway listening on ``port`` (started in its own session by ``running``)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            inode = fields[9]
            break
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if fd.readlink().name == f"socket:[{inode}]":
                stat = (fd.parents[1] / "stat").read_text()
                return int(stat.rsplit(")", 1)[1].split()[2])
    raise RuntimeError(f"no process listens on {port} (see {log})")


def report(
    samples: dict[str, list[Sample]], per_script: dict[str, dict[str, float]], args: argparse.Namespace
) -> None:
    print(
        f"\nper request (login: per login), medians of {args.runs} interleaved runs; wrk -t2 -c{args.connections}"
        f" {args.seconds} s, logins: {LOGIN_CLIENTS} clients {args.login_seconds} s. CPU ms: gateway + Redis"
        " (of which Redis), nginx; Redis commands: sent by the gateway, run (scripts' own included)"
    )
    print(
        f"{'request type':<38}{'requests':>9}{'gw+Redis':>10}{'Redis':>8}{'nginx':>8}{'sent':>8}{'commands':>10}"
    )
    rows = {}
    for name, runs in samples.items():
        trips = [round_trips(one, per_script[name]) for one in runs]
        rows[name] = (
            statistics.median(one.gateway_cpu_ms for one in runs),
            statistics.median(one.redis_cpu_ms for one in runs),
            statistics.median(one.nginx_cpu_ms for one in runs),
            statistics.median(sum(one.values()) for one in trips),
            statistics.median(sum(one.redis_commands.values()) / one.requests for one in runs),
        )
        cpu, redis_cpu, nginx, sent, commands = rows[name]
        print(
            f"{name:<38}{statistics.median(one.requests for one in runs):>9.0f}{cpu:>10.3f}{redis_cpu:>8.3f}"
            f"{(f'{nginx:.3f}' if name in (CACHED, DECISION) else '-'):>8}{sent:>8.2f}{commands:>10.2f}"
        )
    print("\nRedis commands the gateway sends per request, by command (medians):")
    for name, runs in samples.items():
        trips = [round_trips(one, per_script[name]) for one in runs]
        names = sorted(set().union(*trips))
        each = {c: statistics.median(one[c] for one in trips) for c in names}
        print(f"  {name:<36}" + ", ".join(f"{c} {n:.3f}" for c, n in each.items() if n >= 0.0005))
    print("\nRedis commands run per request, by command (commandstats, medians):")
    for name, runs in samples.items():
        names = sorted(set().union(*(one.redis_commands for one in runs)))
        each = {c: statistics.median(one.redis_commands[c] / one.requests for one in runs) for c in names}
        print(f"  {name:<36}" + ", ".join(f"{c} {n:.3f}" for c, n in each.items() if n >= 0.0005))
    print("\nper run, gateway+Redis CPU ms per request:")
    for name, runs in samples.items():
        print(f"  {name:<36}" + " ".join(f"{one.gateway_cpu_ms:>7.3f}" for one in runs))
    growth = statistics.median(one.used_memory / one.requests for one in samples[DECISION])
    print(f"Redis used_memory growth per new-resource decision (quota sets, 1 h window): {growth:.0f} bytes")
    share = statistics.median(_evals(one) for one in samples[CACHED]) / statistics.median(
        _evals(one) for one in samples[DECISION]
    )
    print(
        f"\ncached reads: {share:.1%} of them were decisions (each session's first read and one per cache"
        " lifetime); a cached read without them (x - share * decision) / (1 - share):"
    )
    if share > 0.5:
        print("  (too many to take out: longer runs)")
        return
    labels = (
        "gateway+Redis CPU ms",
        "Redis CPU ms",
        "nginx CPU ms",
        "Redis commands sent",
        "Redis commands run",
    )
    for label, cached, decision in zip(labels, rows[CACHED], rows[DECISION], strict=True):
        print(f"  {label:<22}{(cached - share * decision) / (1 - share):.3f}")


def _evals(sample: Sample) -> float:
    return sum(n for c, n in sample.redis_commands.items() if c.startswith("eval")) / sample.requests


def report_memory(client: redis.Redis) -> None:
    sizes: dict[str, list[int]] = {"e-CPS login": [], "card login": [], "made by the benchmark": []}
    for key in client.scan_iter("gw:session:s:*", count=1000):
        value = client.get(key) or b""
        kind = "e-CPS login" if b'"ecps"' in value else "made by the benchmark"
        kind = "card login" if CARD_IDNAT.encode() in value else kind
        sizes[kind].append(client.memory_usage(key) or 0)
    for kind, found in sizes.items():
        if found:
            print(
                f"session key MEMORY USAGE, {kind}: median {statistics.median(found):.0f} bytes ({len(found)} keys)"
            )
    tags = [client.memory_usage(key) or 0 for key in client.scan_iter("gw:session:t:*", count=1000)]
    if tags:
        print(
            f"tag sets (per professional: idnat, PSC sub; per e-CPS login: PSC sid): {len(tags)}, median {statistics.median(tags):.0f} bytes"
        )
    info = client.info("memory")
    print(f"Redis used_memory at the end: {info['used_memory'] / 1e6:.1f} MB, keys: {client.dbsize()}")


if __name__ == "__main__":
    sys.exit(main())
