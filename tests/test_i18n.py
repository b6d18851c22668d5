"""The page catalogs (gateway/translations): complete in French and English, compiled, typographically right."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from gateway import i18n
from gateway.i18n import CATALOG_DIR, DOMAIN, LANGUAGES, CatalogsMissing, load_catalogs
from gateway.policy.decision import Reason
from gateway.responses import PAGES

#: Reasons of an allowed request: never a page.
NOT_REFUSALS = frozenset({Reason.PUBLIC_ROUTE, Reason.AUTHENTICATED})
PLACEHOLDER = re.compile(r"%\((\w+)\)[sd]")


def source(language: str) -> Path:
    return CATALOG_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"


def catalog(language: str) -> Catalog:
    with source(language).open("rb") as po:
        return read_po(po, locale=language)


def worded(language: str) -> dict[str, tuple[str, ...]]:
    """Every key with a wording (not fuzzy, not empty) in ``language``: its msgstr forms."""
    entries = {}
    for message in catalog(language):
        if not message.id or message.fuzzy:
            continue
        forms = message.string if isinstance(message.string, tuple) else (message.string,)
        if all(forms):
            key = message.id[0] if isinstance(message.id, tuple) else message.id
            entries[key] = tuple(forms)
    return entries


def used_keys() -> set[str]:
    """The keys the code and templates ask for, as Babel's extractors find them."""
    method_map = [("**.py", "python"), ("templates/**.html", "jinja2")]
    keywords = {"_": None, "plural": (1, 2)}
    found = extract_from_dir(str(CATALOG_DIR.parent), method_map=method_map, keywords=keywords)
    return {message if isinstance(message, str) else message[0] for _, _, message, _, _ in found}


def reason_keys() -> set[str]:
    return {
        f"reason.{r.value}.{part}" for r in Reason if r not in NOT_REFUSALS for part in ("title", "message")
    }


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_refusal_reason_has_a_page_and_wording(language: str) -> None:
    assert set(PAGES) == set(Reason) - NOT_REFUSALS
    missing = reason_keys() - set(worded(language))
    assert not missing, f"{language} catalog lacks wording for {sorted(missing)}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_key_the_code_uses_has_wording(language: str) -> None:
    keys = used_keys()
    assert {"page.reference", "login.card", "logout.title"} <= keys  # the extraction sees the templates
    missing = keys - set(worded(language))
    assert not missing, f"{language} catalog lacks {sorted(missing)}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_catalogs_hold_no_unused_wording(language: str) -> None:
    unused = set(worded(language)) - used_keys() - reason_keys()
    assert not unused, f"{language} catalog has wording nothing uses: {sorted(unused)}"


def test_both_languages_fill_the_same_placeholders() -> None:
    french, english = worded("fr"), worded("en")
    for key in french.keys() & english.keys():
        names = {form: set(PLACEHOLDER.findall(form)) for form in french[key] + english[key]}
        assert len({frozenset(n) for n in names.values()}) == 1, f"{key}: {names}"


def test_english_wording_has_no_french_typography() -> None:
    for key, forms in worded("en").items():
        for form in forms:
            assert not re.search(r"\s[:;?!]", form), f"{key}: {form!r}"
            assert "«" not in form and "»" not in form, key


def test_french_wording_never_breaks_a_line_before_its_punctuation() -> None:
    # French sets a space before : ; ? ! — a no-break one, or the browser may wrap the colon alone.
    for key, forms in worded("fr").items():
        for form in forms:
            assert not re.search(r" [:;?!]", form), f"{key}: {form!r}"


def test_a_missing_compiled_catalog_stops_the_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(i18n, "CATALOG_DIR", tmp_path)
    i18n.wording.cache_clear()
    try:
        with pytest.raises(CatalogsMissing, match="make translations"):
            load_catalogs()
    finally:
        i18n.wording.cache_clear()
