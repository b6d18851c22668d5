"""Request-target normalisation and path patterns.

The gateway normalises a request's path ONCE; policies match that path and the upstream receives exactly
it, so the portal can never see a different resource than the one the policy judged. Anything ambiguous
(an encoded ``/`` or ``\\``, NUL, invalid UTF-8 or overlong encodings, ``..`` above the root, segment
parameters, trailing dots) is refused rather than guessed: these are the shapes of known proxy bypasses.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 pchar without "%" (handled apart) and without ";" (segment parameters are refused).
_ALLOWED_RAW = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,=:@/")
_HEX = frozenset(string.hexdigits)
_FORBIDDEN_DECODED = {"/": "an encoded slash", "\\": "an encoded backslash", "\x00": "a NUL byte"}


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
    segments: list[str] = []
    decoded_segments: list[str] = []
    segment = ""
    for raw_segment in path.split("/")[1:]:
        segment, decoded = _normalise_segment(raw_segment)
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise BadPath("'..' escapes the root")
            segments.pop()
            decoded_segments.pop()
            continue
        segments.append(segment)
        decoded_segments.append(decoded)
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
    if decoded not in (".", ".."):
        _refuse_trailing_dot(decoded)
    return segment, decoded


def _refuse_trailing_dot(segment: str) -> None:
    # Windows/IIS upstreams strip trailing dots and spaces ("patients." == "patients"): refuse them.
    if segment not in ("", ".", "..") and segment[-1] in ". ":
        raise BadPath("a path segment ends with a dot or a space")


def _describe(char: str) -> str:
    names = {";": "';' (segment parameters)", "\\": "'\\' (backslash)", "\x00": "NUL"}
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
