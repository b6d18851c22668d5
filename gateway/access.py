"""Is this request allowed? Policy match, session, decision, audit — shared by the proxy and forward-auth."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flask import request

from gateway import metrics
from gateway.policy.decision import Decision, Outcome, Reason
from gateway.policy.engine import decide_rule
from gateway.policy.model import Action, Rule
from gateway.policy.paths import NormalisedTarget
from gateway.runtime import Gateway, client_ip, request_id
from gateway.sessions import Session, SessionStoreUnavailable

_NO_RULE = Decision(Outcome.DENY, (Reason.NO_MATCHING_RULE,))


@dataclass(frozen=True, slots=True)
class Access:
    decision: Decision
    rule: Rule | None
    session: Session | None
    now: float


def check_access(gateway: Gateway, method: str, host: str, target: NormalisedTarget) -> Access:
    now = time.time()
    rule = gateway.policies.match(method, host, target.path)
    if rule is None:
        access = Access(_NO_RULE, None, None, now)
    elif rule.action is not Action.AUTHENTICATE:
        # Public and deny rules never touch the session store: they keep working when it is down.
        access = Access(decide_rule(rule, None, now), rule, None, now)
    else:
        try:
            session = current_session(gateway, now)
        except SessionStoreUnavailable:
            decision = Decision(Outcome.DENY, (Reason.SESSION_STORE_UNAVAILABLE,), rule)
            access = Access(decision, rule, None, now)
        else:
            decision = decide_rule(rule, session.identity if session else None, now)
            access = Access(decision, rule, session, now)
    if rule is None or rule.action is not Action.PUBLIC:
        audit_decision(gateway, access, method, target.path)
    metrics.request_decided(access.decision)
    return access


def current_session(gateway: Gateway, now: float) -> Session | None:
    session_id = request.cookies.get(gateway.settings.sessions.cookie_name)
    if not session_id:
        return None
    return gateway.sessions.get(session_id, now)


def audit_decision(gateway: Gateway, access: Access, method: str, path: str) -> None:
    identity = access.session.identity if access.session else None
    gateway.audit.record(
        "decision",
        now=access.now,
        request_id=request_id(),
        client_ip=client_ip(gateway),
        idnat=identity.idnat if identity else None,
        method=identity.method.value if identity else None,
        auth_mode=identity.auth_mode if identity else None,
        http_method=method,
        path=path,
        rule=access.rule.name if access.rule else None,
        decision=access.decision.outcome.value,
        reasons=[r.value for r in access.decision.reasons],
    )
