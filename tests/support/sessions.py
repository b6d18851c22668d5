"""A gateway session made directly in the store of an in-process gateway (Flask test client)."""

from __future__ import annotations

import time

from flask import Flask
from flask.testing import FlaskClient

from gateway.identity import Identity, LoginMethod
from gateway.runtime import gateway_of

COOKIE = "__Host-gateway-session"


def login(app: Flask, client: FlaskClient, **fields: object) -> str:
    """A doctor logged in by card just now (``fields`` override), the cookie set in ``client``."""
    values: dict = {
        "idnat": "810001234567",
        "method": LoginMethod.CARD,
        "auth_time": time.time(),
        "professions": ("10",),
        "surname": "DUPONT",
        "given_name": "JEAN",
        "auth_mode": "CARD",
        # A card login names its certificate: a gateway with card login ends sessions that name none.
        "card_serial": "1A2B3C",
        "card_issuer": "CN=TEST AC IGC-SANTE ELEMENTAIRE PERSONNES,OU=IGC-SANTE TEST,O=ASIP-SANTE,C=FR",
    }
    values.update(fields)
    session = gateway_of(app).sessions.create(Identity(**values), time.time())
    client.set_cookie(COOKIE, session.id, domain="localhost")
    return session.id
