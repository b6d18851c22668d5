"""A browser set up to log in with the SoftHSM test cards (``gateway dev browser``): FOR DEVELOPMENT ONLY.

Chromium (and other NSS-based browsers on Linux) find client certificates in the user's NSS database,
``~/.pki/nssdb``. Four things make a SoftHSM test card usable there, each one a step below:

1. the NSS database exists;
2. SoftHSM is registered in it as a PKCS#11 module, and its slots are marked FRIENDLY (NSS then lists the
   card's certificate without logging in first). The flag is stored per slot, and a slot exists only once
   its token does: run the set-up again after making new cards;
3. the dev server CA (certs/dev/server-ca.pem) is trusted for TLS, since the card host's certificate comes from
   it;
4. optionally, a Chromium enterprise policy (AutoSelectCertificateForUrls) picks the card's certificate for
   the card host without asking: needed by headless browsers, which cannot show the choice. It lives in
   /etc/chromium/policies/managed, writable by root only.

SoftHSM finds its tokens through SOFTHSM2_CONF, read by the browser process: start the browser with it set.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gateway.devtools.cards import softhsm_env
from gateway.devtools.pki import INTERMEDIATE_CN
from gateway.pkcs11 import SOFTHSM_MODULE

NSS_MODULE_NAME = "cps-gateway-softhsm"
SERVER_CA_NICKNAME = "cps-gateway dev server CA"
CHROMIUM_POLICY_DIR = Path("/etc/chromium/policies/managed")
POLICY_FILE_NAME = "cps-gateway-dev-cards.json"


class BrowserSetupError(Exception):
    pass


@dataclass(frozen=True)
class BrowserSetup:
    nssdb: Path
    softhsm_conf: str
    #: The Chromium policy file written, or None (then ``policy`` says what to write, and where).
    policy_file: Path | None
    policy: str


def default_nssdb() -> Path:
    return Path.home() / ".pki" / "nssdb"


def set_up_browser(
    pki_dir: Path, card_origin: str, nssdb: Path | None = None, policy_dir: Path | None = CHROMIUM_POLICY_DIR
) -> BrowserSetup:
    """Steps 1 to 3 in ``nssdb`` for the cards of ``pki_dir``; step 4 for ``card_origin`` in ``policy_dir``
    when it is given and writable. Running it again is harmless (and needed after making new cards)."""
    nssdb = nssdb or default_nssdb()
    env = softhsm_env(pki_dir)  # modutil loads SoftHSM: it must see the cards' tokens to flag their slots
    database = f"sql:{nssdb}"
    nssdb.mkdir(parents=True, exist_ok=True)
    if not (nssdb / "cert9.db").exists():
        _run(["certutil", "-N", "--empty-password", "-d", database], env)
    if NSS_MODULE_NAME not in _run(["modutil", "-list", "-dbdir", database], env):
        _run(
            ["modutil", "-force", "-dbdir", database, "-add", NSS_MODULE_NAME, "-libfile", SOFTHSM_MODULE],
            env,
        )
    _run(
        ["modutil", "-force", "-dbdir", database, "-default", NSS_MODULE_NAME, "-mechanisms", "FRIENDLY"], env
    )
    server_ca = str(pki_dir / "server-ca.pem")
    _run(["certutil", "-A", "-d", database, "-n", SERVER_CA_NICKNAME, "-t", "C,,", "-i", server_ca], env)
    policy = auto_select_policy(card_origin)
    policy_file = None
    if policy_dir is not None:
        try:
            policy_dir.mkdir(parents=True, exist_ok=True)
            (policy_dir / POLICY_FILE_NAME).write_text(policy, encoding="utf-8")
            policy_file = policy_dir / POLICY_FILE_NAME
        except OSError:
            pass  # not root: the caller says what to write where
    return BrowserSetup(nssdb, env["SOFTHSM2_CONF"], policy_file, policy)


def auto_select_policy(card_origin: str) -> str:
    """Chromium's policy choosing, on the card host, the certificate a dev card holds (issued by the dev
    intermediate); each rule is itself a JSON string, and the pattern includes the port."""
    rule = {"pattern": card_origin, "filter": {"ISSUER": {"CN": INTERMEDIATE_CN}}}
    return json.dumps({"AutoSelectCertificateForUrls": [json.dumps(rule)]}, indent=2) + "\n"


def _run(argv: list[str], env: dict[str, str]) -> str:
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False
        )
    except FileNotFoundError:
        raise BrowserSetupError(f"{argv[0]} is not installed (Debian package libnss3-tools)") from None
    if done.returncode != 0:
        raise BrowserSetupError(f"{' '.join(argv[:2])} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout
