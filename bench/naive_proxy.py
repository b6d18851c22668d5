"""The baseline the gateway must beat: a naive Flask reverse proxy built with requests (no pooling, buffered)."""

from __future__ import annotations

import os

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ.get("NAIVE_UPSTREAM", "http://127.0.0.1:8081")
app = Flask(__name__)


@app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
@app.route("/<path:path>", methods=["GET", "POST"])
def proxy(path: str) -> Response:
    headers = {k: v for k, v in request.headers if k.lower() != "host"}
    answer = requests.request(
        request.method, f"{UPSTREAM}/{path}", headers=headers, data=request.get_data(), timeout=10
    )
    excluded = {"content-encoding", "content-length", "transfer-encoding", "connection"}
    return Response(
        answer.content,
        answer.status_code,
        [(k, v) for k, v in answer.headers.items() if k.lower() not in excluded],
    )
