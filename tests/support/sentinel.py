"""Redis with failover for tests: a master, a replica and three Redis Sentinels (quorum 2), real Debian
``redis-server`` and ``redis-sentinel`` processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.support.processes import free_port, stop, wait_for_port, wait_until
from tests.support.redis import RedisServer

REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
SERVICE = "gateway"
#: How long a master must stay silent before the sentinels call it down (production: a few seconds).
DOWN_AFTER_MS = 1000


class SentinelSet:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master = RedisServer(self._dir("master"))
        self.replica = RedisServer(
            self._dir("replica"), args=["--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def _dir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        """The gateway's store URL, as the limits library spells it."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_until(self._replicating, what="replica in sync")
        for port in self.sentinel_ports:
            config = self._dir(f"sentinel-{port}") / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {config.parent}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            process = subprocess.Popen(
                [REDIS_SENTINEL, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.sentinels.append(process)
            wait_for_port(port, process)
        # A failover needs a quorum that knows the replica: wait until every sentinel sees both others.
        wait_until(self._sentinels_ready, timeout=30, what="sentinels aware of each other and of the replica")

    def stop(self) -> None:
        for process in self.sentinels:
            stop(process)
        self.replica.stop()
        self.master.stop()

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), local_client(port) as sentinel:
                address = sentinel.sentinel_get_master_addr_by_name(SERVICE)
                if address:
                    return int(address[1])
        raise RuntimeError("no sentinel answers")

    def wait_until_replicated(self) -> None:
        """Everything written to the master so far has reached the replica (WAIT)."""
        with local_client(self.master.port, timeout=6) as master:
            assert master.execute_command("WAIT", 1, 5000) == 1

    def kill_master(self) -> float:
        """kill -9 the master; returns when (time.monotonic())."""
        self.master.kill()
        return time.monotonic()

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            try:
                with local_client(port) as sentinel:
                    state = sentinel.sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        return True

    def _replicating(self) -> bool:
        try:
            with local_client(self.replica.port) as replica:
                info = replica.info("replication")
        except redis.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"


def local_client(port: int, timeout: float = 1.0) -> redis.Redis:
    """A plain client to one server or sentinel on 127.0.0.1 (use it in a ``with``)."""
    return redis.Redis(port=port, socket_timeout=timeout, decode_responses=True)


@contextlib.contextmanager
def sentinel_set() -> Iterator[SentinelSet]:
    with tempfile.TemporaryDirectory(prefix="gw-sentinel-") as tmp:
        servers = SentinelSet(Path(tmp))
        try:
            servers.start()
            yield servers
        finally:
            servers.stop()
