"""A portal process behind a gateway process, sessions in a real Redis the test writes to."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.config import TEST_POLICIES, write_config
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running
from tests.support.redis import RedisServer
from tests.support.upstream import gunicorn_argv


@dataclass(frozen=True)
class PortalStack:
    gateway: str
    portal: str
    redis_url: str


@contextlib.contextmanager
def portal_behind_gateway(
    directory: Path,
    assertion_key: Path,
    portal_app: Callable[[str], str],
    *,
    policies: str = TEST_POLICIES,
    extra: dict[str, Any] | None = None,
    portal_env: Callable[[str], dict[str, str]] = lambda gateway: {},
) -> Iterator[PortalStack]:
    """The gateway (``policies``, ``extra`` settings) in front of gunicorn serving ``portal_app(gateway URL)``
    with ``portal_env(gateway URL)`` added to its environment."""
    (directory / "redis").mkdir(parents=True, exist_ok=True)
    redis = RedisServer(directory / "redis")
    redis.start()
    gateway_port, portal_port = free_port(), free_port()
    gateway, portal = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{portal_port}"
    config = write_config(
        directory / "gateway",
        upstream_url=portal,
        assertion_key=assertion_key,
        policies=policies,
        listen=f"127.0.0.1:{gateway_port}",
        # The portal's first protected page fetches the gateway's keys while the gateway waits for it: under a
        # loaded machine that takes longer than write_config's short test read timeout.
        extra={
            "upstream": {"url": portal, "read_timeout": "20s"},
            "sessions": {"store": redis.url, "local_cache_seconds": 0},
            **(extra or {}),
        },
    )
    try:
        with (
            running(serve_argv(config), gateway_port, log=directory / "gateway.log"),
            running(
                gunicorn_argv(portal_port, app=portal_app(gateway)),
                portal_port,
                env={**os.environ, **portal_env(gateway)},
                log=directory / "portal.log",
            ),
        ):
            yield PortalStack(gateway, portal, redis.url)
    finally:
        redis.stop()
