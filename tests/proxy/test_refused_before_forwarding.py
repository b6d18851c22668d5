"""Requests the gateway must refuse before anything reaches the portal: a real gunicorn gateway in front of a
recording portal (tests/support/upstream.py) that proves what it received."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.audit import audit_records
from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running
from tests.support.upstream import gunicorn_argv, recorded


@dataclass(frozen=True)
class Stack:
    port: int
    record: Path
    audit: Path

    def received(self) -> list[dict[str, object]]:
        return recorded(self.record)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, assertion_key: Path) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("refused")
    record = directory / "portal.jsonl"
    portal_port, port = free_port(), free_port()
    portal = gunicorn_argv(portal_port, app="tests.support.upstream:recording_app")
    config = write_config(
        directory / "gateway",
        upstream_url=f"http://127.0.0.1:{portal_port}",
        assertion_key=assertion_key,
        listen=f"127.0.0.1:{port}",
    )
    with (
        running(
            portal, portal_port, env=dict(os.environ, UPSTREAM_RECORD=str(record)), log=directory / "p.log"
        ),
        running(serve_argv(config), port, log=directory / "gateway.log"),
    ):
        yield Stack(port, record, directory / "gateway" / "audit.log")


def raw_get(stack: Stack, target: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5)
    try:
        connection.request("GET", target, headers={"Accept": "text/html"})
        response = connection.getresponse()
        return response.status, response.getheader("X-Gateway-Reason") or ""
    finally:
        connection.close()


@pytest.mark.parametrize(
    "target",
    [
        "/echo/public/%252e%252e/protected/x",
        "/echo/public/%25%32%65%25%32%65/protected/x",
        "/echo/public/..%252fprotected/x",
        "/echo/public/%EF%BC%8E%EF%BC%8E/protected/x",
        "/echo/public/%E2%80%A5/protected/x",
        "/echo/public/..%E2%88%95protected",
        "/echo/public/..%C2%A5protected",
        "/echo/public/a/b//..//..",
    ],
)
def test_ambiguous_paths_are_refused_and_never_reach_the_portal(stack: Stack, target: str) -> None:
    before = len(stack.received())
    assert raw_get(stack, target) == (400, "bad_request_path")
    assert stack.received()[before:] == []
    assert audit_records(stack.audit)[-1]["reasons"] == ["bad_request_path"]
    # The same gateway still forwards a plain public request (the portal is up and recording).
    assert raw_get(stack, "/echo/public/ok")[0] == 200
    assert stack.received()[-1]["raw_uri"] == "/echo/public/ok"
