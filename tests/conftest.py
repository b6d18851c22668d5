"""Shared fixtures: real upstream and Redis processes, settings files written per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port, running
from tests.support.upstream import gunicorn_argv


@pytest.fixture(scope="session")
def upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real upstream HTTP server process (gunicorn) for the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    with running(gunicorn_argv(port), port, log=log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def assertion_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gateway.proxy.assertion import generate_key_file

    path = tmp_path_factory.mktemp("keys") / "assertion-key.pem"
    generate_key_file(path)
    return path
