"""decide(request facts, identity, now) -> Decision. Pure: no I/O, no clock, no framework."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.identity import Identity, LoginMethod
from gateway.policy.decision import Decision, Outcome, Reason
from gateway.policy.model import Action, Rule
from gateway.policy.paths import matching_path

_NO_RULE = Decision(Outcome.DENY, (Reason.NO_MATCHING_RULE,))


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Rules in evaluation order (files by name, rules in file order): the first that matches wins."""

    rules: tuple[Rule, ...]
    files: tuple[str, ...] = ()

    def match(self, method: str, host: str, path: str) -> Rule | None:
        """The rule for a request; ``path`` is the normalised path, ``host`` lower-case without port."""
        candidate = matching_path(path)
        for rule in self.rules:
            if rule.matches(method, host, candidate):
                return rule
        return None

    def decide(self, method: str, host: str, path: str, identity: Identity | None, now: float) -> Decision:
        rule = self.match(method, host, path)
        if rule is None:
            return _NO_RULE
        return decide_rule(rule, identity, now)


def decide_rule(rule: Rule, identity: Identity | None, now: float) -> Decision:
    if rule.action is Action.PUBLIC:
        return Decision(Outcome.ALLOW, (Reason.PUBLIC_ROUTE,), rule)
    if rule.action is Action.DENY:
        return Decision(Outcome.DENY, (Reason.DENIED_BY_RULE,), rule)
    if identity is None:
        return Decision(Outcome.LOGIN, (Reason.UNAUTHENTICATED,), rule)
    reasons = _unmet_requirements(rule, identity, now)
    if not reasons:
        return Decision(Outcome.ALLOW, (Reason.AUTHENTICATED,), rule)
    # Who the person is cannot change by logging in again; how and when they logged in can.
    final = {Reason.PROFESSION_NOT_ALLOWED, Reason.STAFF_CARD_NOT_ALLOWED}
    outcome = Outcome.DENY if final.intersection(reasons) else Outcome.LOGIN
    return Decision(outcome, tuple(reasons), rule)


def _unmet_requirements(rule: Rule, identity: Identity, now: float) -> Sequence[Reason]:
    login = rule.login
    reasons: list[Reason] = []
    if identity.is_staff_or_organisation and not login.allow_staff_cards:
        reasons.append(Reason.STAFF_CARD_NOT_ALLOWED)
    if login.professions and login.professions.isdisjoint(identity.professions):
        reasons.append(Reason.PROFESSION_NOT_ALLOWED)
    if identity.method not in login.methods:
        reasons.append(Reason.LOGIN_METHOD_NOT_ACCEPTED)
    elif (
        identity.method is LoginMethod.ECPS
        and login.ecps_auth_modes
        and identity.auth_mode not in login.ecps_auth_modes
    ):
        reasons.append(Reason.AUTH_MODE_NOT_ACCEPTED)
    if login.max_age is not None and now - identity.auth_time > login.max_age:
        reasons.append(Reason.LOGIN_TOO_OLD)
    return reasons
