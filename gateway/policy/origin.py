"""Cross-site request refusal for state-changing requests (CSRF), decided from the request's own headers.

Browsers say where a request comes from: ``Sec-Fetch-Site`` (``same-origin``, ``same-site``, ``cross-site``,
``none`` for a typed URL or a bookmark) on every request since 2023, and ``Origin`` on every POST. A page on
another site can make a browser POST to the portal with the professional's session cookie (SameSite=Lax
stops it for the cookie only in browsers that enforce it, and never for a sibling sub-domain); these headers
cannot be forged by such a page. Clients that send neither (curl, scripts with a cookie jar) are not
browsers: a cross-site page cannot drive them, so they pass. The algorithm is Go's net/http
CrossOriginProtection, with the configured origins in place of the Host header.
"""

from __future__ import annotations

#: Methods that never change state (RFC 9110 9.2.1): never refused for their origin.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Sec-Fetch-Site values of a request the portal's own pages (or the user) made.
_SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})


def is_cross_site(method: str, origin: str | None, fetch_site: str | None, trusted: frozenset[str]) -> bool:
    """True when a state-changing request comes from a page outside ``trusted`` origins (lower-case
    ``scheme://host[:port]``, the portal's own included)."""
    if method in SAFE_METHODS:
        return False
    if fetch_site is not None and fetch_site.strip().lower() in _SAME_ORIGIN_SITES:
        return False
    if origin is None:
        # Sec-Fetch-Site without Origin on a POST does not happen in browsers; neither header: not a browser.
        return fetch_site is not None
    return origin.strip().lower() not in trusted


#: Sec-Fetch-Site values of a request another site's page made.
_OTHER_SITES = frozenset({"cross-site", "same-site"})


def is_embedded_by_another_site(
    fetch_site: str | None, fetch_mode: str | None, fetch_dest: str | None, purpose: str | None = None
) -> bool:
    """True for a request another site's page made other than by navigating the whole tab or window to it:
    an ``<img>``, a script, a fetch (Sec-Fetch-Mode not ``navigate``), an ``<iframe>``, ``<object>`` or
    ``<embed>`` (Sec-Fetch-Dest not ``document``), or a prefetch (``Sec-Purpose``). Never how a professional
    reaches a login step (a link, PSC's redirect back, a typed address), always how a page could spend a
    hospital NAT's login budget unseen, a hundred frames at a time. A missing Sec-Fetch-Mode with a
    Sec-Fetch-Site is no browser's (they shipped together): refused; a missing Sec-Fetch-Dest is Chrome
    before 80 (it came later): judged by the mode."""
    if purpose is not None and "prefetch" in purpose.lower():
        return True  # a speculative load, maybe of another site's choosing: never a login
    if fetch_site is None or fetch_site.strip().lower() not in _OTHER_SITES:
        return False
    if fetch_mode is None or fetch_mode.strip().lower() != "navigate":
        return True
    return fetch_dest is not None and fetch_dest.strip().lower() != "document"
