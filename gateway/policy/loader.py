"""Policy files (YAML text) -> a validated, compiled :class:`PolicySet`, with every error located.

Pure: the caller reads the files and passes ``{file name: text}``; this module never touches the disk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
from pydantic import ConfigDict, Field, field_validator, model_validator

from gateway.config_source import (
    ConfigError,
    ConfigErrors,
    Duration,
    LocatedDocument,
    parse_yaml,
    validate,
)
from gateway.identity import LoginMethod
from gateway.policy.engine import PolicySet
from gateway.policy.model import (
    Action,
    LoginRequirement,
    Quota,
    QuotaBreachAction,
    ResourceKey,
    Rule,
)
from gateway.policy.paths import PathPattern, parse_pattern
from gateway.professions import PROFESSIONS

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_RULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_HOST = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class _Spec(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class _MatchSpec(_Spec):
    host: str | None = None
    path: str | None = None
    paths: list[str] | None = None
    methods: list[str] = Field(default_factory=list)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower().rstrip(".")
        if not _HOST.match(host):
            raise ValueError(f"{value!r} is not a host name (a name or '*.domain', without port)")
        return host

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None:
            parse_pattern(value)
        return value

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one path pattern")
            for pattern in value:
                parse_pattern(pattern)
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        methods = []
        for method in value:
            upper = str(method).upper()
            if upper not in HTTP_METHODS:
                raise ValueError(f"unknown HTTP method {method!r} (use {', '.join(HTTP_METHODS)})")
            methods.append(upper)
        return methods

    @model_validator(mode="after")
    def _one_path_key(self) -> _MatchSpec:
        if (self.path is None) == (self.paths is None):
            raise ValueError("give exactly one of 'path' or 'paths'")
        return self


class _LoginSpec(_Spec):
    methods: list[LoginMethod] = Field(default_factory=lambda: list(LoginMethod))
    professions: list[str] = Field(default_factory=list)
    max_age: Duration | None = None
    ecps_auth_modes: list[str] = Field(default_factory=list)
    allow_staff_cards: bool = False

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and not value:
            raise ValueError("give at least one login method (card, ecps)")
        return value

    @field_validator("professions", mode="before")
    @classmethod
    def _professions(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        codes = []
        for code in value:
            text = str(code)
            if text not in PROFESSIONS:
                raise ValueError(
                    f"unknown TRE_G15 profession code {code!r} (known: {', '.join(PROFESSIONS)})"
                )
            codes.append(text)
        return codes


class _ResourceSpec(_Spec):
    path_segment: int | None = Field(default=None, ge=1)
    query_parameter: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> _ResourceSpec:
        if (self.path_segment is None) == (self.query_parameter is None):
            raise ValueError("give exactly one of 'path_segment' or 'query_parameter'")
        return self


class _QuotaSpec(_Spec):
    window: Duration
    max_requests: int | None = Field(default=None, ge=1)
    max_distinct: int | None = Field(default=None, ge=1)
    resource: _ResourceSpec | None = None
    on_exceed: QuotaBreachAction = QuotaBreachAction.BLOCK

    @model_validator(mode="after")
    def _coherent(self) -> _QuotaSpec:
        if self.max_requests is None and self.max_distinct is None:
            raise ValueError("a quota needs 'max_requests', 'max_distinct' or both")
        if self.max_distinct is not None and self.resource is None:
            raise ValueError("'max_distinct' needs 'resource' (path_segment or query_parameter)")
        return self


class _RuleSpec(_Spec):
    name: str
    description: str = ""
    match: _MatchSpec
    action: Action
    login: _LoginSpec | None = None
    quota: _QuotaSpec | None = None
    health_data: bool = False
    origin_check: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _RULE_NAME.match(value):
            raise ValueError("a rule name is lower-case letters, digits, '-', '_' or '.' (at most 63)")
        return value

    @model_validator(mode="after")
    def _blocks_fit_action(self) -> _RuleSpec:
        if self.action is not Action.AUTHENTICATE:
            for key in ("login", "quota", "origin_check"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{key}' only applies to action 'authenticate'")
            if self.health_data:
                raise ValueError("'health_data' only applies to action 'authenticate'")
        return self


class _PolicyFileSpec(_Spec):
    rules: list[_RuleSpec] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    file: str
    line: int | None
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: rule '{self.rule}': {self.message}"


@dataclass(frozen=True, slots=True)
class LoadedPolicies:
    policy_set: PolicySet
    warnings: tuple[PolicyWarning, ...]


def load_policies(sources: Mapping[str, str]) -> LoadedPolicies:
    """Validate every file, then every cross-file constraint; raise ConfigErrors listing them all."""
    errors: list[ConfigError] = []
    rules: list[Rule] = []
    if not sources:
        errors.append(
            ConfigError("policies", None, "", "no policy file found: every request would be denied")
        )
    for file in sorted(sources):
        try:
            document = parse_yaml(sources[file], file)
            spec = validate(_PolicyFileSpec, document)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
            continue
        rules.extend(_compile(rule, index, document) for index, rule in enumerate(spec.rules))
    errors.extend(_duplicate_names(rules))
    if errors:
        raise ConfigErrors(errors)
    return LoadedPolicies(PolicySet(tuple(rules), tuple(sorted(sources))), tuple(_unreachable_rules(rules)))


def _compile(spec: _RuleSpec, index: int, document: LocatedDocument) -> Rule:
    patterns = tuple(
        parse_pattern(p) for p in ([spec.match.path] if spec.match.path else spec.match.paths or [])
    )
    methods = set(spec.match.methods)
    if "GET" in methods:
        methods.add("HEAD")  # HEAD is GET without the body: it must never escape a GET rule
    login = spec.login or _LoginSpec()
    return Rule(
        name=spec.name,
        action=spec.action,
        file=document.file,
        line=document.line_of(("rules", index)) or 0,
        patterns=patterns,
        host=spec.match.host,
        methods=frozenset(methods),
        login=LoginRequirement(
            methods=frozenset(login.methods),
            professions=frozenset(login.professions),
            max_age=login.max_age,
            ecps_auth_modes=frozenset(login.ecps_auth_modes),
            allow_staff_cards=login.allow_staff_cards,
        ),
        quota=_quota(spec.quota),
        origin_check=spec.origin_check is not False,
        description=spec.description,
        health_data=spec.health_data,
    )


def _quota(spec: _QuotaSpec | None) -> Quota | None:
    if spec is None:
        return None
    resource = None
    if spec.resource is not None:
        resource = ResourceKey(spec.resource.path_segment, spec.resource.query_parameter)
    return Quota(spec.window, spec.max_requests, spec.max_distinct, resource, spec.on_exceed)


def _duplicate_names(rules: list[Rule]) -> list[ConfigError]:
    first_seen: dict[str, Rule] = {}
    errors = []
    for rule in rules:
        if rule.name in first_seen:
            earlier = first_seen[rule.name]
            message = f"duplicate rule name '{rule.name}' (first defined at {earlier.where})"
            errors.append(ConfigError(rule.file, rule.line, "name", message))
        else:
            first_seen[rule.name] = rule
    return errors


def _unreachable_rules(rules: list[Rule]) -> list[PolicyWarning]:
    """Rules that an earlier rule always matches first: they can never apply."""
    warnings = []
    for position, rule in enumerate(rules):
        for earlier in rules[:position]:
            if _shadows(earlier, rule):
                message = (
                    f"can never match: rule '{earlier.name}' ({earlier.where}) matches all its requests first"
                )
                warnings.append(PolicyWarning(rule.file, rule.line, rule.name, message))
                break
    return warnings


def _shadows(earlier: Rule, later: Rule) -> bool:
    if earlier.host is not None and not _host_covers(earlier.host, later.host):
        return False
    if earlier.methods and (not later.methods or not later.methods <= earlier.methods):
        return False
    return all(_any_covers(earlier.patterns, pattern) for pattern in later.patterns)


def _any_covers(patterns: tuple[PathPattern, ...], pattern: PathPattern) -> bool:
    return any(candidate.covers(pattern) for candidate in patterns)


def _host_covers(pattern: str, host: str | None) -> bool:
    if host is None:
        return False
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host
