"""The gateway app in-process (Flask test client) with settings written for the test, and logged-in clients."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from gateway.app import create_app
from gateway.identity import Identity, LoginMethod
from gateway.runtime import gateway_of
from gateway.settings import load_settings
from tests.support.config import write_config


@contextlib.contextmanager
def gateway_app(directory: Path, **config: Any) -> Iterator[Flask]:
    """``create_app`` on the settings ``write_config(directory, **config)`` writes; its pool closed after."""
    application = create_app(load_settings(write_config(directory, **config)))
    try:
        yield application
    finally:
        gateway_of(application).upstream.close()


def logged_in(app: Flask, idnat: str = "810001234567") -> FlaskClient:
    """A test client holding a fresh card session of a doctor (``idnat``)."""
    client = app.test_client()
    identity = Identity(idnat, LoginMethod.CARD, time.time(), professions=("10",), auth_mode="CARD")
    session = gateway_of(app).sessions.create(identity, time.time())
    client.set_cookie("__Host-gateway-session", session.id, domain="localhost")
    return client
