"""Refusal pages as a browser gets them: wording from the catalogs, in the browser's language."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from flask import Flask
from flask.testing import FlaskClient


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def visible_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return re.sub(r"[ \t\n]+", " ", " ".join(parser.parts))


def page(client: FlaskClient, path: str, language: str) -> str:
    response = client.get(path, headers={"Accept": "text/html", "Accept-Language": language})
    return response.get_data(as_text=True)


def test_english_pages_carry_no_french_typography(client: FlaskClient) -> None:
    text = visible_text(page(client, "/patients/180017512345678", "en"))
    assert "Reference:" in text
    assert not re.search(r"\s[:;?!]", text), text


def test_french_pages_keep_their_punctuation_on_the_line(client: FlaskClient) -> None:
    text = visible_text(page(client, "/patients/180017512345678", "fr"))
    assert "Référence\u00a0:" in text
    assert not re.search(r" [:;?!]", text), text
