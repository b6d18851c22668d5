"""The ``gateway`` command: serve, check, policy explain, dev tools, demo."""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.config_source import ConfigError, ConfigErrors, parse_duration
from gateway.identity import Identity, LoginMethod
from gateway.policy.engine import decide_rule
from gateway.policy.paths import BadPath, normalise_target
from gateway.settings import DEFAULT_SETTINGS_FILE, Settings, load_settings
from gateway.wsgi import normalise_host

if TYPE_CHECKING:
    from gateway.server import LoadedConfig

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_USAGE = 64


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        getattr(args, "help_of", parser).print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args) or EXIT_OK)
    except ConfigErrors as exc:
        print(
            f"configuration refused ({len(exc.errors)} error{'s' if len(exc.errors) > 1 else ''}):",
            file=sys.stderr,
        )
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        if _uses_embedded_default(args) and any("not found" in error.message for error in exc.errors):
            print(
                f"The embedded default (the demo) reads its files from the working directory ({Path.cwd()}):"
                f" run `{command_name()} dev init` there first.",
                file=sys.stderr,
            )
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file or address named on the command line (the message names it)
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 1


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="CPS / e-CPS strong-authentication gateway")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway (gunicorn; --debug: Werkzeug dev server)")
    _config_option(serve)
    serve.add_argument(
        "--debug", action="store_true", help="Werkzeug development server; never in production"
    )
    serve.set_defaults(run=_serve)

    reload = commands.add_parser("reload", help="validate the configuration, then have the server adopt it")
    _config_option(reload)
    reload.set_defaults(run=_reload)

    check = commands.add_parser("check", help="validate settings and every policy file; list every error")
    _config_option(check)
    check.set_defaults(run=_check)

    policy = _group(commands, "policy", "policy tools")
    explain = policy.add_parser("explain", help="which rule matches a request, the decision and why")
    _config_option(explain)
    explain.add_argument("method", metavar="METHOD")
    explain.add_argument("url", metavar="URL", help="https://host/path?query or /path")
    explain.add_argument(
        "--as", dest="login", choices=[m.value for m in LoginMethod], help="a session of this kind"
    )
    explain.add_argument("--profession", action="append", default=[], help="TRE_G15 code (repeatable)")
    explain.add_argument(
        "--auth-age", default="1m", type=_duration, help="how long ago the login happened (default 1m)"
    )
    explain.add_argument("--auth-mode", default="", help="PSC authMode of an e-CPS login (e.g. CARD)")
    explain.add_argument("--idnat", default="810001234567", help="idNat of the session (default an RPPS)")
    explain.set_defaults(run=_explain)

    dev = _group(commands, "dev", "development tools (never for production)")
    init = dev.add_parser("init", help="create the dev assertion key and files the embedded default needs")
    _config_option(init)
    init.set_defaults(run=_dev_init)
    browser = dev.add_parser(
        "browser", help="set up the NSS database (and Chromium) to log in with the SoftHSM test cards"
    )
    _config_option(browser)
    browser.add_argument("--nssdb", type=Path, default=None, help="NSS database (default ~/.pki/nssdb)")
    browser.add_argument(
        "--policy-dir",
        type=Path,
        default=None,
        help="Chromium managed policy directory (default /etc/chromium/policies/managed; root only)",
    )
    browser.add_argument(
        "--no-auto-select",
        action="store_true",
        help="write no policy: Chromium asks which certificate to use",
    )
    browser.set_defaults(run=_dev_browser)
    portal = dev.add_parser("portal", help="run the demo portal (the upstream of the embedded default)")
    portal.add_argument("--listen", default="127.0.0.1:8081", type=_listen_address, help="HOST:PORT")
    portal.add_argument(
        "--gateway",
        default="http://127.0.0.1:8080",
        type=_http_origin,
        help="the gateway's origin as the portal reaches it (its /.gateway/jwks.json verifies the assertions)",
    )
    portal.set_defaults(run=_dev_portal)
    _add_dev_card_commands(dev)

    card = _group(commands, "card", "CPS card tools")
    login = card.add_parser("login", help="log in with a card by PKCS#11 challenge; keep the session cookie")
    login.add_argument("--url", required=True, help="the gateway, e.g. https://portail.example")
    login.add_argument("--token-label", required=True, type=_label, help="PKCS#11 token label of the card")
    login.add_argument(
        "--module", default=None, help="PKCS#11 module (default: SoftHSM; Cryptolib CPS for real cards)"
    )
    login.add_argument(
        "--pin",
        default=None,
        help="card PIN; '-' asks for it on the terminal without echo, or reads it from standard input when there is"
        " no terminal. $GATEWAY_CARD_PIN, when set, is used instead of asking. Neither: no PIN (SoftHSM test"
        " cards). A PIN on the command line is visible to other users of the machine: prefer '-' for real cards.",
    )
    login.add_argument("--cookie-jar", default="cookies.txt", help="Netscape cookie jar to write (curl -b)")
    login.add_argument("--cacert", default=None, help="CA bundle to verify an https gateway")
    login.add_argument(
        "--cert-id",
        default=None,
        help="CKA_ID (hex) of the certificate to log in with (default: the token's one authentication"
        " certificate, digitalSignature + clientAuth; a CPS3 card also holds a signature certificate)",
    )
    login.set_defaults(run=_card_login)

    settings_tools = _group(commands, "settings", "settings tools")
    keys = settings_tools.add_parser(
        "keys", help="every settings key with its default and meaning (Markdown)"
    )
    keys.set_defaults(run=_settings_keys)

    session = _group(commands, "session", "session tools")
    revoke = session.add_parser(
        "revoke", help="log a professional out everywhere (every session of an idNat)"
    )
    _config_option(revoke)
    revoke.add_argument("--idnat", required=True, help="the professional's idNat (e.g. 810001234567)")
    revoke.set_defaults(run=_session_revoke)

    audit = _group(commands, "audit", "audit trail tools")
    verify = audit.add_parser(
        "verify", help="check the hash chain of an audit file; name the first broken line"
    )
    verify.add_argument("file", type=Path)
    verify.add_argument(
        "--key",
        type=Path,
        action="append",
        default=[],
        help="the audit.key_file of a keyed log (repeat for records written before a key change)",
    )
    verify.add_argument(
        "--head",
        help="SEQ:HASH exported earlier (log line or metric) and kept elsewhere: detects a removed tail or a "
        "rewrite up to it (a bare HASH must be the last line's)",
    )
    verify.set_defaults(run=_audit_verify)

    demo = commands.add_parser("demo", help="demo portal + gateway on the embedded default; Ctrl-C stops all")
    demo.set_defaults(run=_demo)
    return parser


def _group(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command made of subcommands (``gateway dev``): given alone, it prints its own help."""
    group = commands.add_parser(name, help=help)
    group.set_defaults(help_of=group)
    return group.add_subparsers(metavar="SUBCOMMAND")


def _duration(value: str) -> str:
    """A duration as typed (``10m``), checked now so that a typo is a usage error."""
    try:
        parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _listen_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def _http_origin(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise argparse.ArgumentTypeError(f"{value!r} is not an origin such as http://127.0.0.1:8080")
    return value.rstrip("/")


def _label(value: str) -> str:
    # An empty label names SoftHSM's free slot as well as any token made with one: never a card.
    if not value.strip():
        raise argparse.ArgumentTypeError("a token label cannot be empty")
    return value


def _uses_embedded_default(args: argparse.Namespace) -> bool:
    config = getattr(args, "config", None)
    return config is not None and config.resolve() == DEFAULT_SETTINGS_FILE.resolve()


def command_name() -> str:
    """How to type this very ``gateway`` command here: its name if the shell finds it, else its path."""
    script = Path(sys.argv[0])
    found = shutil.which("gateway")
    if script.name == "gateway" and found and Path(found).resolve() == script.resolve():
        return "gateway"
    installed = Path(sys.executable).parent / "gateway"
    if not installed.exists():
        return f"{sys.executable} -m gateway.cli"
    with contextlib.suppress(ValueError):
        return str(installed.relative_to(Path.cwd()))
    return str(installed)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_SETTINGS_FILE,
        help="settings file (default: the embedded demo default)",
    )


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _serve(args: argparse.Namespace) -> int:
    settings = _load(args)
    metrics_dir, master_pid = None, os.getpid()
    if settings.metrics is not None and not args.debug:
        from gateway.server import prepare_metrics_dir

        metrics_dir = prepare_metrics_dir()  # before anything imports prometheus_client
    from gateway.server import remove_metrics_dir, serve

    try:
        config = _validated_config(args.config)  # refuse to start on any error, before forking workers
        serve(
            config.settings,
            config.app_factory,
            debug=args.debug,
            reload_config=lambda: _validated_config(args.config),
        )
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        listeners = [f"server.listen {settings.server.listen}"]
        if settings.metrics is not None:
            listeners.append(f"metrics.listen {settings.metrics.listen}")
        print(f"error: cannot listen: {exc.strerror} ({', '.join(listeners)})", file=sys.stderr)
        return 1
    finally:
        # Workers are forked inside serve() and leave through here too: only the master cleans up.
        if metrics_dir is not None and os.getpid() == master_pid:
            remove_metrics_dir(metrics_dir)
    return EXIT_OK


def _validated_config(config_file: Path) -> LoadedConfig:
    """Settings and policies read and validated now; workers get exactly these (no second read)."""
    from gateway.app import create_app, read_policies
    from gateway.server import LoadedConfig

    settings = load_settings(config_file)
    policies = read_policies(settings)
    return LoadedConfig(settings, lambda: create_app(settings, policies=policies))


def _reload(args: argparse.Namespace) -> int:
    """Validate here first (the operator sees every error at once), then SIGHUP the master, which validates
    again: the files may change in between, and only the master's verdict counts."""
    config = _validated_config(args.config)
    pid_file = config.settings.server.pid_file
    if pid_file is None:
        print("server.pid_file is not set: cannot find the running server", file=sys.stderr)
        return EXIT_USAGE
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"cannot signal the server from {pid_file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"reload requested: SIGHUP sent to {pid} (see the server log and audit for the outcome)")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from gateway.app import read_policies

    errors: list[ConfigError] = []
    settings: Settings | None = None
    try:
        settings = _load(args)
    except ConfigErrors as exc:
        errors.extend(exc.errors)
        # Missing key files aside, the settings may still say where the policies are: check them too.
        with contextlib.suppress(ConfigErrors):
            settings = load_settings(args.config, require_files=False)
    loaded = None
    if settings is not None and all(entry.exists() for entry in settings.policies):
        try:
            loaded = read_policies(settings)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
    if errors or loaded is None:
        raise ConfigErrors(errors)
    for warning in loaded.warnings:
        print(f"warning: {warning}")
    rules = loaded.policy_set.rules
    print(f"OK: {args.config}: {len(rules)} rules in {len(loaded.policy_set.files)} policy files")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from gateway.app import read_policies

    settings = _load(args)
    policy_set = read_policies(settings).policy_set
    try:
        parts = urlsplit(args.url)
        parts.port  # noqa: B018 - validates the port now
    except ValueError as exc:
        print(f"error: {args.url!r} is not a URL or a path: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host = normalise_host(parts.netloc or urlsplit(settings.server.public_origin).netloc)
    raw_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    method = args.method.upper()
    try:
        target = normalise_target(raw_target)
    except BadPath as exc:
        print(f"request:  {method} {raw_target}\ndecision: deny (400)\nreasons:  bad_request_path: {exc}")
        return EXIT_OK
    now = time.time()
    identity = None
    if args.login:
        identity = Identity(
            idnat=args.idnat,
            method=LoginMethod(args.login),
            auth_time=now - parse_duration(args.auth_age),
            professions=tuple(args.profession),
            auth_mode=args.auth_mode or ("CARD" if args.login == "card" else ""),
        )
    print(f"request:  {method} {host or '?'} {target.path_and_query}")
    print(f"identity: {_describe(identity, args.auth_age)}")
    rule = policy_set.match(method, host or "", target.path)
    if rule is None:
        print("rule:     (none matches: default deny)")
        print("decision: deny\nreasons:  no_matching_rule")
        return EXIT_OK
    decision = decide_rule(rule, identity, now)
    print(f"rule:     {rule.name} ({rule.where}), action {rule.action.value}")
    print(f"decision: {decision.outcome.value}")
    print(f"reasons:  {', '.join(r.value for r in decision.reasons)}")
    return EXIT_OK


def _describe(identity: Identity | None, age: str) -> str:
    if identity is None:
        return "none (no session)"
    professions = ",".join(identity.professions) or "none"
    return f"{identity.method.value} login {age} ago, idNat {identity.idnat}, professions {professions}"


def _settings_keys(args: argparse.Namespace) -> int:
    from gateway.settings import documented_keys

    print("| key | default | meaning |\n|---|---|---|")
    for key, default, description in documented_keys():
        print(f"| `{key}` | `{default}` | {description.replace('|', '/')} |")
    return EXIT_OK


def _session_revoke(args: argparse.Namespace) -> int:
    from gateway.audit import AuditError
    from gateway.runtime import build_audit_log, build_session_store, marking_ended_sessions
    from gateway.sessions import SessionStoreUnavailable, idnat_tag

    settings = _load(args)
    if settings.sessions.store.startswith("memory://"):
        print(
            "sessions.store is memory://: sessions live inside the gateway process; restart it instead.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        # Marked for nginx too (forward_auth.ended_sessions): its cached allows end at once.
        store = marking_ended_sessions(settings, build_session_store(settings))
        count = store.delete_tagged(idnat_tag(args.idnat))
    except SessionStoreUnavailable:
        print("the session store is unavailable: nothing was revoked", file=sys.stderr)
        return 1
    print(f"{count} session(s) of {args.idnat} revoked")
    try:
        build_audit_log(settings).record(
            "logout", idnat=args.idnat, decision="deny", reasons=["revoked_by_operator"], sessions=count
        )
    except AuditError as exc:
        print(f"the revocation could not be audited: {exc}", file=sys.stderr)
        return 1
    return EXIT_OK


def _audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit import Head, read_audit_key, verify_audit_file

    if args.file.is_dir():
        print(
            f"error: {args.file} is a directory: name the audit file (audit.file in the settings)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.file.exists():
        print(
            f"error: no file {args.file} (audit.file in the settings names the audit file)", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        keys = [read_audit_key(path) for path in args.key]
        head = Head.parse(args.head) if args.head else None
        result = verify_audit_file(args.file, keys=keys, head=head)
    except (OSError, ValueError) as exc:
        print(f"error: cannot verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for recovery in result.recoveries:
        lines = (
            f"line {recovery.first_torn_line}"
            if recovery.first_torn_line == recovery.last_torn_line
            else f"lines {recovery.first_torn_line}-{recovery.last_torn_line}"
        )
        print(
            f"{args.file}:{recovery.line}: recovery: {recovery.length} torn byte(s) at offset {recovery.offset} "
            f"({lines}, an interrupted write) closed; checked on from there"
        )
    if not result.ok:
        print(f"{args.file}:{result.first_broken_line}: {result.problem}: {result.detail}")
        return 1
    keyed = f"keyed (key id {', '.join(result.key_ids)})" if result.key_ids else "unkeyed"
    print(f"OK: {result.lines} lines, chain intact, {keyed}; head {result.seq}:{result.head}")
    return EXIT_OK


def _dev_init(args: argparse.Namespace) -> int:
    from gateway.proxy.assertion import generate_key_file

    settings = load_settings(args.config, require_files=False)
    for entry in settings.policies:
        if not entry.exists():
            _copy_example_policies(entry)
    generate_key_file(settings.assertion.key_file)
    print(f"assertion key: {settings.assertion.key_file}")
    if settings.card is not None:
        _dev_init_pki(settings.card.trust_anchors[0].parent)
        if settings.card.host_secret_file is not None:
            from gateway.devtools.card_host import write_host_secret

            write_host_secret(settings.card.host_secret_file)
            print(f"card host secret: {settings.card.host_secret_file}")
    return EXIT_OK


#: The example policies shipped in the package (policies/ of the source checkout).
EXAMPLE_POLICIES = Path(__file__).parent / "default" / "policies"


def _copy_example_policies(directory: Path) -> None:
    directory.mkdir(parents=True)
    for policy in sorted(EXAMPLE_POLICIES.glob("*.yaml")):
        shutil.copyfile(policy, directory / policy.name)
    print(f"example policies: {directory}")


def _dev_init_pki(directory: Path) -> None:
    from datetime import UTC, datetime

    from gateway.devtools.pki import ensure_dev_pki, refresh_crls

    pki = ensure_dev_pki(directory)
    refresh_crls(pki, datetime.now(UTC))  # a CRL older than a week would refuse every card (fail closed)
    print(f"dev PKI (NOT for production): {directory}")


DEV_DIR = Path("certs/dev")
CARD_VARIANTS = ("expired", "revoked", "not-yet-valid", "wrong-ca")


def _add_dev_card_commands(dev: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pki = dev.add_parser("pki", help="create the dev PKI shaped like IGC-Santé (test only)")
    pki.add_argument("--out", type=Path, default=DEV_DIR, help="directory (default certs/dev)")
    pki.set_defaults(run=lambda args: _dev_init_pki(args.out))

    card = dev.add_parser("card", help="create a SoftHSM test card issued by the dev PKI")
    card.add_argument("--label", required=True, type=_label, help="token label")
    card.add_argument("--idnat", required=True, help="idNat, e.g. 8 + RPPS (810002813839)")
    card.add_argument("--surname", required=True)
    card.add_argument("--given", required=True)
    card.add_argument("--profession", default="10", help="TRE_G15 code (10 Médecin, 21 Pharmacien...)")
    card.add_argument(
        "--kind",
        choices=("cps", "cpe", "cpa"),
        default="cps",
        help="cps: a professional (default); cpe: establishment staff, --idnat 3<FINESS>/<no>; cpa: organisation,"
        " --idnat 5<SIRET>/<no> (each in the real subject layout of that card)",
    )
    card.add_argument("--structure", default="", help="the structure of a cpe or cpa card (its O)")
    card.add_argument(
        "--signature-key",
        action="store_true",
        help="also a signature key pair (non-repudiation certificate), like a CPS3 card",
    )
    card.add_argument("--pin", default="1234")
    card.add_argument("--dir", type=Path, default=DEV_DIR, help="dev PKI directory (default certs/dev)")
    card.add_argument("--replace", action="store_true", help="replace the card of that label if there is one")
    variant = card.add_mutually_exclusive_group()
    for name in CARD_VARIANTS:
        variant.add_argument(f"--{name}", dest="variant", action="store_const", const=name)
    card.set_defaults(run=_dev_card, variant=None)

    revoke = dev.add_parser(
        "revoke", help="list a test card in the dev CRL (its logins refused, sessions ended)"
    )
    revoke.add_argument("--label", required=True, type=_label, help="token label of the card")
    revoke.add_argument("--dir", type=Path, default=DEV_DIR, help="dev PKI directory (default certs/dev)")
    revoke.set_defaults(run=_dev_revoke)

    cards = dev.add_parser("cards", help="list the SoftHSM test cards")
    cards.add_argument("--dir", type=Path, default=DEV_DIR, help="dev PKI directory (default certs/dev)")
    cards.set_defaults(run=_dev_cards)


def _dev_card(args: argparse.Namespace) -> int:
    from gateway.devtools.cards import create_card, delete_card, list_cards, softhsm_env
    from gateway.identity import CardKind

    softhsm_conf = shown_path(Path(softhsm_env(args.dir)["SOFTHSM2_CONF"]))
    if any(token.label == args.label for token in list_cards(args.dir)):
        if not args.replace:
            gateway = command_name()
            print(
                f"a card labelled {args.label!r} already exists in {shown_path(args.dir)}: use it, e.g.\n"
                f"  SOFTHSM2_CONF={softhsm_conf} {gateway} card login --url URL --token-label {args.label}\n"
                f"or replace it: the same command with --replace (or choose another --label);"
                f" `{gateway} dev cards` lists the cards.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        delete_card(args.dir, args.label)
    try:
        card = create_card(
            args.dir,
            args.label,
            args.idnat,
            args.surname,
            args.given,
            args.profession,
            args.pin,
            args.variant,
            kind=CardKind(args.kind.upper()),
            structure_name=args.structure,
            signature_key=args.signature_key,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"card {card.label}: idNat {card.idnat}, certificate {card.pem_path}")
    print(
        f"use it with: SOFTHSM2_CONF={softhsm_conf} {command_name()} card login --token-label {card.label} …"
    )
    if args.variant == "revoked":
        print(REVOCATION_TAKES_EFFECT)
    return EXIT_OK


#: When a revocation in the dev CRL reaches a gateway (what `dev card --revoked` and `dev revoke` print).
REVOCATION_TAKES_EFFECT = (
    "revoked in the dev CRL: a running gateway refuses the card, and ends the sessions it opened, at its next CRL"
    " refresh (card.crl_refresh: every 5 min by default, 30 s in the demo); a gateway started now refuses it at"
    " once"
)


def _dev_revoke(args: argparse.Namespace) -> int:
    from gateway.authn.card.certificate import format_serial
    from gateway.devtools.cards import revoke_card

    try:
        certificates = revoke_card(args.dir, args.label)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    serials = ", ".join(format_serial(certificate.serial_number) for certificate in certificates)
    print(f"card {args.label}: serial {serials} {REVOCATION_TAKES_EFFECT}")
    return EXIT_OK


def shown_path(path: Path) -> Path:
    """``path`` as the user can type it here: relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path.resolve()


def _dev_cards(args: argparse.Namespace) -> int:
    from cryptography import x509

    from gateway.devtools.cards import list_cards

    cards = list_cards(args.dir) if args.dir.is_dir() else []
    if not cards:
        print(f"no test cards in {args.dir} (`{command_name()} dev card` makes one)", file=sys.stderr)
    for token in cards:
        for certificate in token.certificates:
            parsed = x509.load_der_x509_certificate(certificate.der)
            print(
                f"{token.label}\t{parsed.subject.rfc4514_string()}\tuntil {parsed.not_valid_after_utc:%Y-%m-%d}"
            )
        if not token.certificates:
            print(f"{token.label}\t(no certificate)")
    return EXIT_OK


def _card_login(args: argparse.Namespace) -> int:
    from gateway import pkcs11 as tokens
    from gateway.authn.card.client import CardLoginError, CardTokenError, card_login

    try:
        pin = _card_pin(args)
    except NoPin as problem:
        print(f"card login failed: {problem}", file=sys.stderr)
        return EXIT_USAGE
    module = args.module or tokens.SOFTHSM_MODULE
    try:
        subject = card_login(
            args.url, args.token_label, module, pin, args.cookie_jar, args.cacert, args.cert_id
        )
    except CardLoginError as error:
        print(f"card login failed: {error}", file=sys.stderr)
        if module == tokens.SOFTHSM_MODULE and isinstance(error, CardTokenError):
            _hint_at_softhsm2_conf(os.environ.get("SOFTHSM2_CONF"))
        return 1
    print(f"logged in as {subject}; session cookie in {args.cookie_jar}")
    return EXIT_OK


def _hint_at_softhsm2_conf(conf: str | None) -> None:
    if conf is None:
        problem = "SOFTHSM2_CONF is not set, so SoftHSM looks for tokens in its system configuration"
    elif not Path(conf).is_file():
        problem = f"SOFTHSM2_CONF names {conf}, which is not a file"
    else:
        return
    print(
        f"hint: {problem}; the test cards of `gateway dev card` are in {DEV_DIR}/softhsm:"
        f" SOFTHSM2_CONF={DEV_DIR}/softhsm/softhsm2.conf",
        file=sys.stderr,
    )


PIN_ENV = "GATEWAY_CARD_PIN"


class NoPin(Exception):
    pass


def _card_pin(args: argparse.Namespace) -> str | None:
    """--pin P; else $GATEWAY_CARD_PIN; else with --pin -, asked on the terminal without echo, or read from
    standard input when there is no terminal (``… | gateway card login --pin -``); else none (test cards)."""
    if args.pin not in (None, "-"):
        return str(args.pin)
    if PIN_ENV in os.environ:
        return os.environ[PIN_ENV]
    if args.pin is None:
        return None
    try:
        with open("/dev/tty", "rb"):  # is there a controlling terminal to ask on?
            pass
    except OSError:
        line = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.readline()
        if not line:
            raise NoPin(
                f"--pin - asks on a terminal and there is none: set {PIN_ENV}, or give the PIN on standard input"
            ) from None
        return line.rstrip("\r\n")
    try:
        return getpass.getpass(f"PIN of the card {args.token_label}: ")
    except EOFError:
        raise NoPin("no PIN typed") from None


def _dev_browser(args: argparse.Namespace) -> int:
    from gateway.devtools.browser import CHROMIUM_POLICY_DIR, BrowserSetupError, set_up_browser

    settings = load_settings(args.config)
    if settings.card is None:
        print(
            f"error: {args.config} has no card section: no card login to set a browser up for",
            file=sys.stderr,
        )
        return EXIT_USAGE
    policy_dir = None if args.no_auto_select else (args.policy_dir or CHROMIUM_POLICY_DIR)
    try:
        setup = set_up_browser(
            settings.card.trust_anchors[0].parent, settings.card.login_origin, args.nssdb, policy_dir
        )
    except BrowserSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"NSS database {setup.nssdb}: SoftHSM module (slots FRIENDLY), dev server CA trusted for TLS")
    if setup.policy_file is not None:
        print(
            f"Chromium picks the card's certificate on {settings.card.login_origin} by itself: {setup.policy_file}"
        )
    elif policy_dir is not None:
        print(
            f"Chromium will ask which certificate to use on {settings.card.login_origin}. To skip that question,"
            f" write this, as root, to {policy_dir}/cps-gateway-dev-cards.json:\n{setup.policy}",
            end="",
        )
    print(
        "Start the browser with the cards' SoftHSM (after making new cards, run this command again):\n"
        f"  SOFTHSM2_CONF={setup.softhsm_conf} chromium {settings.server.public_origin}/"
    )
    return EXIT_OK


def _dev_portal(args: argparse.Namespace) -> int:
    from gateway.devtools.demo_portal import run

    host, port = args.listen
    run(host, port, args.gateway)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from gateway.devtools.demo import run_demo

    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
