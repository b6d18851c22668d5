"""Build the gateway's container image on a machine with no container registry (what `make image` runs).

No registry is reachable from the machines this project is built and tested on, so the Dockerfile's default
base (python:3.11-slim) cannot be pulled. Instead:

1. A Docker daemon: the one ``DOCKER_HOST`` (or the system socket) names if it answers, else a private
   ``dockerd`` of this checkout (data in var/docker; no bridge, no iptables: containers and builds use the host
   network). The private daemon keeps running after ``build`` so the image can be used; ``stop`` stops it.
2. A base image made from Debian's packages with mmdebstrap (bookworm, python3 + venv, useradd), with a
   virtualenv first in PATH and the host's CA bundle for pip (machines whose egress re-signs TLS need its CA).
   Its root filesystem is cached as var/image/base-<key>.tar, the key hashing every input of the recipe.
   Such a base is for building and testing here only: never publish an image made from it.
3. ``docker build --build-arg BASE=<that base>`` of the repository's Dockerfile.

    python deploy/image.py build [--tag cps-gateway:latest]
    python deploy/image.py base [--background]      (only the base's root filesystem; `make test` starts it early)
    python deploy/image.py stop
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "var" / "docker"
BASE_CACHE = REPO / "var" / "image"
DEFAULT_TAG = "cps-gateway:latest"

SUITE = "bookworm"
#: mmdebstrap's "essential" variant plus what the Dockerfile runs: python3 + venv (pip), useradd (passwd).
PACKAGES = ("passwd", "python3", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_CA_BUNDLE = "/etc/ssl/certs/host-ca-bundle.pem"
BASE_ENV = (
    "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"PIP_CERT={IMAGE_CA_BUNDLE}",
)
#: Bumped whenever the recipe below changes in a way its other inputs do not show.
RECIPE_VERSION = "1"


class ImageError(Exception):
    pass


@dataclass(frozen=True)
class Docker:
    """The ``docker`` client pointed at one daemon."""

    host: str

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, DOCKER_HOST=self.host)

    def run(self, *args: str, timeout: float = 600, input_file: Path | None = None) -> str:
        with contextlib.ExitStack() as stack:
            stdin = stack.enter_context(input_file.open("rb")) if input_file else subprocess.DEVNULL
            done = subprocess.run(
                ["docker", *args],
                env=self.env,
                stdin=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        if done.returncode != 0:
            raise ImageError(
                f"docker {' '.join(args[:3])}… failed ({done.returncode}):\n{done.stderr.strip()}"
            )
        return done.stdout

    def answers(self) -> bool:
        probe = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env=self.env,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
        return probe.returncode == 0

    def has_image(self, reference: str) -> bool:
        try:
            self.run("image", "inspect", "--format", "{{.Id}}", reference, timeout=30)
        except ImageError:
            return False
        return True


# --- The daemon --------------------------------------------------------------------------------------


#: Daemons started by this process, by PID (stopped by PID, waited for through their Popen).
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def _private_socket(directory: Path) -> str:
    return f"unix://{directory / 'docker.sock'}"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time starts or stops the private daemon of ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start_private_daemon(directory: Path = DOCKER_DIR, timeout: float = 60) -> tuple[Docker, int | None]:
    """The private daemon of ``directory``, started unless it already runs; (client, PID if started here)."""
    docker = Docker(_private_socket(directory))
    with _locked(directory):
        if docker.answers():
            return docker, None
        if shutil.which("dockerd") is None:
            raise ImageError("dockerd is not installed: `make deps` installs Debian's docker.io")
        _unmount_netns(directory)
        log = (directory / "dockerd.log").open("ab")
        daemon = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                str(directory / "data"),
                "--exec-root",
                str(directory / "exec"),
                "--host",
                docker.host,
                "--pidfile",
                str(directory / "dockerd.pid"),
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _STARTED[daemon.pid] = daemon
        deadline = time.monotonic() + timeout
        while not docker.answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                stop_private_daemon(directory, daemon.pid)
                tail = (directory / "dockerd.log").read_text(errors="replace")[-2000:]
                raise ImageError(f"the private dockerd did not start:\n{tail}")
            time.sleep(0.3)
        return docker, daemon.pid


def stop_private_daemon(directory: Path = DOCKER_DIR, pid: int | None = None, timeout: float = 30) -> bool:
    """Stop the private daemon of ``directory`` (by its PID); True if one was running."""
    pid_file = directory / "dockerd.pid"
    if pid is None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _unmount_netns(directory)
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    if pid in _STARTED:
        _STARTED.pop(pid).wait(timeout)
    _unmount_netns(directory)
    return True


def _alive(pid: int) -> bool:
    if pid in _STARTED:
        return _STARTED[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _unmount_netns(directory: Path) -> None:
    """dockerd leaves its default network namespace mounted after it stops."""
    netns = directory / "exec" / "netns" / "default"
    if os.path.ismount(netns):
        subprocess.run(["umount", str(netns)], check=False, capture_output=True)


@contextlib.contextmanager
def docker_daemon(directory: Path = DOCKER_DIR) -> Iterator[Docker]:
    """A daemon for this block: the private one of ``directory``, stopped afterwards if started here."""
    docker, started = start_private_daemon(directory)
    try:
        yield docker
    finally:
        if started is not None:
            stop_private_daemon(directory, started)


def system_daemon() -> Docker | None:
    """The daemon DOCKER_HOST or the system socket names, if one answers."""
    docker = Docker(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    return docker if shutil.which("docker") and docker.answers() else None


# --- The base image ----------------------------------------------------------------------------------


def _debian_mirror() -> str:
    """The first Debian mirror of the host's apt sources (deb822 or one-line format)."""
    sources = [*sorted(Path("/etc/apt/sources.list.d").glob("*.sources")), Path("/etc/apt/sources.list")]
    for source in sources:
        with contextlib.suppress(OSError):
            for line in source.read_text().splitlines():
                words = line.split()
                if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                    return words[1]
                if line.startswith("deb ") and len(words) > 2 and "security" not in words[1]:
                    return words[1]
    return "http://deb.debian.org/debian"


def _mmdebstrap_argv(mirror: str, output: Path) -> list[str]:
    return [
        "mmdebstrap",
        "--quiet",
        "--mode=root",
        "--variant=essential",
        "--dpkgopt=force-unsafe-io",  # no fsync per file: the result is a tarball written once
        f"--include={','.join(PACKAGES)}",
        '--customize-hook=chroot "$1" python3 -m venv /opt/venv',
        f'--customize-hook=cp {HOST_CA_BUNDLE} "$1{IMAGE_CA_BUNDLE}"',
        SUITE,
        str(output),
        mirror,
    ]


def base_key(mirror: str) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, *_mmdebstrap_argv(mirror, Path("-")), *BASE_ENV):
        digest.update(part.encode() + b"\0")
    digest.update(HOST_CA_BUNDLE.read_bytes())
    return digest.hexdigest()[:16]


def base_rootfs(cache: Path = BASE_CACHE) -> tuple[str, Path]:
    """(key, root filesystem tarball) of the base, made with mmdebstrap unless cached. One process makes it at a
    time: another one waits for it (`make test` starts it in the background, the image test takes it)."""
    mirror = _debian_mirror()
    key = base_key(mirror)
    rootfs = cache / f"base-{key}.tar"
    with _locked(cache):
        if rootfs.exists():
            return key, rootfs
        if shutil.which("mmdebstrap") is None:
            raise ImageError("mmdebstrap is not installed: `make deps` installs it")
        for stale in cache.glob("*.tar"):
            stale.unlink()
        partial = cache / f"partial-{key}.tar"  # mmdebstrap picks its output format from the extension
        made = subprocess.run(
            _mmdebstrap_argv(mirror, partial),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if made.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImageError(f"mmdebstrap failed ({made.returncode}):\n{made.stderr[-3000:]}")
        partial.rename(rootfs)
    return key, rootfs


def start_base_rootfs_in_background(cache: Path = BASE_CACHE) -> None:
    """Make the base's root filesystem in a detached process (mostly downloads: it overlaps with other work)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "base.log").open("ab") as log:
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "base"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def base_image(docker: Docker, cache: Path = BASE_CACHE) -> str:
    """The local base image (made, or taken from the cache), imported into ``docker``; its reference."""
    key, rootfs = base_rootfs(cache)
    reference = f"localhost/cps-gateway-base:{key}"
    if not docker.has_image(reference):
        changes = [arg for env in BASE_ENV for arg in ("--change", f"ENV {env}")]
        docker.run("import", *changes, "-", reference, input_file=rootfs)
    return reference


# --- The image ---------------------------------------------------------------------------------------


def build_image(docker: Docker, tag: str = DEFAULT_TAG, base: str | None = None) -> str:
    """``docker build`` of the repository's Dockerfile on ``base`` (default: the local base); the image id."""
    base = base or base_image(docker)
    docker.run(
        "build", "--network", "host", "--build-arg", f"BASE={base}", "--tag", tag, str(REPO), timeout=900
    )
    with contextlib.suppress(ImageError):
        docker.run("image", "prune", "--force", timeout=120)  # the previous build's layers, now untagged
    return docker.run("image", "inspect", "--format", "{{.Id}}", tag, timeout=30).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/image.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the image (starting the private daemon if needed)")
    build.add_argument("--tag", default=DEFAULT_TAG)
    build.add_argument(
        "--base", help="base image to build on (default: one made here from Debian's packages)"
    )
    commands.add_parser("stop", help="stop this checkout's private Docker daemon")
    base = commands.add_parser("base", help="make (or find cached) the base image's root filesystem")
    base.add_argument("--background", action="store_true", help="in a detached process; return at once")
    args = parser.parse_args(argv)
    try:
        if args.command == "base":
            if args.background:
                start_base_rootfs_in_background()
            else:
                print(f"base root filesystem: {base_rootfs()[1]}")
            return 0
        if args.command == "stop":
            stopped = stop_private_daemon()
            print("private Docker daemon stopped" if stopped else "no private Docker daemon was running")
            return 0
        docker = system_daemon()
        private = docker is None
        if docker is None:
            docker, _ = start_private_daemon()
        started = time.monotonic()
        image = build_image(docker, args.tag, args.base)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built {args.tag} ({image[:19]}) in {time.monotonic() - started:.0f} s")
    if private:
        print(
            f"It lives in this checkout's private Docker daemon (var/docker), still running:\n"
            f"  export DOCKER_HOST={docker.host}\n"
            f"  docker run --network host --read-only --tmpfs /tmp -v <config dir>:/etc/gateway:ro \\\n"
            f"      -v gateway-audit:/var/log/gateway {args.tag}        (docs/operations.md)\n"
            f"Stop the daemon: {Path(sys.executable).name} deploy/image.py stop  (or make image-stop)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
