"""Path normalisation: the bypass corpus, and the forms that must survive unchanged."""

from __future__ import annotations

import pytest

from gateway.policy.paths import BadPath, matching_path, normalise_target, parse_pattern

# Each of these has bypassed a proxy's path rules somewhere; the gateway refuses them with 400.
REFUSED = {
    "/patients%2F180017512345678": "encoded slash",
    "/patients%2f180017512345678": "encoded slash, lower-case hex",
    "/patients%5C180017512345678": "encoded backslash",
    "/patients\\180017512345678": "raw backslash",
    "/patients/%00/x": "encoded NUL",
    "/..": "dot-dot above the root",
    "/%2e%2e/etc/passwd": "encoded dot-dot above the root",
    "/a/../../patients/1": "dot-dot escaping after one segment",
    "/%c0%ae%c0%ae/patients": "overlong UTF-8 dots",
    "/%c0%af": "overlong UTF-8 slash",
    "/%e0%80%af": "three-byte overlong slash",
    "/%ff": "invalid UTF-8 byte",
    "/patients;jsessionid=x/1": "segment parameter (Tomcat strips it)",
    "/patients/1;.css": "parameter disguising an extension",
    "/patients./1": "trailing dot (IIS strips it)",
    "/patients%2E/1": "encoded trailing dot",
    "/patients%20/1": "trailing space",
    "/patients/%zz": "broken percent-encoding",
    "/patients/%2": "truncated percent-encoding",
    "/patients/\u00e9": "raw non-ASCII byte",
    "/patients/%0a": "encoded line feed",
    "/patients/%7f": "encoded DEL",
    "patients/1": "not origin-form",
    "*": "asterisk-form",
    "/a#frag": "fragment in the request target",
}

NORMALISED = {
    "/": "/",
    "/patients/1": "/patients/1",
    "/patients//1": "/patients/1",
    "//patients/1": "/patients/1",
    "/./patients/./1": "/patients/1",
    "/static/../patients/1": "/patients/1",
    "/static/%2e%2e/patients/1": "/patients/1",
    "/static/.%2E/patients/1": "/patients/1",
    "/%70atients/1": "/patients/1",
    "/patients/%31": "/patients/1",
    "/%7euser": "/~user",
    "/a%20b": "/a%20b",
    "/caf%c3%a9": "/caf%C3%A9",
    "/patients/1/": "/patients/1/",
    "/patients/1/.": "/patients/1/",
    "/patients/1/2/..": "/patients/1/",
    "/PATIENTS/1": "/PATIENTS/1",
}


@pytest.mark.parametrize("raw", list(REFUSED), ids=list(REFUSED.values()))
def test_bypass_shapes_are_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        normalise_target(raw)


@pytest.mark.parametrize(("raw", "expected"), list(NORMALISED.items()))
def test_normal_form(raw: str, expected: str) -> None:
    assert normalise_target(raw).path == expected


def test_query_is_kept_apart_and_unchanged() -> None:
    target = normalise_target("/patients/1?nir=%2F..%2F&x=1")
    assert target.path == "/patients/1"
    assert target.query == "nir=%2F..%2F&x=1"


def test_decoded_path_is_for_routing_only() -> None:
    target = normalise_target("/caf%C3%A9/a%20b")
    assert target.decoded_path == "/café/a b"
    assert target.path == "/caf%C3%A9/a%20b"


def test_normalising_twice_changes_nothing() -> None:
    for raw in NORMALISED:
        once = normalise_target(raw).path
        assert normalise_target(once).path == once


def test_matching_ignores_one_trailing_slash() -> None:
    assert matching_path("/patients/1/") == "/patients/1"
    assert matching_path("/") == "/"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("patients", "must start with '/'"),
        ("/a/**/b", "only allowed as the last segment"),
        ("/pat*", "must be a whole segment"),
        ("/a//b", "empty segment"),
        ("/a/./b", "not in normal form"),
        ("/a/../b", "escapes the root"),
        ("/a%2fb", "encoded slash"),
        ("/a?x=1", "query string"),
    ],
)
def test_bad_patterns_say_why(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pattern(pattern)


@pytest.mark.parametrize(
    ("wide", "narrow", "covers"),
    [
        ("/**", "/patients/*", True),
        ("/patients/**", "/patients", True),
        ("/patients/**", "/patients/*/x", True),
        ("/patients/*", "/patients/1", True),
        ("/patients/*", "/patients/**", False),
        ("/patients/1", "/patients/*", False),
        ("/a/*", "/a/b/c", False),
        ("/a/**", "/b/**", False),
        ("/A/**", "/a/b", True),
    ],
)
def test_pattern_coverage(wide: str, narrow: str, covers: bool) -> None:
    assert parse_pattern(wide).covers(parse_pattern(narrow)) is covers
