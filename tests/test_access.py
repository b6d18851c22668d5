"""The bulk-access guard (policy quotas) on the real request path, in-process, with a real upstream."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from gateway.access import UnidentifiedResource, resource_key
from gateway.app import create_app
from gateway.policy.decision import Reason
from gateway.policy.model import ResourceKey
from gateway.policy.paths import normalise_target
from gateway.settings import load_settings
from tests.support.apps import logged_in
from tests.support.audit import audit_records
from tests.support.config import write_config

POLICIES = """\
rules:
  - name: records
    match: { path: /patients/* }
    action: authenticate
    quota: { window: 1h, max_distinct: 3, resource: { path_segment: 2 }, on_exceed: revoke_session }
  - name: search
    match: { path: /echo/search }
    action: authenticate
    quota: { window: 1h, max_requests: 2, max_distinct: 10, resource: { query_parameter: nir } }
"""


@pytest.fixture
def app(tmp_path: Path, upstream_url: str, assertion_key: Path) -> Flask:
    config = write_config(tmp_path, upstream_url=upstream_url, assertion_key=assertion_key, policies=POLICIES)
    return create_app(load_settings(config))


def audit(tmp_path: Path, event: str) -> list[dict]:
    return audit_records(tmp_path / "audit.log", event)


def test_distinct_records_stop_at_the_quota_and_the_session_is_revoked(app: Flask, tmp_path: Path) -> None:
    client = logged_in(app)
    for nir in ("1", "2", "3", "1", "2"):
        assert client.get(f"/patients/{nir}").status_code == 200
    refused = client.get("/patients/4", headers={"Accept": "text/html"})
    assert refused.status_code == 429
    assert refused.headers["X-Gateway-Reason"] == "quota_exceeded"
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    assert "nombre inhabituel de dossiers" in refused.get_data(as_text=True)
    (breach,) = audit(tmp_path, "quota_breach")
    assert (
        breach["idnat"] == "810001234567"
        and breach["rule"] == "records"
        and breach["session_revoked"] is True
    )
    # The stolen session is dead: a fresh strong login is required.
    assert client.get("/patients/1").status_code == 401


def test_quota_is_per_identity(app: Flask) -> None:
    first, second = logged_in(app, "810000000001"), logged_in(app, "810000000002")
    for nir in ("1", "2", "3"):
        assert first.get(f"/patients/{nir}").status_code == 200
    assert first.get("/patients/4").status_code == 429
    assert second.get("/patients/4").status_code == 200


def test_request_quota_and_query_parameter_resource(app: Flask, tmp_path: Path) -> None:
    client = logged_in(app)
    assert client.get("/echo/search?nir=1").status_code == 200
    assert client.get("/echo/search?nir=2").status_code == 200
    blocked = client.get("/echo/search?nir=1")
    assert blocked.status_code == 429
    # on_exceed defaults to block: the session lives on for other routes.
    assert client.get("/patients/9").status_code == 200
    assert len(audit(tmp_path, "quota_breach")) == 1


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        (ResourceKey(path_segment=2), "/patients/180017512345678", "180017512345678"),
        (ResourceKey(query_parameter="nir"), "/search?x=1&nir=2", "2"),
        (ResourceKey(query_parameter="nir"), "/search?nir=%32+3", "2 3"),
        (ResourceKey(query_parameter="nir"), "/search?nirx=1&nir=2&xnir=3", "2"),
    ],
)
def test_resource_key(key: ResourceKey, raw: str, expected: str) -> None:
    assert resource_key(key, normalise_target(raw)) == expected


@pytest.mark.parametrize(
    ("key", "raw", "reason"),
    [
        (ResourceKey(path_segment=3), "/patients/1", Reason.RESOURCE_MISSING),
        (ResourceKey(query_parameter="nir"), "/search?x=1", Reason.RESOURCE_MISSING),
        (ResourceKey(query_parameter="nir"), "/search?nir=", Reason.RESOURCE_MISSING),
        (ResourceKey(query_parameter="nir"), "/search?nir=1&nir=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?nir=1;nir=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?x=1;nir=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?NIR=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?Nir=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?n%69r=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?n%2569r=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?nir%20=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?nir[]=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?%EF%BD%8Eir=2", Reason.RESOURCE_AMBIGUOUS),
        (ResourceKey(query_parameter="nir"), "/search?nir=1&NIR=2", Reason.RESOURCE_AMBIGUOUS),
    ],
)
def test_a_missing_repeated_or_respelled_resource_is_refused(
    key: ResourceKey, raw: str, reason: Reason
) -> None:
    with pytest.raises(UnidentifiedResource) as refused:
        resource_key(key, normalise_target(raw))
    assert refused.value.reason is reason


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("nir=1&nir=2", "resource_ambiguous"),  # PHP and Django read the last value, ASP.NET both
        ("NIR=2", "resource_ambiguous"),  # a case-insensitive portal reads nir=2
        ("x=1", "resource_missing"),
    ],
)
def test_quota_route_refuses_an_unidentified_resource_without_counting_it(
    app: Flask, tmp_path: Path, query: str, reason: str
) -> None:
    client = logged_in(app)
    for _ in range(3):  # max_requests is 2: counted requests would reach the quota
        refused = client.get(f"/echo/search?{query}", headers={"Accept": "text/html"})
        assert (refused.status_code, refused.headers["X-Gateway-Reason"]) == (400, reason)
    assert client.get("/echo/search?nir=1").status_code == 200
    assert client.get("/echo/search?nir=2").status_code == 200
    denied = [e for e in audit(tmp_path, "decision") if e["reasons"] == [reason]]
    assert len(denied) == 3 and denied[0]["rule"] == "search"
