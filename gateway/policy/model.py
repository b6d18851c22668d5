"""The policy model the engine works on: frozen, validated, compiled once by the loader."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from gateway.identity import LoginMethod
from gateway.policy.paths import PathPattern


class Action(enum.StrEnum):
    PUBLIC = "public"
    DENY = "deny"
    AUTHENTICATE = "authenticate"


@dataclass(frozen=True, slots=True)
class LoginRequirement:
    """What an ``authenticate`` rule asks of the login behind the session."""

    #: Accepted login methods; a session made with another one must log in again with an accepted one.
    methods: frozenset[LoginMethod] = frozenset(LoginMethod)
    #: TRE_G15 profession codes allowed; empty = any profession.
    professions: frozenset[str] = frozenset()
    #: Maximum age of the login in seconds (step-up); None = the session's own lifetime.
    max_age: float | None = None
    #: PSC ``authMode`` values accepted for e-CPS logins (e.g. {"CARD"}); empty = any.
    ecps_auth_modes: frozenset[str] = frozenset()
    #: Staff and organisation cards (idNat types 3, 4, 5) are refused unless this is set.
    allow_staff_cards: bool = False


@dataclass(frozen=True, slots=True)
class ResourceKey:
    """Where a quota finds the resource a request reads: a path segment (1-based) or a query parameter."""

    path_segment: int | None = None
    query_parameter: str | None = None


class QuotaBreachAction(enum.StrEnum):
    BLOCK = "block"
    #: Block, destroy the session and require a fresh login.
    REVOKE_SESSION = "revoke_session"


@dataclass(frozen=True, slots=True)
class Quota:
    window: float
    max_requests: int | None = None
    max_distinct: int | None = None
    resource: ResourceKey | None = None
    on_exceed: QuotaBreachAction = QuotaBreachAction.BLOCK


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: Action
    #: Where the rule was written, for ``policy explain``, audit and warnings.
    file: str
    line: int
    patterns: tuple[PathPattern, ...]
    #: Lower-case host, ``*.example.fr`` wildcard, or None for any host.
    host: str | None = None
    #: Upper-case methods; empty = any. A rule naming GET also matches HEAD.
    methods: frozenset[str] = frozenset()
    login: LoginRequirement = field(default_factory=LoginRequirement)
    quota: Quota | None = None
    #: authenticate rules: refuse state-changing requests (POST, PUT, PATCH, DELETE) from other sites (CSRF).
    origin_check: bool = True
    description: str = ""
    #: The route shows health data (patients' records): its login page says so, and only then.
    health_data: bool = False
    _path_regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        source = "|".join(p.regex_source() for p in self.patterns)
        object.__setattr__(self, "_path_regex", re.compile(f"(?:{source})", re.IGNORECASE))

    def matches(self, method: str, host: str, match_path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.host is not None and not host_matches(self.host, host):
            return False
        return self._path_regex.fullmatch(match_path) is not None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern
