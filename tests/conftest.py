"""Shared fixtures: real upstream and Redis processes, settings files written per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.support.card_stack import card_stack_of_the_module  # noqa: F401 - fixture "stack"
from tests.support.pki import dev_pki  # noqa: F401 - fixture
from tests.support.processes import free_port, running
from tests.support.softhsm import softhsm_cards  # noqa: F401 - fixture
from tests.support.upstream import gunicorn_argv


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the page catalogs a pull or an edit left older than their .po (what `make translations` does):
    a stale .mo would show keys instead of wording in every page test."""
    from babel.messages.frontend import CommandLineInterface

    from gateway.i18n import CATALOG_DIR, DOMAIN

    sources = list(CATALOG_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}.po"))
    if any(
        not po.with_suffix(".mo").exists() or po.stat().st_mtime > po.with_suffix(".mo").stat().st_mtime
        for po in sources
    ):
        CommandLineInterface().run(["pybabel", "-q", "compile", "-d", str(CATALOG_DIR), "-D", DOMAIN])


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


@pytest.fixture
def app(tmp_path: Path, upstream_url: str, assertion_key: Path) -> Iterator[Flask]:
    """The gateway in-process (Flask test client) with the test policies, in front of the real upstream."""
    from gateway.app import create_app
    from gateway.runtime import gateway_of
    from gateway.settings import load_settings
    from tests.support.config import write_config

    application = create_app(
        load_settings(write_config(tmp_path, upstream_url=upstream_url, assertion_key=assertion_key))
    )
    yield application
    gateway_of(application).upstream.close()
