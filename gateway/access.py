"""Is this request allowed? Policy match, session, decision, audit — shared by the proxy and forward-auth."""

from __future__ import annotations

import contextlib
import math
import re
import time
import unicodedata
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import unquote_plus

from flask import request

from gateway import metrics
from gateway.access_stream import AccessStream
from gateway.audit import AuditError
from gateway.authn.card.revocation import REVOCATION_EVENT
from gateway.limits import LimitsUnavailable, QuotaSpec, ServedRequest
from gateway.policy.decision import Decision, Outcome, Reason
from gateway.policy.engine import decide_rule
from gateway.policy.model import Action, Quota, QuotaBreachAction, ResourceKey, Rule
from gateway.policy.origin import is_cross_site
from gateway.policy.paths import NormalisedTarget
from gateway.runtime import Gateway, audit_request_event, request_id_of, session_id_of
from gateway.sessions import Session, SessionStoreUnavailable

_NO_RULE = Decision(Outcome.DENY, (Reason.NO_MATCHING_RULE,))


@dataclass(frozen=True, slots=True)
class Access:
    decision: Decision
    rule: Rule | None
    session: Session | None
    now: float
    retry_after: int | None = None
    #: The resource a quota rule counted for this request (its resource key), when it has one.
    resource: str | None = None
    #: This very decision ended the session (a quota breach with revoke_session): pages offer no logout.
    session_ended: bool = False


def check_access(
    gateway: Gateway,
    environ: dict[str, Any],
    method: str,
    host: str,
    target: NormalisedTarget,
    *,
    audit: bool = True,
) -> Access:
    """The decision on ``method host target`` for the request in ``environ`` (its session cookie, its client
    for the audit record). A decision that must be audited and cannot be is a refusal (audit_unavailable).
    ``audit=False``: the caller has the access recorded otherwise (forward-auth's access stream); events
    about the request (a quota breach, a revoked card) are still written here."""
    now = time.time()
    rule = gateway.policies.match(method, host, target.path)
    try:
        access = _decide(gateway, environ, method, rule, target, now)
        if audit and (rule is None or rule.action is not Action.PUBLIC):
            audit_decision(gateway, environ, access, method, target.path)
    except AuditError:
        access = Access(Decision(Outcome.DENY, (Reason.AUDIT_UNAVAILABLE,), rule), rule, None, now)
    metrics.request_decided(access.decision)
    return access


def _decide(
    gateway: Gateway,
    environ: dict[str, Any],
    method: str,
    rule: Rule | None,
    target: NormalisedTarget,
    now: float,
) -> Access:
    if rule is None:
        return Access(_NO_RULE, None, None, now)
    if rule.action is not Action.AUTHENTICATE:
        # Public and deny rules never touch the session store: they keep working when it is down.
        return Access(decide_rule(rule, None, now), rule, None, now)
    if rule.origin_check and is_cross_site(
        method,
        environ.get("HTTP_ORIGIN"),
        environ.get("HTTP_SEC_FETCH_SITE"),
        gateway.settings.server.trusted_origins,
    ):
        # Before the session and the quota: a forged request neither uses nor counts against anything.
        return Access(Decision(Outcome.DENY, (Reason.CROSS_SITE_REQUEST,), rule), rule, None, now)
    try:
        session = session_of(gateway, environ, now)
    except SessionStoreUnavailable:
        decision = Decision(Outcome.DENY, (Reason.SESSION_STORE_UNAVAILABLE,), rule)
        return Access(decision, rule, None, now)
    decision = decide_rule(rule, session.identity if session else None, now)
    access = Access(decision, rule, session, now)
    if decision.allowed and rule.quota is not None and session is not None:
        access = _within_quota(gateway, environ, access, rule, rule.quota, session, target)
    return access


def session_of(gateway: Gateway, environ: dict[str, Any], now: float) -> Session | None:
    session_id = session_id_of(gateway, environ)
    if not session_id:
        return None
    session = gateway.sessions.get(session_id, now)
    verifier = gateway.card_verifier
    if session is not None and verifier is not None and verifier.revoked_since_login(session.identity):
        # A revocation no CRL refresh of this process acted on (it loaded the CRL already listing the card).
        gateway.sessions.delete(session_id)
        audit_request_event(
            gateway,
            environ,
            REVOCATION_EVENT,
            identity=session.identity,
            now=now,
            decision="deny",
            reasons=[Reason.CARD_REVOKED.value],
            card_serial=session.identity.card_serial,
            card_issuer=session.identity.card_issuer,
            sessions_ended=1,
            detected="session_use",
        )
        return None
    return session


def current_session(gateway: Gateway, now: float) -> Session | None:
    """The session of the Flask request being served."""
    return session_of(gateway, request.environ, now)


def audit_decision(gateway: Gateway, environ: dict[str, Any], access: Access, method: str, path: str) -> None:
    audit_request_event(
        gateway,
        environ,
        "decision",
        identity=access.session.identity if access.session else None,
        now=access.now,
        http_method=method,
        path=path,
        rule=access.rule.name if access.rule else None,
        decision=access.decision.outcome.value,
        reasons=[r.value for r in access.decision.reasons],
    )


def _within_quota(
    gateway: Gateway,
    environ: dict[str, Any],
    access: Access,
    rule: Rule,
    quota: Quota,
    session: Session,
    target: NormalisedTarget,
) -> Access:
    """The bulk-access guard: count this read and refuse once the identity's quota is spent."""
    spec = quota_spec(quota)
    try:
        resource = resource_key(quota.resource, target) if quota.resource else None
    except UnidentifiedResource as exc:
        # Never counted: the portal might read another record than the one the guard would count.
        return Access(Decision(Outcome.DENY, (exc.reason,), rule), rule, session, access.now)
    try:
        verdict = gateway.quotas.check_and_count(
            session.identity.idnat,
            rule.name,
            spec,
            resource,
            access.now,
            request_id=request_id_of(environ),
        )
    except LimitsUnavailable:
        return Access(Decision(Outcome.DENY, (Reason.LIMITS_UNAVAILABLE,), rule), rule, session, access.now)
    if verdict.allowed:
        return replace(access, resource=resource)
    ended = False
    if verdict.breach_started:
        _on_breach(gateway, environ, rule, quota, session, verdict.requests, verdict.distinct, access.now)
        ended = quota.on_exceed is QuotaBreachAction.REVOKE_SESSION
    decision = Decision(Outcome.DENY, (Reason.QUOTA_EXCEEDED,), rule)
    return Access(decision, rule, session, access.now, retry_after=verdict.retry_after, session_ended=ended)


def quota_spec(quota: Quota) -> QuotaSpec:
    return QuotaSpec(quota.max_requests, quota.max_distinct, max(1, math.ceil(quota.window)))


def count_served(gateway: Gateway, served: list[ServedRequest]) -> None:
    """Count requests nginx served on quota rules (forward-auth's access stream), with the rules' current
    quotas; a rule that is gone or has no quota any more counts nothing."""
    specs = {rule.name: quota_spec(rule.quota) for rule in gateway.policies.rules if rule.quota is not None}
    counted = [(one, specs[one.rule_name]) for one in served if one.rule_name in specs]
    if counted:
        gateway.quotas.count_served(counted)


def access_stream_reader(gateway: Gateway) -> AccessStream | None:
    """The reader of forward-auth's access log for this process (None without one): workers run it."""
    settings = gateway.settings
    access_log, audit_file = settings.forward_auth.access_log, settings.audit.file
    if access_log is None or audit_file is None:
        return None
    return AccessStream(access_log, audit_file, gateway.audit, count_served=partial(count_served, gateway))


def _on_breach(
    gateway: Gateway,
    environ: dict[str, Any],
    rule: Rule,
    quota: Quota,
    session: Session,
    requests: int,
    distinct: int,
    now: float,
) -> None:
    revoke = quota.on_exceed is QuotaBreachAction.REVOKE_SESSION
    metrics.quota_breach(rule.name, quota.on_exceed.value)
    if revoke:
        # A stolen session draining records dies here, even if the audit below cannot be written; the owner
        # must log in again with the card or e-CPS. If the store is down, the quota still refuses this
        # identity's reads until the window ends.
        with contextlib.suppress(SessionStoreUnavailable):
            gateway.sessions.delete(session.id)
    audit_request_event(
        gateway,
        environ,
        "quota_breach",
        identity=session.identity,
        now=now,
        rule=rule.name,
        decision="deny",
        reasons=[Reason.QUOTA_EXCEEDED.value],
        requests=requests,
        distinct_resources=distinct,
        max_requests=quota.max_requests,
        max_distinct=quota.max_distinct,
        session_revoked=revoke,
    )


class UnidentifiedResource(Exception):
    """The request does not name its resource exactly once, in the one spelling (answered 400)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


#: Levels of percent-encoding looked through in a parameter name (``n%2569r`` is ``nir`` twice decoded).
_NAME_DECODINGS = 4
#: PHP and Rails read ``nir[]=1`` and ``nir[x]=1`` as the parameter ``nir``.
_ARRAY_SUFFIX = re.compile(r"\[[^\]]*\]$")


def resource_key(key: ResourceKey, target: NormalisedTarget) -> str:
    """The resource a request reads (e.g. the patient's NIR): a path segment or a query parameter.

    Raises UnidentifiedResource when it is missing (a quota rule's request without its resource: it could
    read anything), or when a query names it more than once or in another spelling (``?nir=a&nir=b``,
    ``?NIR=b``, ``?n%69r=b``, ``?nir[]=b``), or when the query holds a ``;`` (a separator for some
    frameworks only): portals read the first, the last, both, or ignore case, so the guard could count one
    record while the portal serves another.
    """
    if key.path_segment is not None:
        segments = [s for s in target.path.split("/") if s]
        index = key.path_segment - 1
        if index >= len(segments):
            raise UnidentifiedResource(Reason.RESOURCE_MISSING, f"no path segment {key.path_segment}")
        return segments[index]
    assert key.query_parameter is not None
    wanted = key.query_parameter
    if ";" in target.query:
        # A parameter separator for some frameworks only: "x=1;nir=2" names nir for them, not for others.
        raise UnidentifiedResource(Reason.RESOURCE_AMBIGUOUS, "';' in the query string")
    named = [
        (name, value)
        for name, _, value in (part.partition("=") for part in target.query.split("&") if part)
        if _parameter_identity(name) == _parameter_identity(wanted)
    ]
    if len(named) > 1:
        raise UnidentifiedResource(
            Reason.RESOURCE_AMBIGUOUS, f"query parameter {wanted!r} given {len(named)} times"
        )
    if named and named[0][0] != wanted:
        raise UnidentifiedResource(Reason.RESOURCE_AMBIGUOUS, f"query parameter {wanted!r} spelled otherwise")
    value = unquote_plus(named[0][1]) if named else ""
    if not value:
        raise UnidentifiedResource(Reason.RESOURCE_MISSING, f"no query parameter {wanted!r}")
    return value


def _parameter_identity(name: str) -> str:
    """What any portal could take a parameter name for: fully decoded, case-folded, NFKC, no ``[...]``."""
    for _ in range(_NAME_DECODINGS):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    folded = unicodedata.normalize("NFKC", name).casefold().strip()
    return _ARRAY_SUFFIX.sub("", folded)
