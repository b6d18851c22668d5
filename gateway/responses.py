"""The ONE place where a Decision (or a refusal's Reason) becomes an HTTP response and a page.

Pages are French unless the browser prefers English; API clients (no ``text/html`` in Accept) get JSON.
No page ever shows a stack trace, a token, or a detail meant for the audit trail only.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from flask import Request, Response, json, render_template

from gateway.i18n import language_of, wording
from gateway.policy.decision import Reason


@dataclass(frozen=True, slots=True)
class Page:
    """How a refusal is answered. Its wording is in the catalogs: ``reason.<code>.title`` and
    ``reason.<code>.message`` (gateway/translations/<language>/LC_MESSAGES/gateway.po)."""

    status: int
    #: Offer the login choices (card / e-CPS) on the page.
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
    Reason.INTERNAL_ERROR: Page(500),
    Reason.UPSTREAM_UNAVAILABLE: Page(502),
    Reason.UPSTREAM_TIMEOUT: Page(504),
    Reason.SESSION_STORE_UNAVAILABLE: Page(503),
    Reason.LIMITS_UNAVAILABLE: Page(503),
    Reason.CSRF_FAILED: Page(403),
    Reason.RATE_LIMITED: Page(429),
    Reason.BANNED: Page(429),
    Reason.QUOTA_EXCEEDED: Page(429, offer_login=True),
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


def render_page(template: str, language: str, **context: object) -> str:
    """A template rendered in ``language``: ``_("key")`` in it reads that language's catalog."""
    return render_template(template, lang=language, _=wording(language), **context)


def refusal(
    reason: Reason,
    request: Request,
    *,
    default_language: str,
    login: LoginLinks | None = None,
    request_id: str = "",
    retry_after: int | None = None,
    as_json: bool = False,
) -> Response:
    """The refusal page (or JSON for API clients; always JSON with ``as_json``, for JSON-only endpoints)."""
    worded, page = page_for(reason)
    language = language_of(request, default_language)
    text = wording(language)
    message = text(f"reason.{worded.value}.message")
    if not as_json and wants_html(request):
        body = render_page(
            "page.html",
            language,
            title=text(f"reason.{worded.value}.title"),
            message=message,
            reason=reason.value,
            login=login if page.offer_login else None,
            request_id=request_id,
        )
        response = Response(body, page.status, content_type="text/html; charset=utf-8")
    else:
        payload: dict[str, object] = {"error": reason.value, "message": message, "request_id": request_id}
        if login is not None and page.offer_login:
            payload["login"] = {k: v for k, v in (("card", login.card), ("ecps", login.ecps)) if v}
        response = Response(json.dumps(payload), page.status, content_type="application/json")
    if page.status == 401:
        response.headers["WWW-Authenticate"] = 'CPS realm="gateway"'
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, int(retry_after)))
    response.headers["X-Gateway-Reason"] = reason.value
    response.headers.extend(SECURITY_HEADERS)
    return response


def login_link(base: str, next_path: str) -> str:
    return f"{base}?next={quote(next_path, safe='/')}"
