"""The container image as `make image` builds it (Dockerfile on a base made here from Debian's packages, see
deploy/image.py), run the way docs/operations.md tells an operator to: non-root, read-only root filesystem,
the configuration mounted as ONE directory, the audit directory a named volume.

The private Docker daemon has no bridge: containers share the host's network and listen on free loopback
ports of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from deploy.image import Docker, ImageError, build_image, docker_daemon
from gateway.proxy.assertion import generate_key_file
from tests.support.demo import demo_ports
from tests.support.processes import REPO_ROOT, free_port, wait_for_port

UID = 10001  # the image's gateway user
IMAGE_TAG = "cps-gateway:test"
COMPOSE = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())

# A cold build (base image from Debian's packages, then the Dockerfile's pip install) takes minutes.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    with docker_daemon() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    return build_image(docker, IMAGE_TAG)


def operator_config(directory: Path, *, listen: str, metrics: str, upstream_url: str) -> Path:
    """/etc/gateway as an operator lays it out: gateway.yaml, policies/, certs/ (readable by the image's user)."""
    (directory / "policies").mkdir(parents=True)
    (directory / "policies" / "portal.yaml").write_text(
        "rules:\n"
        "  - name: public\n    match: { paths: [/hello] }\n    action: public\n"
        "  - name: records\n    match: { path: /patients/* }\n    action: authenticate\n"
    )
    key = directory / "certs" / "assertion-key.pem"
    generate_key_file(key)
    os.chown(key, UID, UID)
    (directory / "gateway.yaml").write_text(
        f"server:\n  listen: {listen}\n"
        f"upstream:\n  url: {upstream_url}\n"
        "policies: [policies]\n"
        "assertion:\n  key_file: certs/assertion-key.pem\n"
        "audit:\n  file: /var/log/gateway/audit.log\n"
        f"metrics:\n  listen: {metrics}\n"
    )
    return directory


def compose_options(service: str, mounts: dict[str, str]) -> list[str]:
    """``docker run`` options for a service of deploy/compose.yaml (its sources mapped by ``mounts``)."""
    config = COMPOSE["services"][service]
    options = ["--read-only"] if config.get("read_only") else []
    for tmpfs in config.get("tmpfs", []):
        options += ["--tmpfs", tmpfs]
    for volume in config.get("volumes", []):
        source, target, *mode = volume.split(":")
        options += ["--volume", ":".join([mounts[source], target, *mode])]
    for name, value in config.get("environment", {}).items():
        options += ["--env", f"{name}={value}"]
    if "entrypoint" in config:
        options += ["--entrypoint", config["entrypoint"][0]]
    return options


def compose_arguments(service: str) -> list[str]:
    """What follows the image on the command line: the rest of the service's entrypoint, then its command."""
    config = COMPOSE["services"][service]
    return [*config.get("entrypoint", [])[1:], *config.get("command", [])]


@contextlib.contextmanager
def container(docker: Docker, *args: str) -> Iterator[str]:
    """``docker run -d`` for this block, then ``docker rm -f`` (WITHOUT -v: any volume left would show)."""
    name = docker.run("run", "--detach", "--network", "host", *args).strip()
    try:
        yield name
    finally:
        with contextlib.suppress(ImageError):
            docker.run("rm", "--force", name)


def wait_healthy(docker: Docker, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = docker.run("inspect", "--format", "{{.State.Health.Status}}", name).strip()
        if status in ("healthy", "unhealthy"):
            return status
        time.sleep(0.5)
    return status


def volumes(docker: Docker) -> set[str]:
    return set(docker.run("volume", "ls", "--quiet").split())


def exec_in(docker: Docker, name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "exec", name, *argv],
        env=docker.env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def test_the_image_runs_as_an_unprivileged_user_with_a_healthcheck_and_no_volumes(
    docker: Docker, image: str
) -> None:
    config = json.loads(docker.run("image", "inspect", "--format", "{{json .Config}}", image))
    assert config["User"] == "gateway"
    assert not config.get("Volumes"), "a VOLUME hides what is mounted above it and leaves anonymous volumes"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Entrypoint"] == ["gateway"]


def test_the_gateway_container_serves_on_a_read_only_root_with_the_configuration_mounted_as_one_directory(
    docker: Docker, image: str, upstream_url: str, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{port}"
    config = operator_config(
        tmp_path / "etc-gateway",
        listen=f"127.0.0.1:{port}",
        metrics=f"127.0.0.1:{metrics_port}",
        upstream_url=upstream_url,
    )
    audit_volume = f"gateway-audit-test-{port}"
    access = tmp_path / "access-log"  # nginx's access stream (deploy/compose.yaml); no nginx runs here
    access.mkdir()
    docker.run("volume", "create", audit_volume)
    before = volumes(docker)
    try:
        with container(
            docker,
            # The gateway service of deploy/compose.yaml: read-only root, tmpfs, mounts, environment.
            *compose_options("gateway", {"./gateway": str(config), "audit": audit_volume, "access": str(access)}),
            "--env", f"GATEWAY_HEALTH_URL={origin}/.gateway/healthz",
            "--health-interval", "1s",  # the image's HEALTHCHECK command, probed sooner
            image,
            *compose_arguments("gateway"),
        ) as name:  # fmt: skip
            with contextlib.suppress(TimeoutError):
                wait_for_port(port, timeout=30)
            logs = docker.run("logs", name)
            assert requests.get(f"{origin}/.gateway/healthz", timeout=5).status_code == 200, logs
            ready = requests.get(f"{origin}/.gateway/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
            public = requests.get(f"{origin}/hello", timeout=5)
            assert public.status_code == 200 and "hello from the portal" in public.text
            protected = requests.get(f"{origin}/patients/180017512345678", timeout=5)
            assert protected.status_code == 401
            metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            assert metrics.status_code == 200 and "gateway_requests_total" in metrics.text

            assert exec_in(docker, name, "id", "-u").stdout.strip() == str(UID)
            for path in ("/opt/gateway/written", "/etc/written", "/etc/gateway/written"):
                attempt = exec_in(docker, name, "touch", path)
                assert attempt.returncode != 0 and "Read-only file system" in attempt.stderr, path
            audit = exec_in(docker, name, "cat", "/var/log/gateway/audit.log").stdout
            assert '"rule":"records"' in audit

            assert wait_healthy(docker, name) == "healthy"
        assert volumes(docker) == before, "the container left an anonymous volume behind"
    finally:
        docker.run("volume", "rm", audit_volume)


def test_the_demo_portal_service_of_the_compose_example_turns_healthy(docker: Docker, image: str) -> None:
    """The portal service runs this image too: the image's HEALTHCHECK must ask the portal, not a gateway."""
    with (
        demo_ports(),  # the service listens on the demo portal's port (8081) and nothing on the gateway's
        container(
            docker,
            *compose_options("portal", {}),
            "--health-interval", "1s",
            image,
            *compose_arguments("portal"),
        ) as name,
    ):  # fmt: skip
        assert wait_healthy(docker, name) == "healthy", docker.run("logs", name)
