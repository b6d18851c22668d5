"""Gateways as real server processes (`gateway serve`), one or several sharing the same settings."""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.config import TEST_POLICIES, write_config
from tests.support.processes import PYTHON, free_port, running
from tests.support.redis import redis_server


def serve_argv(config: Path) -> list[str]:
    return [PYTHON, "-m", "gateway.cli", "serve", "--config", str(config)]


@contextlib.contextmanager
def running_gateways(
    directory: Path,
    count: int,
    *,
    upstream_url: str,
    assertion_key: Path,
    extra: dict[str, Any],
    policies: str = TEST_POLICIES,
) -> Iterator[list[str]]:
    """``count`` gateway processes on free ports, each with its own settings file in ``directory/gw<n>``."""
    urls = []
    with contextlib.ExitStack() as stack:
        for index in range(count):
            port = free_port()
            config = write_config(
                directory / f"gw{index}",
                upstream_url=upstream_url,
                assertion_key=assertion_key,
                listen=f"127.0.0.1:{port}",
                extra=extra,
                policies=policies,
            )
            stack.enter_context(running(serve_argv(config), port, log=directory / f"gw{index}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls


def sharing_store(
    directory: Path,
    store_url: str,
    *,
    upstream_url: str,
    assertion_key: Path,
    workers: int,
    policies: str = TEST_POLICIES,
) -> contextlib.AbstractContextManager[list[str]]:
    """Two gateway processes of ``workers`` workers sharing the store at ``store_url``, each reading it on
    every request (no per-process session cache)."""
    extra = {
        "server": {"workers": workers, "threads": 8},
        "sessions": {"store": store_url, "local_cache_seconds": 0},
    }
    return running_gateways(
        directory, 2, upstream_url=upstream_url, assertion_key=assertion_key, extra=extra, policies=policies
    )


@contextlib.contextmanager
def serving(
    directory: Path, upstream_url: str, assertion_key: Path, **server: Any
) -> Iterator[tuple[int, int]]:
    """A `gateway serve` process with these ``server`` settings (and Redis sessions when several workers):
    (port, master pid)."""
    port = free_port()
    extra: dict[str, Any] = {"server": server}
    with contextlib.ExitStack() as stack:
        if server.get("workers", 1) > 1:
            extra["sessions"] = {"store": stack.enter_context(redis_server()).url}
        config = write_config(
            directory, upstream_url=upstream_url, assertion_key=assertion_key,
            listen=f"127.0.0.1:{port}", extra=extra,
        )  # fmt: skip
        process = stack.enter_context(running(serve_argv(config), port, log=directory / "gateway.log"))
        yield port, process.pid


def status_of_get(port: int, path: str = "/hello", timeout: float = 5) -> int:
    """GET on a new connection to the gateway on ``port``: the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()
