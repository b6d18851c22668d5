"""Policy files: one test per kind of mistake, each asserting file, line, key and message."""

from __future__ import annotations

import pytest

from gateway.config_source import ConfigErrors
from gateway.policy.loader import load_policies

GOOD_RULE = """\
  - name: home
    match: { path: / }
    action: public
"""


def errors_of(text: str, file: str = "policies/p.yaml") -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        load_policies({file: text})
    return [str(error) for error in caught.value.errors]


def test_a_valid_file_loads_with_locations() -> None:
    loaded = load_policies({"policies/p.yaml": "rules:\n" + GOOD_RULE})
    (rule,) = loaded.policy_set.rules
    assert (rule.name, rule.file, rule.line) == ("home", "policies/p.yaml", 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: [\n", "policies/p.yaml:2:1: YAML syntax: the file ends inside a '[…]' list"),
        ("rules:\n" + GOOD_RULE + "rules: []\n", "policies/p.yaml:5: rules: duplicate key"),
        ("rulez: []\n", "policies/p.yaml:1: rulez: unknown key"),
        ("{}\n", "policies/p.yaml:1: rules: required key is missing"),
        ("rules: []\n", "policies/p.yaml:1: rules: List should have at least 1 item"),
        (
            "rules:\n  - name: x\n    match: { path: / }\n    action: allow\n",
            "policies/p.yaml:4: rules[0].action: Input should be 'public', 'deny' or 'authenticate'",
        ),
        (
            "rules:\n  - name: x\n    match: { path: / }\n",
            "policies/p.yaml:2: rules[0].action: required key is missing",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /, colour: red }\n    action: public\n",
            "policies/p.yaml:3: rules[0].match.colour: unknown key",
        ),
        (
            "rules:\n  - name: Bad Name\n    match: { path: / }\n    action: public\n",
            "policies/p.yaml:2: rules[0].name: a rule name is lower-case",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /a/**/b }\n    action: public\n",
            "policies/p.yaml:3: rules[0].match.path: path pattern '/a/**/b': '**' is only allowed as the last",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /, paths: [/a] }\n    action: public\n",
            "policies/p.yaml:3: rules[0].match: give exactly one of 'path' or 'paths'",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /, methods: [GRAB] }\n    action: public\n",
            "policies/p.yaml:3: rules[0].match.methods: unknown HTTP method 'GRAB'",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /, host: 'a b' }\n    action: public\n",
            "policies/p.yaml:3: rules[0].match.host: 'a b' is not a host name",
        ),
        (
            "rules:\n  - name: x\n    match: { path: / }\n    action: authenticate\n"
            "    login: { professions: [12] }\n",
            "policies/p.yaml:5: rules[0].login.professions: unknown TRE_G15 profession code 12",
        ),
        (
            "rules:\n  - name: x\n    match: { path: / }\n    action: authenticate\n"
            "    login: { methods: [password] }\n",
            "policies/p.yaml:5: rules[0].login.methods[0]: Input should be 'card' or 'ecps'",
        ),
        (
            "rules:\n  - name: x\n    match: { path: / }\n    action: authenticate\n    login: { max_age: soon }\n",
            "policies/p.yaml:5: rules[0].login.max_age: expected a duration such as 30s, 10m, 4h",
        ),
        (
            "rules:\n  - name: x\n    match: { path: / }\n    action: public\n    login: { methods: [card] }\n",
            "policies/p.yaml:2: rules[0]: 'login' only applies to action 'authenticate'",
        ),
        (
            "rules:\n  - name: x\n    match: { path: / }\n    action: deny\n    health_data: true\n",
            "policies/p.yaml:2: rules[0]: 'health_data' only applies to action 'authenticate'",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /p/* }\n    action: authenticate\n"
            "    quota: { window: 1h, max_distinct: 10 }\n",
            "policies/p.yaml:5: rules[0].quota: 'max_distinct' needs 'resource'",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /p/* }\n    action: authenticate\n"
            "    quota: { window: 1h }\n",
            "policies/p.yaml:5: rules[0].quota: a quota needs 'max_requests', 'max_distinct' or both",
        ),
        (
            "rules:\n  - name: x\n    match: { path: /p/* }\n    action: authenticate\n"
            "    quota: { window: 1h, max_distinct: 3, resource: { path_segment: 0 } }\n",
            "policies/p.yaml:5: rules[0].quota.resource.path_segment: Input should be greater than or equal to 1",
        ),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else value,
)
def test_each_mistake_is_named_with_its_place(text: str, expected: str) -> None:
    assert any(error.startswith(expected) for error in errors_of(text)), errors_of(text)


def test_every_error_of_every_file_is_reported_at_once() -> None:
    with pytest.raises(ConfigErrors) as caught:
        load_policies(
            {
                "a.yaml": "rules:\n  - name: x\n    match: { path: nope }\n    action: maybe\n",
                "b.yaml": "rulez: []\n",
            }
        )
    places = [(e.file, e.line) for e in caught.value.errors]
    assert places == [("a.yaml", 3), ("a.yaml", 4), ("b.yaml", 1), ("b.yaml", 1)]


def test_duplicate_rule_names_across_files() -> None:
    errors = errors_of_many({"a.yaml": "rules:\n" + GOOD_RULE, "b.yaml": "rules:\n" + GOOD_RULE})
    assert errors == ["b.yaml:2: name: duplicate rule name 'home' (first defined at a.yaml:2)"]


def errors_of_many(sources: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        load_policies(sources)
    return [str(error) for error in caught.value.errors]


def test_no_policy_file_is_an_error() -> None:
    assert "no policy file found" in errors_of_many({})[0]


def test_rules_that_can_never_match_are_warned_about() -> None:
    text = """\
rules:
  - name: everything
    match: { path: /patients/** }
    action: deny
  - name: one-patient
    match: { path: /patients/*, methods: [GET] }
    action: authenticate
  - name: elsewhere
    match: { path: /account/* }
    action: authenticate
"""
    warnings = [str(w) for w in load_policies({"p.yaml": text}).warnings]
    assert warnings == [
        "p.yaml:5: rule 'one-patient': can never match: rule 'everything' (p.yaml:2) matches all its requests first"
    ]


def test_a_narrower_method_list_does_not_shadow() -> None:
    text = """\
rules:
  - name: read
    match: { path: /a/**, methods: [GET] }
    action: public
  - name: write
    match: { path: /a/** }
    action: deny
"""
    assert load_policies({"p.yaml": text}).warnings == ()


def test_the_example_policies_load_without_warnings() -> None:
    from pathlib import Path

    files = sorted(Path("policies").glob("*.yaml"))
    loaded = load_policies({str(f): f.read_text() for f in files})
    assert loaded.warnings == ()
    assert {r.name for r in loaded.policy_set.rules} >= {"home", "patient-records", "bank-details"}


def test_a_rule_says_whether_its_route_shows_health_data() -> None:
    text = """\
rules:
  - name: records
    match: { path: /patients/* }
    action: authenticate
    health_data: true
  - name: account
    match: { path: /account/** }
    action: authenticate
"""
    records, account = load_policies({"p.yaml": text}).policy_set.rules
    assert records.health_data and not account.health_data


def test_the_example_policies_let_browsers_fetch_the_icon_and_mark_patient_records_as_health_data() -> None:
    from pathlib import Path

    from gateway.policy.model import Action

    files = sorted(Path("policies").glob("*.yaml"))
    policies = load_policies({str(f): f.read_text() for f in files}).policy_set
    icon = policies.match("GET", "portal.example.fr", "/favicon.ico")
    assert icon is not None and icon.action is Action.PUBLIC
    records = policies.match("GET", "portal.example.fr", "/patients/180017512345678")
    bank = policies.match("GET", "portal.example.fr", "/account/rib")
    assert records is not None and records.health_data
    assert bank is not None and not bank.health_data
