"""The gateway as a real server process (gunicorn) streaming large bodies in constant memory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.config import write_config
from tests.support.gateways import serve_argv
from tests.support.processes import free_port, running

GIB = 1024**3
CHUNK = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, assertion_key: Path
) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("gateway")
    port = free_port()
    config = write_config(
        directory, upstream_url=upstream_url, assertion_key=assertion_key, listen=f"127.0.0.1:{port}"
    )
    argv = serve_argv(config)
    with running(argv, port, log=directory / "gateway.log"):
        yield f"http://127.0.0.1:{port}", config


@pytest.fixture(scope="module")
def gateway_url(gateway: tuple[str, Path]) -> str:
    return gateway[0]


def peak_rss_kib(config: Path) -> int:
    """Largest peak resident size among the gateway's processes (master and workers share its argv)."""
    peaks = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(config).encode() not in (proc / "cmdline").read_bytes():
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        peaks.extend(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    assert peaks, "no gateway process found"
    return max(peaks)


def zeros(total: int) -> Iterator[bytes]:
    block = b"\0" * CHUNK
    for _ in range(total // CHUNK):
        yield block


def test_one_gib_download_and_upload_in_constant_memory(gateway: tuple[str, Path]) -> None:
    gateway_url, config = gateway
    with requests.get(f"{gateway_url}/bytes/{GIB}", stream=True, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(GIB)
        received = sum(len(chunk) for chunk in response.iter_content(CHUNK))
    assert received == GIB
    upload = requests.post(f"{gateway_url}/upload", data=zeros(GIB), timeout=60)
    expected = hashlib.sha256()
    for block in zeros(GIB):
        expected.update(block)
    assert upload.json() == {"received": GIB, "sha256": expected.hexdigest()}
    # Python, Flask and the pools take ~60 MiB; a buffered GiB would show up as 1 GiB or more.
    assert peak_rss_kib(config) < 200 * 1024


def test_chunked_upload_is_streamed(gateway_url: str) -> None:
    body = (b"x" * 1000 for _ in range(5000))
    answer = requests.post(f"{gateway_url}/upload", data=body, timeout=30).json()
    assert answer["received"] == 5_000_000


def test_keep_alive_connections_are_reused(gateway_url: str) -> None:
    with requests.Session() as session:
        for _ in range(50):
            assert session.get(f"{gateway_url}/hello", timeout=5).status_code == 200


def test_server_refuses_encoded_slash_before_matching(gateway_url: str) -> None:
    # requests would normalise the path: send it raw.
    import http.client

    host, port = gateway_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    connection.request("GET", "/echo/public/..%2F..%2Fecho%2Fprotected/x", headers={"Accept": "text/html"})
    response = connection.getresponse()
    assert response.status == 400
    assert "Adresse invalide" in response.read().decode()
    connection.close()


def test_upstream_headers_are_not_duplicated(gateway_url: str) -> None:
    response = requests.get(f"{gateway_url}/hello", timeout=5)
    raw_headers = response.raw.headers
    assert len(raw_headers.getlist("Date")) == 1
    assert len(raw_headers.getlist("Server")) == 1
