"""A real redis-server for tests: free loopback port, no persistence, stopped by PID; can be killed and
restarted on the same port (store-unavailable and recovery tests)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.processes import free_port, stop, wait_for_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, *, args: Sequence[str] = ()) -> None:
        """``args``: more redis-server options (e.g. ``--replicaof 127.0.0.1 6379``)."""
        self.directory = directory
        self.port = port or free_port()
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def kill(self) -> None:
        """kill -9: no shutdown, no last words to replicas or clients."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        """Stop, then start again on the same port (data is lost: no persistence)."""
        self.stop()
        self.start()

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            client.flushall()
        finally:
            client.close()


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="gw-redis-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def new_session(url: str, idnat: str, professions: tuple[str, ...] = ("10",)) -> str:
    """A session made straight in the store, as an e-CPS login would leave it (e.g. a stolen one); its id."""
    import time

    from gateway.identity import Identity, LoginMethod
    from gateway.sessions import RedisSessionStore

    identity = Identity(idnat, LoginMethod.ECPS, time.time(), professions=professions, auth_mode="MOBILE")
    return RedisSessionStore(url).create(identity, time.time()).id
