"""Path normalisation: the bypass corpus, and the forms that must survive unchanged."""

from __future__ import annotations

import functools
import sys
import unicodedata
from urllib.parse import quote

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
    "/static/%252e%252e/patients/1": "double-encoded dot-dot (a hop decoding twice reads ../patients)",
    "/static/%252E%252E/patients/1": "double-encoded dot-dot, upper-case hex",
    "/static/%25%32%65%25%32%65/patients/1": "double-encoded dot-dot, the inner escape encoded digit by digit",
    "/static/%25252e%25252e/patients/1": "triple-encoded dot-dot",
    "/static/..%252fpatients": "double-encoded slash",
    "/static/..%255cpatients": "double-encoded backslash",
    "/static/x%2500.css": "double-encoded NUL",
    "/static/%25c0%25ae%25c0%25ae/patients": "double-encoded overlong dots",
    "/static/%25EF%25BC%258E%25EF%25BC%258E/patients": "double-encoded fullwidth dots",
    "/static/%2525252e": "more levels of encoding than any hop decodes",
    "/static/%EF%BC%8E%EF%BC%8E/patients/1": "fullwidth full stops (NFKC: ..)",
    "/static/%E2%80%A5/patients/1": "two dot leader (NFKC: ..)",
    "/static/%E2%80%A4%E2%80%A4/patients/1": "one dot leaders",
    "/static/..%EF%BC%8Fpatients": "fullwidth solidus",
    "/static/..%EF%BC%BCpatients": "fullwidth reverse solidus",
    "/static/..%EF%B9%A8patients": "small reverse solidus",
    "/static/..%E2%88%95patients": "division slash (best-fit: /)",
    "/static/..%E2%81%84patients": "fraction slash",
    "/static/..%E2%A7%B5patients": "reverse solidus operator",
    "/static/..%C2%A5patients": "yen sign (code page 932 best-fit: backslash)",
    "/static/..%E2%82%A9patients": "won sign (code page 949 best-fit: backslash)",
    "/static/.%C2%AD./patients": "soft hyphen between dots (invisible, stripped by some normalisers)",
    "/static/.%E2%80%8B./patients": "zero width space between dots",
    "/%EF%BD%90atients/1": "fullwidth letter (NFKC: p)",
    "/patient%C5%BF/1": "long s (NFKC: s)",
    "/cafe%CC%81": "decomposed accent (NFKC composes it: another segment)",
    "/account/r%C3%ADb": "accented letter (best-fit and accent stripping fold it: /account/rib)",
    "/account/r%C4%ADb": "i with breve (code page 1252 best-fit: i)",
    "/account/r%C4%B1b": "dotless i, no decomposition (code page 1252 best-fit: i)",
    "/account/r%C5%82b": "l with stroke, no decomposition (best-fit: l)",
    "/account/ri%C6%80": "b with stroke, no decomposition (best-fit: b)",
    "/stra%C3%9Fe": "sharp s (code pages 932 and 950 best-fit: s)",
    "/account/r%C9%AAb": "IPA small capital i (a Latin letter)",
    "/static/x%CA%BCy": "modifier letter apostrophe (best-fit: ')",
    "/p%CE%B1tients/1": "Greek alpha (code page 1252 best-fit: a)",
    "/patients/18%D9%A5": "Arabic-Indic digit five (best-fit and int(): 5)",
    "/account/rib%CC%B8": "combining mark on an ASCII letter (stripped: rib)",
    "/account/rib%EF%B8%8F": "variation selector (default-ignorable)",
    "/account/ri%E1%85%A0b": "hangul filler (a default-ignorable letter)",
    "/static/.%CC%B8./patients": "combining solidus overlay on a dot",
    "/patients/x//..//..": "dot-dot removing an empty segment (RFC 3986 and merge-first disagree)",
    "/account/rib//..": "dot-dot right after a double slash",
    "/a//b/../..": "dot-dot reaching an empty segment after another dot-dot",
    "/a/.//..": "dot-dot reaching an empty segment past a dot",
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
    "/%ce%b2%ce%b3": "/%CE%B2%CE%B3",
    "/patients/1/": "/patients/1/",
    "/patients/1/.": "/patients/1/",
    "/patients/1/2/..": "/patients/1/",
    "/PATIENTS/1": "/PATIENTS/1",
    "/a/..//b": "/b",
    "/a//b/..": "/a/",
    "/static/%2541": "/static/%2541",
    "/%CE%AC%CC%81": "/%CE%AC%CC%81",
    "/%E6%82%A3%E8%80%85": "/%E6%82%A3%E8%80%85",
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
    target = normalise_target("/%CE%B2%CE%B3/a%20b")
    assert target.decoded_path == "/\u03b2\u03b3/a b"
    assert target.path == "/%CE%B2%CE%B3/a%20b"


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


# --- Unicode look-alikes, decided from the Unicode data (unicodedata) and checked on every code point -----


@functools.cache
def assigned() -> tuple[str, ...]:
    """Every assigned non-ASCII character but surrogates and private use (about 145,000)."""
    return tuple(
        chr(cp)
        for cp in range(0x80, sys.maxunicode + 1)
        if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")
    )


def _refused(path: str) -> bool:
    try:
        normalise_target(path)
    except BadPath:
        return True
    return False


def _failures(chars: list[str], shape: str) -> list[str]:
    """The characters of ``chars`` NOT refused in the path ``shape`` (``{}`` = the encoded character)."""
    return [f"U+{ord(c):04X}" for c in chars if not _refused(shape.format(quote(c, safe="")))]


def test_every_character_that_nfkc_folds_into_a_dot_or_a_slash_is_refused() -> None:
    folding = [c for c in assigned() if set(unicodedata.normalize("NFKC", c)) & {".", "/", "\\"}]
    assert len(folding) >= 38  # Unicode 14: dot leaders, ellipses, fullwidth and small forms, "1."...
    assert _failures(folding, "/static/{}/patients") == []
    assert _failures(folding, "/static/x{}y") == []


def test_every_character_that_nfkc_changes_is_refused() -> None:
    changed = [c for c in assigned() if not unicodedata.is_normalized("NFKC", c)]
    assert _failures(changed, "/static/a{}b") == []


@pytest.mark.parametrize("category", ["P", "S", "Z", "Cf"])
def test_every_non_ascii_punctuation_symbol_space_and_format_character_is_refused(category: str) -> None:
    members = [c for c in assigned() if unicodedata.category(c).startswith(category)]
    assert members
    assert _failures(members, "/static/a{}b") == []


def test_private_use_and_unassigned_characters_are_refused() -> None:
    sample = [chr(cp) for cp in range(0xE000, 0xF900, 61)] + [
        chr(cp) for cp in range(0x40000, 0x110000, 4099) if unicodedata.category(chr(cp)) == "Cn"
    ]
    assert {unicodedata.category(c) for c in sample} == {"Co", "Cn"}
    assert _failures(sample, "/static/a{}b") == []


def test_every_character_named_like_a_dot_or_a_slash_is_refused() -> None:
    """Best-fit conversions map by meaning, not by NFKC: every SOLIDUS, SLASH, FULL STOP, DOT LEADER or
    ELLIPSIS in the Unicode names (DIVISION SLASH, FRACTION SLASH, IDEOGRAPHIC FULL STOP...), and the yen and
    won signs (the backslash of code pages 932 and 949), except letters (a Lao or modifier letter is never
    folded into punctuation)."""
    words = ("SOLIDUS", "SLASH", "FULL STOP", "DOT LEADER", "ELLIPSIS")
    named = [
        c
        for c in assigned()
        if not unicodedata.category(c).startswith("L") and any(w in unicodedata.name(c, "") for w in words)
    ]
    named += ["\u00a5", "\u20a9"]
    assert len(named) > 100
    assert _failures(named, "/static/{}x") == []


def test_every_character_that_decomposes_into_ascii_is_refused() -> None:
    """Accented Latin letters (NFKD: an ASCII letter and marks) fold to that letter by best-fit conversion or
    accent stripping: another segment, maybe another rule."""
    decomposing = [c for c in assigned() if any(part.isascii() for part in unicodedata.normalize("NFKD", c))]
    assert len(decomposing) > 1000
    assert _failures(decomposing, "/account/r{}b") == []


#: Every character of Microsoft's WindowsBestFit tables (code pages 874 to 1361) that a table maps to an
#: ASCII character although no decomposition leads there (the decomposing ones are checked above): Latin
#: letters with a stroke or a hook, IPA, modifier letters, a few Greek and Cyrillic letters, Arabic digits.
BEST_FIT_WITHOUT_DECOMPOSITION = (
    "\u00c6\u00d0\u00d8\u00de\u00df\u00e6\u00f0\u00f8\u00fe\u0110\u0111\u0126\u0127\u0131\u0141\u0142"
    "\u0152\u0153\u0166\u0167\u0180\u0189\u0191\u0192\u0197\u019a\u019f\u01ab\u01ae\u01b6\u01c0\u01c3"
    "\u01e4\u01e5\u0261\u02b9\u02ba\u02bc\u02c6\u02c7\u02c8\u02cb\u02cd\u0393\u0398\u03a3\u03a6\u03a9"
    "\u03b1\u03b4\u03b5\u03c0\u03c3\u03c4\u03c6\u04bb\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667"
    "\u0668\u0669"
)


def test_every_character_best_fit_maps_to_ascii_is_refused() -> None:
    assert len(BEST_FIT_WITHOUT_DECOMPOSITION) == 66
    assert _failures(list(BEST_FIT_WITHOUT_DECOMPOSITION), "/account/r{}b") == []


def test_every_latin_letter_modifier_letter_and_digit_outside_ascii_is_refused() -> None:
    """Best-fit tables are not the only folders (transliteration, number parsing): the rule is the script."""
    folding = [
        c
        for c in assigned()
        if "LATIN" in unicodedata.name(c, "")
        or 0x02B0 <= ord(c) < 0x0300
        or unicodedata.digit(c, None) is not None
    ]
    assert len(folding) > 1500
    assert _failures(folding, "/account/r{}b") == []


def test_letters_of_other_scripts_pass() -> None:
    kept = ["\u03b2", "\u03ac", "\u0416", "\u0439", "\u60a3", "\u0e01", "\u0915\u093f", "\u05d0"]
    assert [text for text in kept if _refused(f"/a/x{quote(text)}")] == []
