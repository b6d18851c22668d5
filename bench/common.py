"""Shared benchmark plumbing: wrk runs, medians, nginx and server processes on loopback."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.proxy.assertion import generate_key_file  # noqa: E402
from tests.support.config import write_config  # noqa: E402

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class Load:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    #: Requests completed in the run (wrk's total).
    requests: int = 0
    #: CPU milliseconds the measured processes used per request (see :func:`measured`), when measured.
    cpu_ms_per_request: float | None = None


def wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    threads: int = 1,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
) -> Load:
    """One wrk run; ``script``: a wrk Lua script (e.g. a new request target each time)."""
    argv = [
        "wrk",
        "--latency",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        "5s",
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        argv += ["-s", str(script)]
    output = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in output or _socket_errors(output) * 10_000 > total:
        raise RuntimeError(f"{url} answered errors under load:\n{output}")
    return Load(rps, _percentile(output, "50%"), _percentile(output, "99%"), total)


def _socket_errors(output: str) -> int:
    """wrk's count of connect, read, write and timeout errors. A server closing a kept-alive connection while
    wrk stops (Apache's event MPM does now and then) costs a read error or two in a run: tolerated below one
    in 10,000 requests, a failing target is not."""
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return sum(int(n) for n in found.groups()) if found else 0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(groups: Iterable[int]) -> float:
    """User + system CPU seconds used so far by every live process of these process groups (from /proc)."""
    wanted = set(groups)
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) in wanted:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLOCK_TICKS


def measured(run: Callable[[], Load], groups: Iterable[int]) -> Load:
    """``run`` (a wrk run), with the CPU that the processes of ``groups`` used meanwhile."""
    groups = list(groups)
    before = cpu_seconds(groups)
    load = run()
    used = cpu_seconds(groups) - before
    return replace(load, cpu_ms_per_request=used * 1000 / load.requests if load.requests else None)


def _percentile(output: str, label: str) -> float:
    match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {label} latency in wrk output:\n{output}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def median_load(loads: list[Load]) -> Load:
    cpu = [load.cpu_ms_per_request for load in loads if load.cpu_ms_per_request is not None]
    return Load(
        statistics.median(load.requests_per_second for load in loads),
        statistics.median(load.p50_ms for load in loads),
        statistics.median(load.p99_ms for load in loads),
        int(statistics.median(load.requests for load in loads)),
        statistics.median(cpu) if cpu else None,
    )


def spread(loads: list[Load]) -> float:
    """Round-to-round spread of the throughput: the fastest run over the slowest."""
    rates = [load.requests_per_second for load in loads]
    return max(rates) / min(rates)


NGINX_PROXY_CONF = """\
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream portal {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://portal;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def nginx_argv(directory: Path, port: int, upstream_port: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_PROXY_CONF.format(dir=directory, port=port, upstream_port=upstream_port))
    return ["nginx", "-p", str(directory), "-c", str(conf), "-g", "daemon off;"]


def gateway_config(directory: Path, upstream_url: str, redis_url: str, **options: Any) -> Path:
    """Settings for a benchmarked gateway in ``directory/gateway``: a fresh assertion key, Redis sessions;
    ``options`` as tests.support.config.write_config takes them."""
    key = directory / "assertion.pem"
    generate_key_file(key)
    extra = options.pop("extra", {})
    extra.setdefault("sessions", {}).setdefault("store", redis_url)
    return write_config(
        directory / "gateway", upstream_url=upstream_url, assertion_key=key, extra=extra, **options
    )


def print_table(title: str, rows: list[tuple[str, Load]], baselines: dict[str, Load]) -> None:
    print(f"\n{title}")
    header = f"{'target':<38}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
    for name in baselines:
        header += f"{'x ' + name:>14}"
    print(header)
    for name, load in rows:
        line = f"{name:<38}{load.requests_per_second:>10.0f}{load.p50_ms:>9.2f}{load.p99_ms:>9.2f}"
        for baseline in baselines.values():
            line += f"{load.requests_per_second / baseline.requests_per_second:>14.2f}"
        print(line)
