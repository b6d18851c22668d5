"""Readiness probe: session store, portal reachability and checks other modules register."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from gateway.app import create_app
from gateway.readiness import NotReady, UpstreamProbe
from gateway.runtime import gateway_of
from gateway.settings import load_settings
from tests.support.config import write_config
from tests.support.processes import free_port
from tests.support.redis import redis_server


def test_ready_when_store_and_portal_answer(app: Flask) -> None:
    response = app.test_client().get("/.gateway/readyz")
    assert response.status_code == 200
    assert response.json == {
        "status": "ready",
        "checks": {"sessions": {"ok": True}, "audit": {"ok": True}, "upstream": {"ok": True}},
    }
    assert response.headers["Cache-Control"] == "no-store"


def test_a_registered_check_that_fails_makes_the_instance_not_ready(app: Flask) -> None:
    def crl_fresh() -> None:
        raise NotReady("CRL of IGC-Santé older than its nextUpdate")

    gateway_of(app).readiness.register("crl", crl_fresh)
    response = app.test_client().get("/.gateway/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "not_ready"
    assert response.json["checks"]["crl"] == {
        "ok": False,
        "detail": "CRL of IGC-Santé older than its nextUpdate",
    }
    assert response.json["checks"]["upstream"] == {"ok": True}


def test_a_check_name_is_registered_once(app: Flask) -> None:
    with pytest.raises(ValueError, match="already registered"):
        gateway_of(app).readiness.register("sessions", lambda: None)


def test_unreachable_portal_is_not_ready(tmp_path: Path, assertion_key: Path) -> None:
    config = write_config(
        tmp_path, upstream_url=f"http://127.0.0.1:{free_port()}", assertion_key=assertion_key
    )
    app = create_app(load_settings(config))
    response = app.test_client().get("/.gateway/readyz")
    assert response.status_code == 503
    assert response.json["checks"]["upstream"]["ok"] is False
    assert response.json["checks"]["sessions"] == {"ok": True}


def test_session_store_down_is_not_ready(tmp_path: Path, upstream_url: str, assertion_key: Path) -> None:
    with redis_server() as redis:
        config = write_config(
            tmp_path,
            upstream_url=upstream_url,
            assertion_key=assertion_key,
            extra={"sessions": {"store": redis.url}},
        )
        app = create_app(load_settings(config))
        assert app.test_client().get("/.gateway/readyz").status_code == 200
        redis.stop()
        response = app.test_client().get("/.gateway/readyz")
    assert response.status_code == 503
    assert response.json["checks"]["sessions"]["ok"] is False


def test_upstream_probe_result_is_cached_for_its_ttl() -> None:
    port = free_port()
    probe = UpstreamProbe(f"http://127.0.0.1:{port}", timeout=0.5, ttl=60)
    with pytest.raises(NotReady):
        probe()
    import socket

    with socket.create_server(("127.0.0.1", port)), pytest.raises(NotReady):
        probe()  # still the cached answer: probes must not hammer the portal
