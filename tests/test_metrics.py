"""The metric functions other modules call, in-process (the default registry; no multiprocess dir)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from gateway import metrics
from gateway.policy.decision import Decision, Outcome, Reason


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_functions_for_other_modules_count_with_their_labels() -> None:
    before = value("gateway_login_attempts_total", method="card", outcome="card_revoked")
    metrics.login_attempt("card", "card_revoked")
    assert value("gateway_login_attempts_total", method="card", outcome="card_revoked") == before + 1

    before = value("gateway_bans_total", scope="ip")
    metrics.ban("ip")
    assert value("gateway_bans_total", scope="ip") == before + 1

    before = value("gateway_quota_breaches_total", rule="records", action="block")
    metrics.quota_breach("records", "block")
    assert value("gateway_quota_breaches_total", rule="records", action="block") == before + 1

    metrics.crl_age("IGC-Sante AC Classe-1", 3600)
    assert value("gateway_crl_age_seconds", issuer="IGC-Sante AC Classe-1") == 3600


def test_decisions_are_counted_by_outcome_and_main_reason() -> None:
    labels = {"decision": "deny", "reason": "quota_exceeded"}
    before = value("gateway_requests_total", **labels)
    metrics.request_decided(Decision(Outcome.DENY, (Reason.QUOTA_EXCEEDED, Reason.AUTHENTICATED)))
    assert value("gateway_requests_total", **labels) == before + 1
