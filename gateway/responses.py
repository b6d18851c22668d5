"""The ONE place where a Decision (or a refusal's Reason) becomes an HTTP response and a page.

Pages are French unless the browser prefers English; API clients (no ``text/html`` in Accept) get JSON.
No page ever shows a stack trace, a token, or a detail meant for the audit trail only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import quote

from flask import Request, Response, json, render_template

from gateway.i18n import Wording, language_of, wording
from gateway.identity import LoginMethod
from gateway.policy.decision import Reason
from gateway.policy.model import Action, Rule


@dataclass(frozen=True, slots=True)
class Page:
    """How a refusal is answered. Its wording is in the catalogs: ``reason.<code>.title`` and
    ``reason.<code>.message`` (gateway/translations/<language>/LC_MESSAGES/gateway.po)."""

    status: int
    #: Offer the login methods the destination's rule accepts (card / e-CPS) on the page.
    offer_login: bool = False


PAGES: dict[Reason, Page] = {
    Reason.UNAUTHENTICATED: Page(401, offer_login=True),
    Reason.LOGIN_METHOD_NOT_ACCEPTED: Page(401, offer_login=True),
    Reason.LOGIN_TOO_OLD: Page(401, offer_login=True),
    Reason.AUTH_MODE_NOT_ACCEPTED: Page(401, offer_login=True),
    Reason.PROFESSION_NOT_ALLOWED: Page(403),
    Reason.STAFF_CARD_NOT_ALLOWED: Page(403),
    Reason.NO_MATCHING_RULE: Page(403),
    Reason.DENIED_BY_RULE: Page(403),
    Reason.BAD_REQUEST_PATH: Page(400),
    Reason.BAD_HOST: Page(400),
    Reason.HOST_NOT_ALLOWED: Page(400),
    Reason.METHOD_NOT_ALLOWED: Page(405),
    Reason.UNKNOWN_GATEWAY_PATH: Page(404),
    Reason.INTERNAL_ERROR: Page(500),
    Reason.UPSTREAM_UNAVAILABLE: Page(502),
    Reason.UPSTREAM_TIMEOUT: Page(504),
    Reason.UPSTREAM_BUSY: Page(503),
    Reason.CLIENT_TIMEOUT: Page(408),
    Reason.BAD_REQUEST_BODY: Page(400),
    Reason.BAD_REQUEST_HEADER: Page(400),
    Reason.REQUEST_TOO_LARGE: Page(413),
    Reason.SESSION_STORE_UNAVAILABLE: Page(503),
    Reason.LIMITS_UNAVAILABLE: Page(503),
    Reason.AUDIT_UNAVAILABLE: Page(503),
    Reason.CSRF_FAILED: Page(403),
    Reason.CROSS_SITE_REQUEST: Page(403),
    Reason.RATE_LIMITED: Page(429),
    Reason.BANNED: Page(429),
    # No login choices: a fresh login would not lift the quota, only the end of its window does.
    Reason.QUOTA_EXCEEDED: Page(429),
    Reason.RESOURCE_AMBIGUOUS: Page(400),
    Reason.RESOURCE_MISSING: Page(400),
    Reason.CARD_MISSING: Page(401, offer_login=True),
    Reason.CARD_UNTRUSTED: Page(403),
    Reason.CARD_EXPIRED: Page(403),
    Reason.CARD_NOT_YET_VALID: Page(403),
    Reason.CARD_REVOKED: Page(403),
    Reason.CARD_BAD_KEY_USAGE: Page(403),
    Reason.CARD_UNKNOWN_PROFESSION: Page(403),
    Reason.CARD_MALFORMED: Page(400),
    Reason.CRL_UNAVAILABLE: Page(503),
    Reason.CHALLENGE_INVALID: Page(401),
    Reason.SIGNATURE_INVALID: Page(401),
    Reason.IDP_UNAVAILABLE: Page(503, offer_login=True),
    Reason.LOGIN_CANCELLED: Page(401, offer_login=True),
    Reason.STATE_MISMATCH: Page(400, offer_login=True),
    Reason.TOKEN_INVALID: Page(401, offer_login=True),
    Reason.ACR_NOT_ACCEPTED: Page(403, offer_login=True),
    Reason.IDP_ERROR: Page(502, offer_login=True),
    Reason.SPOOFED_HEADER: Page(403),
}
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; form-action 'self' https:; frame-ancestors 'none'",
    ),
)


def page_for(reason: Reason) -> tuple[Reason, Page]:
    """The page of ``reason`` and the Reason whose wording it shows (its own; a generic denial for the
    Reasons that are not refusals)."""
    page = PAGES.get(reason)
    return (reason, page) if page is not None else (Reason.DENIED_BY_RULE, PAGES[Reason.DENIED_BY_RULE])


def wants_html(request: Request) -> bool:
    """A page for browsers; JSON for API clients and for requests that themselves carry JSON."""
    if request.is_json:
        return False
    accept = request.accept_mimetypes
    return accept.accept_html or not accept.provided


@dataclass(frozen=True, slots=True)
class LoginLinks:
    """Where the login choices on a page lead (None: that method is not configured here)."""

    card: str | None
    ecps: str | None

    def accepted_by(self, rule: Rule | None) -> LoginLinks:
        """Only the methods ``rule`` accepts: a choice the rule refuses would lead back to this page."""
        accepted = accepted_methods(rule)
        return LoginLinks(
            card=self.card if LoginMethod.CARD in accepted else None,
            ecps=self.ecps if LoginMethod.ECPS in accepted else None,
        )


@dataclass(frozen=True, slots=True)
class WayForward:
    """Where a refused professional goes on from any page."""

    #: The portal's home page.
    home: str
    #: The logout page, when the browser holds a gateway session.
    logout: str | None = None
    #: Whom to contact (``server.support_contact``).
    contact: str | None = None


def accepted_methods(rule: Rule | None) -> frozenset[LoginMethod]:
    if rule is None or rule.action is not Action.AUTHENTICATE:
        return frozenset(LoginMethod)
    return rule.login.methods


def render_page(template: str, language: str, **context: object) -> str:
    """A template rendered in ``language``: ``_("key")`` in it reads that language's catalog."""
    return render_template(template, lang=language, _=wording(language), **context)


def refusal(
    reason: Reason,
    request: Request,
    *,
    default_language: str,
    way_forward: WayForward,
    login: LoginLinks | None = None,
    rule: Rule | None = None,
    request_id: str = "",
    retry_after: int | None = None,
    as_json: bool = False,
) -> Response:
    """The refusal page (or JSON for API clients; always JSON with ``as_json``, for JSON-only endpoints).

    ``rule`` guards the page the professional wanted: it decides which login methods are offered and what
    the page says about them. The reason code appears only in the reference line (and the headers)."""
    worded, page = page_for(reason)
    language = language_of(request, default_language)
    _ = wording(language)
    offered = login.accepted_by(rule) if login is not None and page.offer_login else None
    message = _(f"reason.{worded.value}.message")
    details = _details(_, worded, page, rule, retry_after)
    if not as_json and wants_html(request):
        body = render_page(
            "page.html",
            language,
            title=_(f"reason.{worded.value}.title"),
            message=message,
            details=details,
            login=offered,
            way_forward=way_forward,
            reason=reason.value,
            request_id=request_id,
        )
        response = Response(body, page.status, content_type="text/html; charset=utf-8")
    else:
        payload: dict[str, object] = {
            "error": reason.value,
            "message": " ".join((message, *details)),
            "request_id": request_id,
        }
        if offered is not None:
            payload["login"] = {k: v for k, v in (("card", offered.card), ("ecps", offered.ecps)) if v}
        response = Response(json.dumps(payload), page.status, content_type="application/json")
    if page.status == 401:
        response.headers["WWW-Authenticate"] = 'CPS realm="gateway"'
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, int(retry_after)))
    response.headers["X-Gateway-Reason"] = reason.value
    response.headers.extend(SECURITY_HEADERS)
    return response


def _details(_: Wording, reason: Reason, page: Page, rule: Rule | None, retry_after: int | None) -> list[str]:
    """What the page adds to its message: what the destination holds and needs, when access returns."""
    lines = []
    if page.offer_login:
        if rule is not None and rule.health_data:
            lines.append(_("page.health_data"))
        accepted = accepted_methods(rule)
        if accepted == {LoginMethod.CARD}:
            lines.append(_("login.needs_card"))
        elif accepted == {LoginMethod.ECPS}:
            lines.append(_("login.needs_ecps"))
        max_age = rule.login.max_age if rule is not None else None
        if reason is Reason.LOGIN_TOO_OLD and max_age is not None:
            lines.append(_("login.max_age", duration=duration_in_words(_, max_age)))
    if page.status == 429 and retry_after is not None:
        lines.append(_("page.access_returns", duration=duration_in_words(_, retry_after)))
    return lines


def duration_in_words(_: Wording, seconds: float) -> str:
    """A delay as a person says it, rounded up: 45 seconds, 3 minutes, 1 hour and 5 minutes."""
    whole = max(1, math.ceil(seconds))
    if whole < 60:
        return _.plural("duration.second", "duration.seconds", whole)
    minutes = math.ceil(whole / 60)
    if minutes < 60:
        return _.plural("duration.minute", "duration.minutes", minutes)
    hours, minutes = divmod(minutes, 60)
    in_hours = _.plural("duration.hour", "duration.hours", hours)
    if not minutes:
        return in_hours
    return _(
        "duration.hours_and_minutes",
        hours=in_hours,
        minutes=_.plural("duration.minute", "duration.minutes", minutes),
    )


#: The longest destination a login carries back: the login link travels in a header nginx reads into one
#: buffer with the rest of the answer's head (forward-auth; ``proxy_buffer_size``, 4 KiB by default), where
#: percent-encoding may triple it, and the e-CPS login cookie must stay under a browser's 4 KB.
MAX_NEXT_PATH = 1024


def bounded_next_path(next_path: str) -> str:
    """``next_path``, without its query when that makes it too long, or ``/`` when its path alone is."""
    if len(next_path) <= MAX_NEXT_PATH:
        return next_path
    path = next_path.partition("?")[0]
    return path if len(path) <= MAX_NEXT_PATH else "/"


def login_link(base: str, next_path: str) -> str:
    return f"{base}?next={quote(bounded_next_path(next_path), safe='/')}"
