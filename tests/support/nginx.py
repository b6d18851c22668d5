"""A real nginx for tests: configuration rendered from a template in deploy/nginx/, everything under a
temporary prefix (pid, logs, temp and cache paths), foreground process stopped by PID."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import REPO_ROOT, free_port, running

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FORWARD_AUTH_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "forward-auth.conf"


@dataclass(frozen=True)
class Nginx:
    port: int
    prefix: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text()


def render(template: Path, values: Mapping[str, str]) -> str:
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"__{name}__", value)
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if re.search(r"__[A-Z][A-Z_]*__", code):
        raise ValueError(f"unreplaced placeholder in {template}")
    return text


def main_config(prefix: Path, server_config: str, workers: int = 1, http: str = "") -> str:
    """nginx.conf around ``server_config``; ``http``: an operator's own http-level directives."""
    temp = {name: prefix / name for name in ("client", "proxy", "fastcgi", "uwsgi", "scgi")}
    for directory in temp.values():
        directory.mkdir(parents=True, exist_ok=True)
    # As root, nginx workers would switch to "nobody", who cannot enter pytest's private temp directories.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""\
{user}worker_processes {workers};
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp["client"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    keepalive_requests 100000;
{http}
{server_config}
}}
"""


@contextlib.contextmanager
def running_nginx(
    prefix: Path, template: Path, values: Mapping[str, str], workers: int = 1, http: str = ""
) -> Iterator[Nginx]:
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    defaults = {
        "LISTEN": f"127.0.0.1:{port}",
        "CACHE_DIR": str(prefix),
        "ACCESS_LOG": str(prefix / "access.log"),
    }
    server = render(template, {**defaults, **values})
    conf = prefix / "nginx.conf"
    conf.write_text(main_config(prefix, server, workers, http))
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-g", f"daemon off; pid {prefix}/nginx.pid;"]
    with running(argv, port, log=prefix / "nginx.out"):
        yield Nginx(port, prefix)


@contextlib.contextmanager
def running_fast_portal(prefix: Path) -> Iterator[Nginx]:
    """A portal answering every path at nginx's speed (a short page, 200): what lets one client send cached
    reads through forward-auth as fast as nginx serves them, as on a real portal's static assets."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = f"""\
server {{
    listen 127.0.0.1:{port};
    location / {{
        default_type text/html;
        return 200 "<!doctype html><title>portal</title><p>portal page</p>";
    }}
}}
"""
    conf = prefix / "nginx.conf"
    conf.write_text(main_config(prefix, server))
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-g", f"daemon off; pid {prefix}/nginx.pid;"]
    with running(argv, port, log=prefix / "nginx.out"):
        yield Nginx(port, prefix)
