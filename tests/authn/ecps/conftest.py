"""One Pro Santé Connect stand-in process for the module, and a small relying-party app around the client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask, jsonify, request
from flask.testing import FlaskClient

from gateway.authn.card.challenge import MemoryNonceStore, NonceKind, NonceSpace
from gateway.authn.ecps import EcpsError, ProSanteConnect
from tests.support.processes import free_port
from tests.support.psc import PscServer, running_psc

RP_BASE = "https://localhost"
REDIRECT_URI = RP_BASE + "/.gateway/ecps/callback"
POST_LOGOUT_URI = RP_BASE + "/.gateway/logged-out"
SECRET_CLIENT = "gateway-secret"
SECRET = "s3cret-for-tests"
JWT_CLIENT = "gateway-jwt"
ES256_CLIENT = "gateway-es256"
JSON_USERINFO_CLIENT = "gateway-json"
JWT_KEY_ID = "gateway-key-1"
DOCTOR_APP = "810001234567"
PHARMACIST_APP = "810009876543"
DOCTOR_CARD = "810005555555"


@dataclass
class LogoutReceiver:
    """A real HTTP endpoint standing in for the gateway's back-channel logout route."""

    port: int
    tokens: list[str] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/backchannel-logout"


@dataclass(frozen=True)
class PscWorld:
    psc: PscServer
    receiver: LogoutReceiver
    private_key_pem: str
    #: EC P-256 key of ES256_CLIENT (private_key_jwt with ES256).
    ec_private_key_pem: str


def pem_pair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.fixture(scope="package")
def logout_receiver() -> Iterator[LogoutReceiver]:
    receiver = LogoutReceiver(port=free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            receiver.tokens.extend(parse_qs(body).get("logout_token", []))
            receiver.received.set()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory, logout_receiver: LogoutReceiver) -> Iterator[PscWorld]:
    private_pem, public_pem = pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_private_pem, ec_public_pem = pem_pair(ec.generate_private_key(ec.SECP256R1()))
    common = {"redirect_uris": [REDIRECT_URI], "post_logout_redirect_uris": [POST_LOGOUT_URI]}
    clients = [
        {
            "client_id": SECRET_CLIENT,
            "client_secret": SECRET,
            "backchannel_logout_uri": logout_receiver.url,
            **common,
        },
        {
            "client_id": JWT_CLIENT,
            "token_endpoint_auth_method": "private_key_jwt",
            "public_key_pem": public_pem,
            "key_id": JWT_KEY_ID,
            **common,
        },
        {
            "client_id": ES256_CLIENT,
            "token_endpoint_auth_method": "private_key_jwt",
            "public_key_pem": ec_public_pem,
            "key_id": "gateway-ec-1",
            **common,
        },
        {"client_id": JSON_USERINFO_CLIENT, "client_secret": SECRET, "userinfo_format": "json", **common},
    ]
    with running_psc(Path(tmp_path_factory.mktemp("psc")), clients) as psc:
        yield PscWorld(psc, logout_receiver, private_pem, ec_private_pem)


@pytest.fixture
def psc(world: PscWorld) -> Iterator[PscServer]:
    world.psc.reset()
    yield world.psc
    world.psc.reset()


def make_rp(metadata_url: str, **overrides: Any) -> tuple[Flask, ProSanteConnect]:
    """The relying party as the gateway will wire it: login cookie ``__Host-gateway-login``."""
    settings: dict[str, Any] = {
        "metadata_url": metadata_url,
        "client_id": SECRET_CLIENT,
        "client_secret": SECRET,
        "redirect_uri": REDIRECT_URI,
        "post_logout_redirect_uri": POST_LOGOUT_URI,
        "timeout": 3.0,
    }
    settings.update(overrides)
    settings.setdefault("single_use", NonceSpace(MemoryNonceStore(), NonceKind.ECPS_USED))
    ecps = ProSanteConnect(**settings)
    app = Flask("rp")
    app.config.update(
        SECRET_KEY="test-secret-key",
        SESSION_COOKIE_NAME="__Host-gateway-login",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/",
    )
    ecps.init_app(app)

    @app.errorhandler(EcpsError)
    def refused(error: EcpsError) -> Any:
        return jsonify(reason=error.reason.value, detail=error.detail), 403

    @app.get("/.gateway/login/ecps")
    def login() -> Any:
        max_age = request.args.get("max_age")
        return ecps.begin_login(request.args.get("next", "/"), int(max_age) if max_age else None)

    @app.get("/.gateway/ecps/callback")
    def callback() -> Any:
        result = ecps.complete_login()
        return jsonify(identity=result.identity.to_dict(), next_path=result.next_path, sid=result.sid)

    return app, ecps


def rp_client(app: Flask) -> FlaskClient:
    return app.test_client()


def start_login(client: FlaskClient, next_path: str = "/dossier", max_age: int | None = None) -> str:
    """Begin a login in the browser; returns PSC's authorization URL."""
    query = {"next": next_path} | ({"max_age": str(max_age)} if max_age is not None else {})
    answer = client.get("/.gateway/login/ecps", query_string=query, base_url=RP_BASE)
    assert answer.status_code == 302, answer.get_data(as_text=True)
    return str(answer.headers["Location"])


def follow_callback(client: FlaskClient, callback_url: str) -> Any:
    parts = urlsplit(callback_url)
    return client.get(parts.path + "?" + parts.query, base_url=RP_BASE)
