"""A small demo portal shaped like the professionals' health-insurance portal (the embedded default's upstream).

It trusts nothing but the gateway's signed assertion, verified by ``gateway.portal`` as a real portal should:
its pages show who the gateway let in, and a request that did not come through the gateway gets 401.
"""

from __future__ import annotations

import hashlib

from flask import Flask, Response, render_template_string, request

from gateway.portal import (
    AssertionVerifier,
    GatewayAssertion,
    GatewayKeys,
    Professional,
    current_professional,
)
from gateway.professions import PROFESSIONS

_PAGE = """<!doctype html>
<html lang="fr"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} — Portail démo</title><link rel="stylesheet" href="/static/portal.css"></head>
<body><header><a class="brand" href="/">Portail démo des professionnels de santé</a>
<nav id="who">{% if who %}<span id="professional">{{ who.given_name }} {{ who.family_name }} ({{ who.idnat }})
{%- if professions %} · {{ professions }}{% endif %}</span>
<span class="login">{{ method }}, connecté à {{ who.login_time.astimezone().strftime("%H:%M") }}</span>
<a id="logout" href="/.gateway/logout">Se déconnecter</a>
{% else %}<a id="my-space" href="/account">Mon espace</a>{% endif %}</nav></header>
<main><h1>{{ title }}</h1>{{ body|safe }}</main></body></html>"""

# The gateway's button, so that every button of the demo looks the same (gateway/static/gateway.css).
_CSS = """body{font-family:system-ui,sans-serif;margin:0;color:#1e1e1e}
header{background:#000091;color:#fff;padding:1rem 2rem;display:flex;justify-content:space-between;
align-items:center;gap:1rem;flex-wrap:wrap}header a{color:#fff}.brand{font-weight:700;text-decoration:none}
nav{display:flex;gap:1.2rem;align-items:baseline;flex-wrap:wrap}.login{opacity:.85}main{padding:1rem 2rem}
.button{display:inline-block;background:#000091;color:#fff;padding:.7rem 1.2rem;border:0;border-radius:4px;
text-decoration:none;font:inherit;font-weight:600;line-height:1.2;width:fit-content;cursor:pointer}
.button:hover,.button:focus-visible{background:#1212ff}label{display:block;margin:1rem 0}
input{font:inherit;padding:.4rem;width:22rem;max-width:100%}"""

_METHODS = {"card": "carte CPS", "ecps": "e-CPS"}


def create_portal(gateway_origin: str = "http://127.0.0.1:8080", *, audience: str = "portal") -> Flask:
    app = Flask(__name__, static_folder=None)
    verifier = AssertionVerifier(GatewayKeys(f"{gateway_origin}/.gateway/jwks.json"), audience=audience)
    gateway = GatewayAssertion(app, verifier=verifier)

    def page(title: str, body: str, status: int = 200) -> Response:
        who = current_professional()
        html = render_template_string(
            _PAGE,
            title=title,
            body=body,
            who=who,
            professions=_professions(who),
            method=_METHODS.get(who.method, who.method) if who else "",
        )
        return Response(html, status, content_type="text/html; charset=utf-8")

    @app.get("/")
    @gateway.optional
    def home() -> Response:
        return page(
            "Accueil",
            "<p>Bienvenue.</p><ul><li><a href='/patients/180017512345678'>Dossier d'un assuré</a></li>"
            "<li><a href='/account/rib'>Mes coordonnées bancaires</a></li>"
            "<li><a href='/account'>Mon espace</a></li></ul>",
        )

    @app.get("/account")
    def account() -> Response:
        who = current_professional()
        assert who is not None  # a required view
        return page(
            "Mon espace",
            f"<p>Identifiant national : {who.idnat}</p>"
            f"<p>Connecté le {who.login_time.astimezone():%d/%m/%Y à %H:%M} par {_METHODS[who.method]}.</p>",
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
            "</label><button class='button' type='submit'>Enregistrer</button></form>",
        )

    @app.get("/static/portal.css")
    @gateway.optional
    def css() -> Response:
        return Response(_CSS, content_type="text/css")

    @app.get("/favicon.ico")
    @gateway.optional
    def favicon() -> Response:
        return Response(status=204)  # no icon: answered, so that browsers stop asking

    return app


def _professions(who: Professional | None) -> str:
    return ", ".join(PROFESSIONS.get(code, code) for code in who.professions) if who else ""


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
