"""The audit trail of a served gateway (gunicorn master + workers).

Outages with real faults: a full disk (a small tmpfs filled up) and an unwritable audit file (chattr +i).
Nothing stops the master or a worker's boot; requests that must be audited get 503 audit_unavailable, never
500; /.gateway/readyz says not ready; the gateway resumes by itself; a torn line gets a recovery record and
`gateway audit verify` checks on past it. Then the keyed chain and the head the master exports."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.audit import read_head, verify_audit_file
from tests.support.audit import audit_records
from tests.support.config import write_config
from tests.support.faults import fill_up, immutable, small_tmpfs
from tests.support.gateways import serve_argv
from tests.support.metrics import metric_value
from tests.support.processes import PYTHON, children, free_port, running, wait_until
from tests.support.redis import RedisServer, new_session, redis_server

COOKIE = "__Host-gateway-session"
RECORD = "/patients/180017512345678"


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    audit: Path
    session: str

    @property
    def master(self) -> int:
        return self.process.pid

    def get(self, path: str = RECORD, *, session: bool = True) -> requests.Response:
        cookies = {COOKIE: self.session} if session else {}
        return requests.get(self.url + path, cookies=cookies, timeout=10, allow_redirects=False)

    def ready(self) -> bool:
        return self.get("/.gateway/readyz", session=False).status_code == 200

    def workers_replaced(self, old: set[int], count: int) -> bool:
        current = children(self.master)
        return len(current) == count and not current & old


@contextlib.contextmanager
def served(
    directory: Path,
    redis: RedisServer,
    audit_file: Path,
    upstream_url: str,
    assertion_key: Path,
    *,
    audit: dict[str, Any] | None = None,
    metrics_port: int | None = None,
) -> Iterator[Served]:
    port = free_port()
    extra_metrics = {"metrics": {"listen": f"127.0.0.1:{metrics_port}"}} if metrics_port else {}
    config = write_config(
        directory,
        upstream_url=upstream_url,
        assertion_key=assertion_key,
        listen=f"127.0.0.1:{port}",
        extra={
            "server": {"workers": 2, "threads": 4},
            "sessions": {"store": redis.url, "local_cache_seconds": 0},
            "audit": {"file": str(audit_file), **(audit or {})},
            **extra_metrics,
        },
    )
    log = directory / "gateway.log"
    with running(serve_argv(config), port, log=log) as process:
        yield Served(
            f"http://127.0.0.1:{port}", process, log, audit_file, new_session(redis.url, "810000000777")
        )


def audited_requests_until_refused(gateway: Served, limit: int = 200) -> list[int]:
    """Statuses of authenticated requests until the first refusal (the audit file's last page filling up)."""
    statuses: list[int] = []
    while len(statuses) < limit:
        statuses.append(gateway.get().status_code)
        if statuses[-1] != 200:
            break
    return statuses


def tear_the_audit_file(gateway: Served, mount: Path) -> Path:
    """Fill the disk until an audit write is cut short (a torn line); returns the filler to delete.

    tmpfs allocates pages: after the filler, records still fit in the audit file's last page, then one is
    cut where the page ends. If a record ends exactly there (no torn line), free a page and go again."""
    for _ in range(5):
        filler = fill_up(mount)
        statuses = audited_requests_until_refused(gateway)
        assert statuses[-1] == 503 and set(statuses) <= {200, 503}, statuses
        if not gateway.audit.read_bytes().endswith(b"\n"):
            return filler
        filler.unlink()
        wait_until(lambda: gateway.get().status_code == 200, what="service after freeing the disk")
    raise AssertionError("no audit write was cut short")


@pytest.mark.timeout(120)
def test_a_full_disk_neither_stops_the_master_on_reload_nor_a_new_worker_and_service_resumes_by_itself(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with small_tmpfs("256k") as mount, redis_server() as redis:
        with served(tmp_path, redis, mount / "audit.log", upstream_url, assertion_key) as gateway:
            assert gateway.get().status_code == 200
            filler = tear_the_audit_file(gateway, mount)

            refused = gateway.get()
            assert refused.status_code == 503
            assert refused.headers["X-Gateway-Reason"] == "audit_unavailable"
            assert gateway.get("/hello", session=False).status_code == 200  # nothing to audit: still served
            readiness = gateway.get("/.gateway/readyz", session=False)
            assert readiness.status_code == 503
            # From the worker whose write failed, or from one that has not written since the disk filled.
            assert re.search(r"ENOSPC|file system is full", readiness.json()["checks"]["audit"]["detail"])

            # A reload while the disk is full (its audit record cannot be written): the master goes on.
            workers = children(gateway.master)
            os.kill(gateway.master, signal.SIGHUP)
            wait_until(lambda: gateway.workers_replaced(workers, 2), what="workers replaced after SIGHUP")
            # A worker killed: its replacement boots although the audit file cannot be written.
            victim = min(children(gateway.master))
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: gateway.workers_replaced({victim}, 2), what="killed worker replaced")
            assert gateway.process.poll() is None
            assert gateway.get("/hello", session=False).status_code == 200
            # Enough refused requests that each worker alive now (the one that lost records before may have
            # been the one killed) loses some: each says so when it resumes.
            assert {gateway.get().status_code for _ in range(20)} == {503}

            filler.unlink()  # space again: no restart, no signal
            wait_until(gateway.ready, what="ready again")
            wait_until(lambda: gateway.get().status_code == 200, what="audited requests served again")
            assert gateway.get().status_code == 200
        log = gateway.log.read_text()
        assert "Traceback" not in log
        assert "could not be audited" in log  # the reload said what it could not record
        result = verify_audit_file(gateway.audit)
        assert result.ok, result
        assert len(result.recoveries) == 1
        resumed = audit_records(gateway.audit, "audit_resumed", skip_torn=True)
        assert resumed and all(r["cause"].startswith("OSError ENOSPC") for r in resumed)
        assert any(r["records_lost"] >= 1 for r in resumed)


@pytest.mark.timeout(120)
def test_a_gateway_killed_with_a_torn_audit_line_closes_it_when_it_starts_again(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    with small_tmpfs("256k") as mount, redis_server() as redis:
        audit = mount / "audit.log"
        with served(tmp_path / "first", redis, audit, upstream_url, assertion_key) as gateway:
            assert gateway.get().status_code == 200
            filler = tear_the_audit_file(gateway, mount)
            os.killpg(gateway.master, signal.SIGKILL)  # master and workers, mid-outage
            gateway.process.wait(10)
        torn = audit.read_bytes()
        last_seq = max(r["seq"] for r in audit_records(audit, skip_torn=True))
        filler.unlink()
        with served(tmp_path / "second", redis, audit, upstream_url, assertion_key) as gateway:
            assert gateway.get().status_code == 200
        recovery = audit_records(audit, "audit_recovery", skip_torn=True)
        assert len(recovery) == 1
        assert recovery[0]["seq"] == last_seq + 1  # sequences continue across the restart
        assert recovery[0]["torn_offset"] + recovery[0]["torn_length"] == len(torn)
        verified = subprocess.run(
            [PYTHON, "-m", "gateway.cli", "audit", "verify", str(audit)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert verified.returncode == 0, verified.stdout
        assert "recovery:" in verified.stdout and "torn byte(s)" in verified.stdout
        assert "OK:" in verified.stdout


@pytest.mark.timeout(120)
def test_an_unwritable_audit_file_does_not_stop_new_workers_and_service_resumes_by_itself(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    audit = tmp_path / "audit.log"
    with redis_server() as redis, served(tmp_path, redis, audit, upstream_url, assertion_key) as gateway:
        assert gateway.get().status_code == 200
        with immutable(audit):
            # Running workers keep their open descriptor; new ones cannot open the file at all.
            workers = children(gateway.master)
            for worker in workers:
                os.kill(worker, signal.SIGKILL)
            wait_until(lambda: gateway.workers_replaced(workers, 2), what="killed workers replaced")
            assert gateway.process.poll() is None
            refused = gateway.get()
            assert (refused.status_code, refused.headers["X-Gateway-Reason"]) == (503, "audit_unavailable")
            readiness = gateway.get("/.gateway/readyz", session=False).json()
            assert readiness["status"] == "not_ready" and "EPERM" in readiness["checks"]["audit"]["detail"]
            assert gateway.get("/hello", session=False).status_code == 200
        wait_until(gateway.ready, what="ready again")
        wait_until(lambda: gateway.get().status_code == 200, what="audited requests served again")
    assert "Traceback" not in gateway.log.read_text()
    assert verify_audit_file(audit).ok
    assert any("EPERM" in r["cause"] for r in audit_records(audit, "audit_resumed"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.timeout(120)
def test_a_keyed_chain_and_its_head_exported_by_the_master_catch_a_cut_tail(
    tmp_path: Path, upstream_url: str, assertion_key: Path
) -> None:
    audit, key = tmp_path / "audit.log", tmp_path / "audit.key"
    key.write_text(secrets.token_hex(32) + "\n")
    metrics_port = free_port()
    settings = {"key_file": str(key), "head_interval": "200ms"}
    with (
        redis_server() as redis,
        served(
            tmp_path, redis, audit, upstream_url, assertion_key, audit=settings, metrics_port=metrics_port
        ) as gateway,
    ):
        for _ in range(5):
            assert gateway.get().status_code == 200
        written = read_head(audit)

        def exported() -> str:
            return requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text

        wait_until(
            lambda: metric_value(exported(), "gateway_audit_head_sequence", file=str(audit)) == written.seq,
            what="the head exported as a metric",
        )
        assert f'gateway_audit_head_info{{file="{audit}",hash="{written.hash}"}} 1.0' in exported()
        wait_until(
            lambda: f"seq={written.seq} hash={written.hash}" in gateway.log.read_text(), what="log line"
        )
        assert gateway.get().status_code == 200  # the log goes on after the export
    assert re.search(
        rf"audit head: file={re.escape(str(audit))} seq=\d+ hash=[0-9a-f]{{64}}", gateway.log.read_text()
    )

    assert cli("audit", "verify", str(audit)).stdout.split(": ")[1] == "key_required"
    anchored = cli("audit", "verify", str(audit), "--key", str(key), "--head", str(written))
    assert anchored.returncode == 0 and "keyed (key id" in anchored.stdout, anchored.stdout
    lines = audit.read_bytes().splitlines(keepends=True)
    audit.write_bytes(b"".join(lines[: written.seq - 1]))  # the tail cut, the anchored record with it
    assert (
        cli("audit", "verify", str(audit), "--key", str(key)).returncode == 0
    )  # looks whole without the head
    cut = cli("audit", "verify", str(audit), "--key", str(key), "--head", str(written))
    assert cut.returncode == 1 and "head_missing" in cut.stdout
