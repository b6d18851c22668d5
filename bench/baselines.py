"""What the gateway is compared with, started as real processes on loopback (shared by the benchmarks).

- :func:`static_site`: nginx serving one static 1 KB page for every path: a FAST upstream, so that the
  figures measure the proxies, not the portal (issue 14 measured 55,800 req/s direct on this VM).
- :func:`nginx_proxy`: nginx as a plain reverse proxy (keep-alive to the upstream).
- :func:`apache_oidc`: Apache httpd with mod_auth_openidc (Debian's libapache2-mod-auth-openidc), the usual
  OpenID Connect relying party in front of a portal: sessions in shared memory, ``/patients/`` protected,
  everything proxied to the upstream. Its session is obtained the real way: a code flow with PKCE through
  the Pro Santé Connect stand-in (``gateway.devtools.psc``), which approves the test identity at once.

Apache needs the Debian packages apache2 and libapache2-mod-auth-openidc (`make bench` installs them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import requests
from common import REPO  # noqa: F401 - first: puts the repository on sys.path

from tests.support.processes import free_port, running

#: The page every path of the static site answers (1 KB, like a small portal page).
PAGE = b"<!doctype html><title>portal</title><p>" + b"x" * (1024 - 42) + b"</p>\n"
#: A route the gateway's benchmark policies and Apache both protect (login with a profession-10 identity).
PROTECTED = "/patients/180017512345678"
PSC_IDENTITY = "810001234567"  # a médecin of the stand-in's default identities
APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
APACHE_MODULES = Path("/usr/lib/apache2/modules")

STATIC_CONF = """\
{user}worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/site;
        default_type text/html;
        location / {{ try_files /page.html =404; }}
    }}
}}
"""

NGINX_PROXY_CONF = """\
{user}worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream portal {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://portal;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""

APACHE_CONF = """\
ServerRoot {dir}
Listen 127.0.0.1:{port}
PidFile {dir}/httpd.pid
ErrorLog {dir}/error.log
LogLevel warn
DefaultRuntimeDir {dir}
Mutex posixsem
{user}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule authn_core_module {modules}/mod_authn_core.so
LoadModule authz_user_module {modules}/mod_authz_user.so
LoadModule proxy_module {modules}/mod_proxy.so
LoadModule proxy_http_module {modules}/mod_proxy_http.so
LoadModule auth_openidc_module {modules}/mod_auth_openidc.so
ServerName 127.0.0.1
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 75

OIDCProviderMetadataURL {psc_issuer}/.well-known/wallet-openid-configuration
OIDCClientID {client_id}
OIDCClientSecret {client_secret}
OIDCRedirectURI http://127.0.0.1:{port}/oidc/callback
OIDCCryptoPassphrase {passphrase}
OIDCScope "openid scope_all"
OIDCPKCEMethod S256
OIDCAuthRequestParams acr_values=eidas1
OIDCSessionType server-cache
OIDCCacheType shm
OIDCSessionInactivityTimeout 1800
OIDCSessionMaxDuration 14400
OIDCCookieSameSite On

ProxyPass /oidc/ !
ProxyPass / http://127.0.0.1:{upstream_port}/ keepalive=On
<Location /patients/>
    AuthType openid-connect
    Require valid-user
</Location>
<Location /oidc/>
    AuthType openid-connect
    Require valid-user
</Location>
"""


def _as_root_user(nginx: bool) -> str:
    # As root, nginx workers would switch to "nobody", who cannot enter the private temporary directories:
    # keep them as root (a loopback benchmark only). Apache refuses to serve as root; its workers touch no
    # file (proxy, sessions in shared memory, posixsem mutexes), so www-data is fine.
    if os.geteuid() != 0:
        return ""
    return "user root root;\n" if nginx else "User www-data\nGroup www-data"


def _nginx_argv(directory: Path, conf: str) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / name).mkdir(exist_ok=True)
    (directory / "nginx.conf").write_text(conf)
    return ["nginx", "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"]


def static_site(stack: contextlib.ExitStack, directory: Path) -> int:
    """nginx answering :data:`PAGE` on every path; returns its port."""
    port = free_port()
    (directory / "site").mkdir(parents=True, exist_ok=True)
    (directory / "site" / "page.html").write_bytes(PAGE)
    conf = STATIC_CONF.format(user=_as_root_user(True), dir=directory, port=port)
    stack.enter_context(running(_nginx_argv(directory, conf), port))
    return port


def nginx_proxy(stack: contextlib.ExitStack, directory: Path, upstream_port: int) -> int:
    """nginx proxying every path to ``upstream_port`` with keep-alive; returns its port."""
    port = free_port()
    conf = NGINX_PROXY_CONF.format(
        user=_as_root_user(True), dir=directory, port=port, upstream_port=upstream_port
    )
    stack.enter_context(running(_nginx_argv(directory, conf), port))
    return port


def psc_stand_in(stack: contextlib.ExitStack, *, client_id: str, secret: str, redirect_uri: str) -> str:
    """The Pro Santé Connect stand-in with one registered client; returns its issuer."""
    port = free_port()
    argv = [
        sys.executable, "-m", "gateway.devtools.psc", "--port", str(port), "--client-id", client_id,
        "--client-secret", secret, "--redirect-uri", redirect_uri, "--userinfo-format", "json",
    ]  # fmt: skip
    stack.enter_context(running(argv, port))
    return f"http://127.0.0.1:{port}/auth/realms/esante-wallet"


def apache_oidc(stack: contextlib.ExitStack, directory: Path, upstream_port: int) -> tuple[int, str]:
    """Apache + mod_auth_openidc in front of ``upstream_port``, and the Cookie header of a session obtained
    through the PSC stand-in: (port, cookie)."""
    if not Path(APACHE).exists() or not (APACHE_MODULES / "mod_auth_openidc.so").exists():
        raise SystemExit(
            "Apache + mod_auth_openidc missing: apt-get install apache2 libapache2-mod-auth-openidc"
        )
    port, secret = free_port(), secrets.token_urlsafe(24)
    redirect_uri = f"http://127.0.0.1:{port}/oidc/callback"
    issuer = psc_stand_in(stack, client_id="apache-bench", secret=secret, redirect_uri=redirect_uri)
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "httpd.conf"
    conf.write_text(
        APACHE_CONF.format(
            dir=directory, port=port, modules=APACHE_MODULES, user=_as_root_user(False),
            psc_issuer=issuer, client_id="apache-bench", client_secret=secret,
            passphrase=secrets.token_urlsafe(24), upstream_port=upstream_port,
        )
    )  # fmt: skip
    checked = subprocess.run([APACHE, "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    if checked.returncode != 0:
        raise RuntimeError(f"Apache refuses {conf}: {checked.stderr}")
    stack.enter_context(running([APACHE, "-f", str(conf), "-DFOREGROUND"], port))
    return port, _oidc_login(port)


def _oidc_login(port: int) -> str:
    """A browser's code flow against Apache, the stand-in approving at once (its test parameters added to
    the authorization request Apache redirects to)."""
    browser = requests.Session()
    auto = urlencode({"psc_test_auto_approve": "1", "login_hint": PSC_IDENTITY})
    answer = browser.get(f"http://127.0.0.1:{port}{PROTECTED}", allow_redirects=False, timeout=10)
    location = answer.headers.get("Location", "")
    if "/protocol/openid-connect/auth" not in location:
        raise RuntimeError(
            f"Apache did not send the browser to the provider: {answer.status_code} {location}"
        )
    answer = browser.get(f"{location}&{auto}", timeout=10)  # provider -> callback -> the page
    if answer.status_code != 200 or answer.content != PAGE:
        raise RuntimeError(f"login through Apache failed: {answer.status_code} {answer.text[:200]}")
    cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items() if "openidc" in name)
    if not cookie:
        raise RuntimeError("Apache set no session cookie")
    return cookie
