"""Matching and decisions as a table: request + identity + time -> rule, outcome, reasons."""

from __future__ import annotations

import pytest

from gateway.identity import Identity, LoginMethod
from gateway.policy.decision import Outcome, Reason
from gateway.policy.loader import load_policies

NOW = 1_800_000_000.0
POLICIES = """\
rules:
  - name: admin-host
    match: { host: admin.portal.fr, path: /** }
    action: deny
  - name: api-wildcard-host
    match: { host: '*.api.portal.fr', path: /v1/* }
    action: public
  - name: home
    match: { path: /, methods: [GET] }
    action: public
  - name: records
    match: { path: /patients/*, methods: [GET] }
    action: authenticate
    login: { professions: [10, 21] }
  - name: bank
    match: { path: /account/rib, methods: [GET, POST] }
    action: authenticate
    login: { methods: [card], max_age: 10m }
  - name: prescriptions
    match: { path: /prescriptions/** }
    action: authenticate
    login: { methods: [card, ecps], ecps_auth_modes: [CARD] }
  - name: establishment
    match: { path: /establishment/** }
    action: authenticate
    login: { allow_staff_cards: true }
"""
POLICY_SET = load_policies({"p.yaml": POLICIES}).policy_set


def person(
    method: LoginMethod = LoginMethod.CARD,
    age: float = 60,
    professions: tuple[str, ...] = ("10",),
    auth_mode: str = "CARD",
    idnat: str = "810001234567",
) -> Identity:
    return Identity(idnat, method, NOW - age, professions=professions, auth_mode=auth_mode)


DOCTOR = person()
NURSE = person(professions=("60",))
ECPS_APP = person(LoginMethod.ECPS, auth_mode="MOBILE")
ECPS_CARD = person(LoginMethod.ECPS, auth_mode="CARD")
OLD_CARD = person(age=3600)
STAFF = person(idnat="3750100001/12345", professions=())

TABLE = [
    # method, host, path, identity, rule, outcome, reasons
    ("GET", "portal.fr", "/", None, "home", Outcome.ALLOW, [Reason.PUBLIC_ROUTE]),
    ("HEAD", "portal.fr", "/", None, "home", Outcome.ALLOW, [Reason.PUBLIC_ROUTE]),
    ("POST", "portal.fr", "/", None, None, Outcome.DENY, [Reason.NO_MATCHING_RULE]),
    ("GET", "portal.fr", "/unknown", DOCTOR, None, Outcome.DENY, [Reason.NO_MATCHING_RULE]),
    ("GET", "admin.portal.fr", "/", None, "admin-host", Outcome.DENY, [Reason.DENIED_BY_RULE]),
    ("GET", "x.api.portal.fr", "/v1/a", None, "api-wildcard-host", Outcome.ALLOW, [Reason.PUBLIC_ROUTE]),
    ("GET", "api.portal.fr", "/v1/a", None, None, Outcome.DENY, [Reason.NO_MATCHING_RULE]),
    ("GET", "portal.fr", "/patients/1", None, "records", Outcome.LOGIN, [Reason.UNAUTHENTICATED]),
    ("GET", "portal.fr", "/patients/1", DOCTOR, "records", Outcome.ALLOW, [Reason.AUTHENTICATED]),
    ("GET", "portal.fr", "/patients/1/", DOCTOR, "records", Outcome.ALLOW, [Reason.AUTHENTICATED]),
    ("GET", "portal.fr", "/Patients/1", DOCTOR, "records", Outcome.ALLOW, [Reason.AUTHENTICATED]),
    ("GET", "portal.fr", "/patients/1/x", DOCTOR, None, Outcome.DENY, [Reason.NO_MATCHING_RULE]),
    ("GET", "portal.fr", "/patients", DOCTOR, None, Outcome.DENY, [Reason.NO_MATCHING_RULE]),
    ("DELETE", "portal.fr", "/patients/1", DOCTOR, None, Outcome.DENY, [Reason.NO_MATCHING_RULE]),
    ("GET", "portal.fr", "/patients/1", NURSE, "records", Outcome.DENY, [Reason.PROFESSION_NOT_ALLOWED]),
    ("GET", "portal.fr", "/account/rib", DOCTOR, "bank", Outcome.ALLOW, [Reason.AUTHENTICATED]),
    ("POST", "portal.fr", "/account/rib", OLD_CARD, "bank", Outcome.LOGIN, [Reason.LOGIN_TOO_OLD]),
    (
        "GET",
        "portal.fr",
        "/account/rib",
        ECPS_CARD,
        "bank",
        Outcome.LOGIN,
        [Reason.LOGIN_METHOD_NOT_ACCEPTED],
    ),
    (
        "GET",
        "portal.fr",
        "/prescriptions/9",
        ECPS_APP,
        "prescriptions",
        Outcome.LOGIN,
        [Reason.AUTH_MODE_NOT_ACCEPTED],
    ),
    (
        "GET",
        "portal.fr",
        "/prescriptions/9",
        ECPS_CARD,
        "prescriptions",
        Outcome.ALLOW,
        [Reason.AUTHENTICATED],
    ),
    ("GET", "portal.fr", "/prescriptions", DOCTOR, "prescriptions", Outcome.ALLOW, [Reason.AUTHENTICATED]),
    (
        "GET",
        "portal.fr",
        "/patients/1",
        STAFF,
        "records",
        Outcome.DENY,
        [Reason.STAFF_CARD_NOT_ALLOWED, Reason.PROFESSION_NOT_ALLOWED],
    ),
    ("GET", "portal.fr", "/establishment/x", STAFF, "establishment", Outcome.ALLOW, [Reason.AUTHENTICATED]),
]


@pytest.mark.parametrize(("method", "host", "path", "identity", "rule", "outcome", "reasons"), TABLE)
def test_decision_table(
    method: str,
    host: str,
    path: str,
    identity: Identity | None,
    rule: str | None,
    outcome: Outcome,
    reasons: list[Reason],
) -> None:
    decision = POLICY_SET.decide(method, host, path, identity, NOW)
    assert (decision.rule.name if decision.rule else None) == rule
    assert decision.outcome is outcome
    assert list(decision.reasons) == reasons


def test_first_matching_rule_wins() -> None:
    policies = load_policies(
        {
            "p.yaml": "rules:\n"
            "  - name: first\n    match: { path: /a/* }\n    action: deny\n"
            "  - name: second\n    match: { path: /a/** }\n    action: public\n"
        }
    ).policy_set
    assert policies.match("GET", "h", "/a/b").name == "first"  # type: ignore[union-attr]
    assert policies.match("GET", "h", "/a/b/c").name == "second"  # type: ignore[union-attr]


def test_files_are_evaluated_in_name_order() -> None:
    policies = load_policies(
        {
            "20-late.yaml": "rules:\n  - name: late\n    match: { path: /x }\n    action: public\n",
            "10-early.yaml": "rules:\n  - name: early\n    match: { path: /x }\n    action: deny\n",
        }
    ).policy_set
    assert policies.match("GET", "h", "/x").name == "early"  # type: ignore[union-attr]


def test_regex_metacharacters_in_paths_are_literal() -> None:
    policies = load_policies(
        {"p.yaml": "rules:\n  - name: dot\n    match: { path: /a.b }\n    action: public\n"}
    ).policy_set
    assert policies.match("GET", "h", "/a.b") is not None
    assert policies.match("GET", "h", "/aXb") is None
