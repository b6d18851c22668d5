"""Request-target normalisation and path patterns.

The gateway normalises a request's path ONCE; policies match that path and the upstream receives exactly
it, so the portal can never see a different resource than the one the policy judged. Anything ambiguous
(an encoded ``/`` or ``\\``, NUL, invalid UTF-8 or overlong encodings, ``..`` above the root, segment
parameters, trailing dots) is refused rather than guessed: these are the shapes of known proxy bypasses.

Two more classes are refused because some hop behind the gateway may read them differently:

- an escape that is itself encoded (``%252e``): a portal or inner proxy that decodes once more reads ``.``,
  ``/`` or ``\\``. Whatever a second (third...) decoding would produce is checked like a first one;
- non-ASCII characters that Unicode folding or Windows "best-fit" conversion can turn into other characters
  (U+FF0E FULLWIDTH FULL STOP → ``.``, U+2215 DIVISION SLASH → ``/``, U+00A5 YEN SIGN → ``\\`` in code
  page 932...), or drop (invisible characters). The classes come from the Unicode data:

  * a decoded segment must be NFKC-stable: no compatibility form (fullwidth and small forms, dot leaders,
    ligatures, U+017F LONG S, U+212A KELVIN SIGN...) and no decomposed sequence;
  * its non-ASCII characters must be letters, digits, or combining marks on a non-ASCII letter or digit
    (general categories L, N, M): punctuation, symbols, spaces and invisible characters (P, S, Z, C) are where every
    look-alike of ``.``, ``/`` and ``\\`` lives (division and fraction slashes, ideographic full stop,
    yen and won signs...); default-ignorable marks (variation selectors...) are refused too;
  * no non-ASCII character may decompose (NFKD) into an ASCII one: best-fit conversion and accent
    stripping turn U+00ED ``í`` into ``i``, so ``/account/r%C3%ADb`` would reach a folding portal as
    ``/account/rib`` after being judged by another rule;
  * no Latin-script letter outside ASCII at all, decomposable or not: Windows best-fit tables (and
    transliterating libraries) fold letters WITHOUT a decomposition too, by their look: U+0131 DOTLESS I,
    U+0142 L WITH STROKE, U+0180 B WITH STROKE, O WITH STROKE, D and H and T WITH STROKE, SHARP S, AE...
    (``/account/r%C4%B1b`` is served as ``/account/rib`` by an IIS portal). The rule is the script, not a
    list: every character whose Unicode name says LATIN (IPA and phonetic letters included), and the
    spacing modifier letters (U+02B0-U+02FF: MODIFIER LETTER APOSTROPHE folds to ``'``, MODIFIER LETTER
    CIRCUMFLEX ACCENT to ``^``...);
  * no non-ASCII digit: best-fit (code page 1256) and the number parsers of most languages (Python's
    ``int``, .NET's ``char.IsDigit``) read U+0665 ARABIC-INDIC DIGIT FIVE as ``5``, so a resource id could
    name one record to the gateway's quota and another to the portal;
  * none of the few letters of other scripts that a best-fit table maps to ASCII (code page 1252 maps
    GREEK SMALL LETTER ALPHA to ``a``, CAPITAL SIGMA to ``S``...; :data:`_BEST_FIT_TO_ASCII`, from
    Microsoft's published WindowsBestFit tables; tests/policy/test_paths.py lists every character of those
    tables mapped to ASCII that no decomposition gives away, and checks each is refused).
  Other letters of other scripts (most of Greek, Cyrillic, CJK...) pass.

Dot segments resolve as in RFC 3986 (section 5.2.4), where an empty segment (``//``) is a segment: ``..``
removes the segment before it. Servers that merge slashes first would remove a different one, so a ``..``
that would remove an empty segment (``/a//..``, ``/a//b/../..``) is refused; otherwise both readings agree
and the remaining empty segments are merged. The result is the ONE form the policies match, the portal
receives, and forward-auth compares the raw X-Original-URI with (a raw URI that differs from its normal form
is not canonical).
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 pchar without "%" (handled apart) and without ";" (segment parameters are refused).
_ALLOWED_RAW = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,=:@/")
_HEX = frozenset(string.hexdigits)
_FORBIDDEN_DECODED = {"/": "an encoded slash", "\\": "an encoded backslash", "\x00": "a NUL byte"}
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
#: What a further decoding of an encoded escape must never produce (plus controls, checked apart).
_STRUCTURAL = frozenset("./\\")
#: Levels of encoding looked through (``%25252e`` is three); deeper nesting is refused outright.
_MAX_DECODINGS = 4
#: Default_Ignorable_Code_Point characters of categories L and M (DerivedCoreProperties.txt); the C ones
#: are refused by category. Invisible, and dropped by some normalisers: "rib" + U+FE0F would become "rib".
_IGNORABLE_LETTERS_AND_MARKS = frozenset(
    chr(cp)
    for first, last in (
        (0x034F, 0x034F),
        (0x115F, 0x1160),
        (0x17B4, 0x17B5),
        (0x180B, 0x180D),
        (0x180F, 0x180F),
        (0x3164, 0x3164),
        (0xFE00, 0xFE0F),
        (0xFFA0, 0xFFA0),
        (0xE0100, 0xE01EF),
    )
    for cp in range(first, last + 1)
)

#: Letters of non-Latin scripts that Microsoft's best-fit tables (WindowsBestFit, code pages 1250 to 1258
#: and 874 to 950) map to an ASCII letter; the Latin letters and the digits they map are refused by rule.
_BEST_FIT_TO_ASCII = frozenset(
    "\u0393\u0398\u03a3\u03a6\u03a9\u03b1\u03b4\u03b5\u03c0\u03c3\u03c4\u03c6\u04bb"
)
#: Spacing Modifier Letters: apostrophes, primes, accents and tone letters that best-fit folds to ASCII.
_SPACING_MODIFIERS = range(0x02B0, 0x0300)


class BadPath(ValueError):
    """The request target is refused (answered 400); ``str()`` says why, for logs and audit."""


@dataclass(frozen=True, slots=True)
class NormalisedTarget:
    #: The path as matched and forwarded: unreserved characters decoded, others percent-encoded (upper hex).
    path: str
    #: The query string as received (never used for matching).
    query: str
    #: The path with every escape decoded (for WSGI's PATH_INFO and Flask routing).
    decoded_path: str

    @property
    def path_and_query(self) -> str:
        """What is forwarded, and where a login sends the user back: the normalised path and the query."""
        return f"{self.path}?{self.query}" if self.query else self.path


def normalise_target(raw_target: str) -> NormalisedTarget:
    """Normalise an origin-form request target (``/a/b?c``) or raise :class:`BadPath`."""
    if not raw_target.startswith("/"):
        raise BadPath("the request target is not an absolute path")
    path, _, query = raw_target.partition("?")
    if "#" in raw_target:
        raise BadPath("the request target contains a fragment")
    # (normal form, decoded form) of each segment kept so far; "" is an empty segment ("//").
    kept: list[tuple[str, str]] = []
    segment = ""
    for raw_segment in path.split("/")[1:]:
        segment, decoded = _normalise_segment(raw_segment)
        if segment == ".":
            continue
        if segment == "..":
            if not kept:
                raise BadPath("'..' escapes the root")
            if not kept[-1][0]:
                raise BadPath("'..' would remove an empty segment ('//'): servers resolve it differently")
            kept.pop()
            continue
        kept.append((segment, decoded))
    segments = [normal for normal, _ in kept if normal]
    decoded_segments = [decoded for normal, decoded in kept if normal]
    # RFC 3986 remove_dot_segments keeps the directory form: "/a/b/." and "/a/b/c/.." both give "/a/b/".
    trailing_slash = bool(segments) and segment in ("", ".", "..")
    suffix = "/" if trailing_slash else ""
    return NormalisedTarget(
        path="/" + "/".join(segments) + suffix,
        query=query,
        decoded_path="/" + "/".join(decoded_segments) + suffix,
    )


def _normalise_segment(raw: str) -> tuple[str, str]:
    """One path segment -> (normal form, fully decoded form)."""
    if "%" not in raw:
        bad = next((c for c in raw if c not in _ALLOWED_RAW), None)
        if bad is not None:
            raise BadPath(f"forbidden character {_describe(bad)} in the path")
        _refuse_trailing_dot(raw)
        return raw, raw
    normal: list[str] = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            hex_pair = raw[i + 1 : i + 3]
            if len(hex_pair) != 2 or not set(hex_pair) <= _HEX:
                raise BadPath("invalid percent-encoding in the path")
            decoded_char = chr(int(hex_pair, 16))
            if decoded_char in _FORBIDDEN_DECODED:
                raise BadPath(f"{_FORBIDDEN_DECODED[decoded_char]} in the path")
            normal.append(decoded_char if decoded_char in _UNRESERVED else "%" + hex_pair.upper())
            i += 3
            continue
        if char not in _ALLOWED_RAW:
            raise BadPath(f"forbidden character {_describe(char)} in the path")
        normal.append(char)
        i += 1
    segment = "".join(normal)
    try:
        decoded = unquote_to_bytes(segment).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadPath("the path is not valid UTF-8 (or uses an overlong encoding)") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise BadPath("a control character in the path")
    if not decoded.isascii():
        _refuse_foldable(decoded)
    if "%" in decoded:
        _refuse_encoded_escapes(decoded)
    if decoded not in (".", ".."):
        _refuse_trailing_dot(decoded)
    return segment, decoded


def _refuse_encoded_escapes(decoded: str) -> None:
    """Refuse what a hop decoding again would read as structure (``%252e`` -> ``%2e`` -> ``.``)."""
    text = decoded
    for _ in range(_MAX_DECODINGS):
        escapes = _ESCAPE.findall(text)
        if not escapes:
            return
        for pair in escapes:
            char = chr(int(pair, 16))
            if char in _STRUCTURAL or ord(char) < 0x20 or ord(char) == 0x7F:
                raise BadPath(f"an encoded escape (%25...) decoding to {_describe(char)} in the path")
        try:
            text = unquote_to_bytes(text).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise BadPath("a double-encoded sequence that is not valid UTF-8") from None
        if not text.isascii():
            _refuse_foldable(text)
    if _ESCAPE.search(text):
        raise BadPath("too many levels of percent-encoding in the path")


def _refuse_foldable(decoded: str) -> None:
    """Refuse non-ASCII text that Unicode or best-fit folding may read as other characters (module doc)."""
    if not unicodedata.is_normalized("NFKC", decoded):
        folded = unicodedata.normalize("NFKC", decoded)
        raise BadPath(f"a path segment that Unicode folding changes (NFKC: {folded!r})")
    on_base = False  # a combining mark must sit on a non-ASCII letter or digit
    for char in decoded:
        if char.isascii():
            on_base = False  # stripping a mark from an ASCII letter leaves that letter: "rib" + U+0301
            continue
        if char in _IGNORABLE_LETTERS_AND_MARKS:
            raise BadPath(f"an invisible character in the path ({unicodedata.name(char, hex(ord(char)))})")
        if _folds_to_ascii(char):
            name = unicodedata.name(char, hex(ord(char)))
            raise BadPath(
                f"a character that folds to ASCII (best-fit, accent stripping) in the path ({name})"
            )
        kind = unicodedata.category(char)[0]
        if kind in "LN":
            on_base = True
        elif kind != "M" or not on_base:
            name = unicodedata.name(char, f"U+{ord(char):04X}")
            what = (
                "a combining mark on no letter"
                if kind == "M"
                else "a non-ASCII punctuation, symbol or invisible character"
            )
            raise BadPath(f"{what} in the path ({name})")


def _folds_to_ascii(char: str) -> bool:
    """True for a non-ASCII character some folding reads as ASCII (module doc: the rule and why)."""
    if any(part.isascii() for part in unicodedata.normalize("NFKD", char)):
        return True
    if "LATIN" in unicodedata.name(char, "") or ord(char) in _SPACING_MODIFIERS:
        return True
    return unicodedata.digit(char, None) is not None or char in _BEST_FIT_TO_ASCII


def _refuse_trailing_dot(segment: str) -> None:
    # Windows/IIS upstreams strip trailing dots and spaces ("patients." == "patients"): refuse them.
    if segment not in ("", ".", "..") and segment[-1] in ". ":
        raise BadPath("a path segment ends with a dot or a space")


def _describe(char: str) -> str:
    names = {";": "';' (segment parameters)", "\\": "'\\' (backslash)", "\x00": "NUL", ".": "'.'", "/": "'/'"}
    return names.get(char, repr(char))


# --- Path patterns -------------------------------------------------------------------------------------

WILDCARD_SEGMENT = "*"
WILDCARD_REST = "**"


@dataclass(frozen=True, slots=True)
class PathPattern:
    """``/exact/path``, ``/one/*/segment`` or ``/prefix/**`` (``**`` last only: zero or more segments)."""

    text: str
    segments: tuple[str, ...]

    @property
    def is_prefix(self) -> bool:
        return bool(self.segments) and self.segments[-1] == WILDCARD_REST

    def regex_source(self) -> str:
        if self.is_prefix:
            head = self.segments[:-1]
            return "".join("/" + _segment_regex(s) for s in head) + "(?:/.*)?"
        if not self.segments:
            return "/"
        return "".join("/" + _segment_regex(s) for s in self.segments)

    def covers(self, other: PathPattern) -> bool:
        """True when every path matched by ``other`` is matched by this pattern too."""
        mine, theirs = self.segments, other.segments
        if self.is_prefix:
            head = mine[:-1]
            if len(theirs) < len(head) or (other.is_prefix and len(theirs) - 1 < len(head)):
                return False
            return all(_segment_covers(a, b) for a, b in zip(head, theirs, strict=False))
        if other.is_prefix or len(mine) != len(theirs):
            return False
        return all(_segment_covers(a, b) for a, b in zip(mine, theirs, strict=True))


def _segment_regex(segment: str) -> str:
    return "[^/]+" if segment == WILDCARD_SEGMENT else re.escape(segment)


def _segment_covers(mine: str, theirs: str) -> bool:
    if mine == WILDCARD_SEGMENT:
        return theirs != WILDCARD_REST
    return mine.lower() == theirs.lower()


def parse_pattern(text: str) -> PathPattern:
    """Parse and check a pattern; raise ValueError with a message fit for a config error."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f"path pattern {text!r} must start with '/'")
    if "?" in text or "#" in text:
        raise ValueError(f"path pattern {text!r}: the query string and fragment are never matched")
    segments = tuple(s for s in text.split("/")[1:])
    if segments and segments[-1] == "":
        segments = segments[:-1]  # "/x/" matches like "/x": trailing slashes are ignored
    for index, segment in enumerate(segments):
        if segment == WILDCARD_REST:
            if index != len(segments) - 1:
                raise ValueError(f"path pattern {text!r}: '**' is only allowed as the last segment")
            continue
        if segment == WILDCARD_SEGMENT:
            continue
        if "*" in segment:
            raise ValueError(f"path pattern {text!r}: '*' must be a whole segment ('*' or '**')")
        if segment == "":
            raise ValueError(f"path pattern {text!r}: empty segment ('//')")
        try:
            normal = normalise_target("/" + segment).path
        except BadPath as exc:
            raise ValueError(f"path pattern {text!r}: {exc}") from None
        if normal != "/" + segment:
            raise ValueError(
                f"path pattern {text!r}: segment {segment!r} is not in normal form ({normal[1:]!r})"
            )
    return PathPattern(text=text, segments=segments)


def matching_path(path: str) -> str:
    """The form of a normalised path that patterns are matched against: no trailing slash (but '/')."""
    return path[:-1] if len(path) > 1 and path.endswith("/") else path
