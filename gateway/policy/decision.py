"""What the gateway decided about a request, and why, as named reasons.

Every module that refuses something says so with a :class:`Reason`; ``gateway.responses`` alone turns
reasons into HTTP responses and pages (Pomerium's evaluator / check_response split).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.policy.model import Rule


class Outcome(enum.StrEnum):
    ALLOW = "allow"
    #: A (fresh) strong login would let the request through: show the login page / answer 401.
    LOGIN = "login"
    DENY = "deny"


class Reason(enum.StrEnum):
    """Named reasons; the value is the stable code used in audit records, metrics and page lookups."""

    # Policy engine
    PUBLIC_ROUTE = "public_route"
    AUTHENTICATED = "authenticated"
    NO_MATCHING_RULE = "no_matching_rule"
    DENIED_BY_RULE = "denied_by_rule"
    UNAUTHENTICATED = "unauthenticated"
    LOGIN_METHOD_NOT_ACCEPTED = "login_method_not_accepted"
    LOGIN_TOO_OLD = "login_too_old"
    PROFESSION_NOT_ALLOWED = "profession_not_allowed"
    AUTH_MODE_NOT_ACCEPTED = "auth_mode_not_accepted"
    STAFF_CARD_NOT_ALLOWED = "staff_card_not_allowed"
    # Request hygiene
    BAD_REQUEST_PATH = "bad_request_path"
    BAD_HOST = "bad_host"
    HOST_NOT_ALLOWED = "host_not_allowed"
    SPOOFED_HEADER = "spoofed_header"
    #: A method the gateway never forwards (TRACE, CONNECT, WebDAV's...).
    METHOD_NOT_ALLOWED = "method_not_allowed"
    #: A path under /.gateway/ that is none of the gateway's own pages (never passed on to the portal).
    UNKNOWN_GATEWAY_PATH = "unknown_gateway_path"
    # The gateway itself
    INTERNAL_ERROR = "internal_error"
    #: The audit trail cannot be written: nothing that must be audited is done.
    AUDIT_UNAVAILABLE = "audit_unavailable"
    # Upstream
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    #: The worker already forwards upstream.max_concurrent requests (a slow portal): refused at once.
    UPSTREAM_BUSY = "upstream_busy"
    # The client
    CLIENT_TIMEOUT = "client_timeout"
    #: The request body is malformed (bad chunked framing, cut short): refused, nothing forwarded.
    BAD_REQUEST_BODY = "bad_request_body"
    #: A request header the gateway reads is malformed (a Cookie header that is not UTF-8): refused.
    BAD_REQUEST_HEADER = "bad_request_header"
    #: The request body is larger than the gateway's own endpoints accept.
    REQUEST_TOO_LARGE = "request_too_large"
    # Card login
    CARD_MISSING = "card_missing"
    CARD_UNTRUSTED = "card_untrusted"
    CARD_EXPIRED = "card_expired"
    CARD_NOT_YET_VALID = "card_not_yet_valid"
    CARD_REVOKED = "card_revoked"
    CARD_BAD_KEY_USAGE = "card_bad_key_usage"
    CARD_UNKNOWN_PROFESSION = "card_unknown_profession"
    CARD_MALFORMED = "card_malformed"
    CRL_UNAVAILABLE = "crl_unavailable"
    CHALLENGE_INVALID = "challenge_invalid"
    SIGNATURE_INVALID = "signature_invalid"
    # e-CPS login (Pro Santé Connect)
    IDP_UNAVAILABLE = "idp_unavailable"
    LOGIN_CANCELLED = "login_cancelled"
    STATE_MISMATCH = "state_mismatch"
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - a reason code, not a secret
    ACR_NOT_ACCEPTED = "acr_not_accepted"
    #: PSC answered the authorization request with an error (invalid_request, login_required...).
    IDP_ERROR = "idp_error"
    # Sessions and limits
    SESSION_STORE_UNAVAILABLE = "session_store_unavailable"
    LIMITS_UNAVAILABLE = "limits_unavailable"
    CSRF_FAILED = "csrf_failed"
    #: A state-changing request (or a login request) sent by a page of another site.
    CROSS_SITE_REQUEST = "cross_site_request"
    RATE_LIMITED = "rate_limited"
    BANNED = "banned"
    QUOTA_EXCEEDED = "quota_exceeded"
    #: A quota rule's request that names its resource more than once or in another spelling.
    RESOURCE_AMBIGUOUS = "resource_ambiguous"
    #: A quota rule's request that does not name its resource.
    RESOURCE_MISSING = "resource_missing"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reasons: tuple[Reason, ...]
    #: The rule that matched, None when none did (default deny) or before matching.
    rule: Rule | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    @property
    def reason(self) -> Reason:
        """The main reason (the first)."""
        return self.reasons[0]
