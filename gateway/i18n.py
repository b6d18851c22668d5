"""The wording of the gateway's pages: gettext catalogs, one per language, read once per process.

The catalogs are ``translations/<language>/LC_MESSAGES/gateway.po`` (edited by hand: the msgids are stable
keys such as ``reason.card_revoked.title``, the msgstrs the wording in that language). Every build compiles
them to ``gateway.mo`` with Babel (setup.py runs Babel's ``compile_catalog`` before packaging, so a wheel
carries them; ``make translations`` does it in a checkout); the runtime needs only the standard library.
"""

from __future__ import annotations

import functools
import gettext
from pathlib import Path

from flask import Request

LANGUAGES = ("fr", "en")
DOMAIN = "gateway"
CATALOG_DIR = Path(__file__).resolve().parent / "translations"


class CatalogsMissing(RuntimeError):
    """A compiled catalog is absent: the package was not built (``pip install``) or not compiled."""


class Wording:
    """The messages of one language; ``wording("key", name=value)`` fills ``%(name)s`` placeholders."""

    def __init__(self, language: str, translations: gettext.NullTranslations) -> None:
        self.language = language
        self._translations = translations

    def __call__(self, key: str, **values: object) -> str:
        text = self._translations.gettext(key)
        return text % values if values else text

    def plural(self, key: str, plural_key: str, count: int, **values: object) -> str:
        """The form for ``count`` (fr: 1 minute, 2 minutes; en: 1 minute, 0 minutes); ``%(count)d`` is set."""
        return self._translations.ngettext(key, plural_key, count) % {"count": count, **values}


@functools.cache
def wording(language: str) -> Wording:
    if language not in LANGUAGES:
        raise ValueError(f"no catalog for language {language!r} (available: {', '.join(LANGUAGES)})")
    try:
        translations = gettext.translation(DOMAIN, CATALOG_DIR, languages=[language])
    except FileNotFoundError:
        raise CatalogsMissing(
            f"the compiled page catalogs are missing ({CATALOG_DIR}/<language>/LC_MESSAGES/{DOMAIN}.mo): "
            "install the package with pip, or run `make translations` in a source checkout"
        ) from None
    return Wording(language, translations)


def load_catalogs() -> None:
    """Read every catalog now (at start-up), so a missing one stops the gateway instead of a page."""
    for language in LANGUAGES:
        wording(language)


def language_of(request: Request, default: str) -> str:
    """The browser's preferred language among ours (Accept-Language), else the configured default."""
    return request.accept_languages.best_match(LANGUAGES) or default
