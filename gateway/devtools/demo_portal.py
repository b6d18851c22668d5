"""A small demo portal shaped like the professionals' health-insurance portal (the embedded default's upstream).

It trusts nothing but the gateway's signed assertion: pages show who the gateway let in after checking the
``X-Gateway-Assertion`` JWT with the gateway's published key, as a real portal should.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from typing import Any

from flask import Flask, Response, render_template_string, request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

_PAGE = """<!doctype html>
<html lang="fr"><head><meta charset="utf-8"><title>{{ title }} — Portail démo</title>
<link rel="stylesheet" href="/static/portal.css"></head>
<body><header><strong>Portail démo des professionnels de santé</strong>
{% if who %}<span class="who">{{ who.given_name }} {{ who.family_name }} ({{ who.sub }}, {{ who.amr|join(',') }})</span>{% endif %}
</header><main><h1>{{ title }}</h1>{{ body|safe }}</main></body></html>"""

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:0}header{background:#000091;color:#fff;padding:1rem;"
    "display:flex;justify-content:space-between}main{padding:1rem 2rem}"
)


def create_portal(gateway_origin: str | None = None, *, audience: str = "portal") -> Flask:
    app = Flask(__name__)
    keys: dict[str, Any] = {}

    def verified_identity() -> dict[str, Any] | None:
        token = request.headers.get("X-Gateway-Assertion")
        if not token or not gateway_origin:
            return None
        if "keyset" not in keys:
            with urllib.request.urlopen(f"{gateway_origin}/.gateway/jwks.json", timeout=2) as answer:  # noqa: S310
                keys["keyset"] = KeySet.import_key_set(json.load(answer))
        try:
            decoded = jwt.decode(token, keys["keyset"], algorithms=["ES256"])
            jwt.JWTClaimsRegistry(
                aud={"essential": True, "value": audience}, exp={"essential": True}
            ).validate(decoded.claims)
        except (JoseError, ValueError):
            return None
        return decoded.claims

    def page(title: str, body: str, status: int = 200) -> Response:
        html = render_template_string(_PAGE, title=title, body=body, who=verified_identity())
        return Response(html, status, content_type="text/html; charset=utf-8")

    @app.get("/")
    def home() -> Response:
        return page(
            "Accueil",
            "<p>Bienvenue.</p><ul><li><a href='/patients/180017512345678'>Dossier d'un assuré</a></li>"
            "<li><a href='/account/rib'>Mes coordonnées bancaires</a></li></ul>",
        )

    @app.get("/patients/<nir>")
    def patient(nir: str) -> Response:
        if not nir.isdigit() or len(nir) not in (13, 15):
            return page("Dossier introuvable", "<p>NIR invalide.</p>", 404)
        seed = hashlib.sha256(nir.encode()).hexdigest()
        return page(
            f"Dossier de l'assuré {nir}",
            f"<p>Droits ouverts : régime général. Médecin traitant déclaré. Réf. {seed[:8]}</p>",
        )

    @app.route("/account/rib", methods=["GET", "POST"])
    def bank_details() -> Response:
        if request.method == "POST":
            iban = request.form.get("iban", "")
            return page("Coordonnées bancaires", f"<p>Nouvel IBAN enregistré : {_masked(iban)}</p>")
        return page(
            "Coordonnées bancaires",
            "<form method='post'><label>IBAN <input name='iban' value='FR76 3000 6000 0112 3456 7890 189'>"
            "</label><button type='submit'>Enregistrer</button></form>",
        )

    @app.get("/static/portal.css")
    def css() -> Response:
        return Response(_CSS, content_type="text/css")

    return app


def _masked(iban: str) -> str:
    compact = "".join(iban.split())
    return ("•" * max(0, len(compact) - 4)) + compact[-4:]


def run(host: str, port: int, gateway_origin: str = "http://127.0.0.1:8080") -> None:
    from gunicorn.app.base import BaseApplication

    portal = create_portal(gateway_origin)

    class PortalServer(BaseApplication):
        def load_config(self) -> None:
            for key, value in {
                "bind": [f"{host}:{port}"],
                "workers": 1,
                "worker_class": "gthread",
                "threads": 16,
                "control_socket_disable": True,
                "accesslog": None,
            }.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return portal

    PortalServer().run()
