"""An nginx card-login host for development: the shipped template filled with the dev PKI and a secret.

Used by ``gateway demo`` and the tests. nginx connects to the gateway from ``source_address`` (e.g.
127.0.0.2, any loopback address works on Linux), the address the gateway then believes as a TLS terminator,
and adds the card host secret it shares with the gateway (``card.host_secret_file``): a card header sent
to the gateway any other way is ignored and audited.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

from gateway.devtools.pki import DevPki

#: deploy/nginx/card-login.conf.template (a symlink here, so that the installed package carries it too).
TEMPLATE = Path(__file__).parent / "card-login.conf.template"


def write_host_secret(path: Path) -> None:
    """A fresh card host secret (32 random bytes, hex) in ``path``, readable by its owner only; kept if present."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32) + "\n")


def card_host_config(
    pki: DevPki, *, listen: str, gateway: str, secret: str, server_name: str | None = None
) -> str:
    """The shipped template with every placeholder filled (the ``server`` block for ``http {}``)."""
    block = string.Template(TEMPLATE.read_text()).safe_substitute(
        CARD_LOGIN_HOST=server_name or listen.rpartition(":")[0],
        LISTEN_ADDRESS=listen,
        SERVER_CERT=pki.server.cert_path,
        SERVER_KEY=pki.base_dir / "server.key",
        CARD_CA_CHAIN=pki.ca_chain_path,
        GATEWAY_UPSTREAM=gateway,
        CARD_HOST_SECRET=secret,
    )
    if "${" in block:
        raise ValueError(f"{TEMPLATE}: a placeholder was left unfilled")
    return block


def card_host_nginx_argv(
    work: Path, pki: DevPki, *, listen: str, gateway: str, secret: str, source_address: str | None = None
) -> list[str]:
    """Write nginx.conf under ``work`` and return the command that runs nginx in the foreground."""
    work.mkdir(parents=True, exist_ok=True)
    block = card_host_config(pki, listen=listen, gateway=gateway, secret=secret)
    if source_address:
        block = block.replace(
            "proxy_pass http://", f"proxy_bind {source_address};\n        proxy_pass http://"
        )
    (work / "card-login.conf").write_text(block)
    temp = "\n".join(
        f"{kind}_temp_path {work}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx workers would switch to "nobody", who may not enter a private working directory.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    (work / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log warn;\n"
        f"events {{}}\nhttp {{\naccess_log off;\n{temp}\ninclude {work}/card-login.conf;\n}}\n"
    )
    return ["nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(work / "nginx.conf")]
