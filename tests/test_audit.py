"""Audit log: hash chain, tamper detection with the right line number, redaction, concurrent appends."""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gateway.audit import (
    ZERO_HASH,
    AuditError,
    AuditKey,
    AuditLog,
    Head,
    _seal,
    _sha256,
    canonical,
    is_secret_key,
    read_audit_key,
    read_head,
    verify_audit_file,
)
from gateway.policy.decision import Reason
from tests.support.audit import audit_records
from tests.support.faults import fill_up, immutable, small_tmpfs
from tests.support.processes import REPO_ROOT

T0 = 1_700_000_000.0
TORN = b'{"event":"decis'


def write_log(path: Path, count: int = 6) -> list[bytes]:
    with AuditLog(path) as log:
        for i in range(count):
            log.record(
                "decision",
                now=T0 + i,
                request_id=f"req-{i}",
                client_ip="192.0.2.10",
                idnat="810002813839",
                method="GET",
                rule="patient_record",
                decision="allow",
                reasons=[Reason.AUTHENTICATED],
            )
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def resealed_line(record: dict) -> bytes:
    """The line a forger would write: ``record`` with its own hash recomputed, as the log computes it."""
    unsealed = {key: value for key, value in record.items() if key != "hash"}
    return canonical({**unsealed, "hash": _sha256(canonical(unsealed))}) + b"\n"


def test_records_have_the_documented_shape_and_the_chain_verifies(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    first = json.loads(lines[0])
    assert first["time"] == "2023-11-14T22:13:20.000Z"
    assert first["prev"] == ZERO_HASH and first["seq"] == 1
    assert first["reasons"] == ["authenticated"]
    assert {"event", "request_id", "client_ip", "idnat", "method", "auth_mode", "rule", "decision"} <= set(
        first
    )
    result = verify_audit_file(log_path)
    assert result.ok and result.lines == 6 and result.first_broken_line is None


@pytest.mark.parametrize("keyed", [False, True], ids=["sha256", "hmac"])
def test_each_line_is_the_canonical_json_of_its_record_and_its_seal(tmp_path: Path, keyed: bool) -> None:
    """Lines are put together from the halves of the record around "hash": byte for byte canonical()."""
    key_file = tmp_path / "audit.key"
    key_file.write_text(secrets.token_hex(32))
    log_path = tmp_path / "audit.jsonl"
    fields = [
        {},  # only the standard fields
        {"aaa": 1, "hash_like": "x", "ha": "é", "zz": {"hash": "nested", "a": [1, {"z": 0, "b": None}]}},
        {"h": '"hash":"forged"', "hasg": 1.5, "hasi": True},
    ]
    with AuditLog(log_path, key_file=key_file if keyed else None) as log:
        for extra in fields:
            log.record("decision", now=T0, **extra)
    lines = log_path.read_bytes().splitlines()
    for line in lines:
        record = json.loads(line)
        assert line == canonical(record)
        unsealed = {name: value for name, value in record.items() if name != "hash"}
        assert record["hash"] == _seal(unsealed, read_audit_key(key_file) if keyed else None)
    assert verify_audit_file(log_path, keys=[read_audit_key(key_file)] if keyed else ()).ok


def test_appending_from_a_new_log_object_continues_the_chain(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 3)
    with AuditLog(log_path) as log:
        record = log.record("config_reload", now=T0 + 10, files=["policies/amelipro.yaml"])
    assert record["seq"] == 4
    assert verify_audit_file(log_path).ok


def test_empty_file_verifies(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"")
    assert verify_audit_file(tmp_path / "a.jsonl").ok


@pytest.mark.parametrize("line", [1, 3, 6])
def test_edit_is_detected_on_the_edited_line(tmp_path: Path, line: int) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    lines[line - 1] = lines[line - 1].replace(b'"decision":"allow"', b'"decision":"deny"')
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.ok, result.first_broken_line, result.problem) == (False, line, "edited")


def test_edit_with_recomputed_hash_is_detected_on_the_edited_line(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    lines[2] = resealed_line({**json.loads(lines[2]), "idnat": "899999999999"})
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (3, "edited")


def test_whitespace_only_edit_is_detected(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    lines[5] = lines[5].replace(b",", b", ", 1)
    rewrite(log_path, lines)
    assert verify_audit_file(log_path).first_broken_line == 6


@pytest.mark.parametrize("line", [1, 4])
def test_removal_is_detected_where_the_gap_is(tmp_path: Path, line: int) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    del lines[line - 1]
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (line, "removed")


def test_removing_the_tail_changes_the_head_to_anchor(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog(log_path) as log:
        for i in range(4):
            log.record("decision", now=T0 + i)
        anchored = log.head
    assert verify_audit_file(log_path).head == anchored
    rewrite(log_path, log_path.read_bytes().splitlines(keepends=True)[:-1])
    result = verify_audit_file(log_path)
    assert result.ok and result.head != anchored  # only the anchor reveals a removed tail


@pytest.mark.parametrize("first, second", [(2, 3), (1, 5)])
def test_reordering_is_detected(tmp_path: Path, first: int, second: int) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    lines[first - 1], lines[second - 1] = lines[second - 1], lines[first - 1]
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (first, "reordered")


def test_forged_insertion_is_detected_on_the_inserted_line(tmp_path: Path) -> None:
    """The forger knows the format: right seq, right prev, valid own hash."""
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    forged = {
        **json.loads(lines[2]),
        "idnat": "899999999999",
        "seq": 4,
        "prev": _sha256(lines[2].rstrip(b"\n")),
    }
    lines.insert(3, resealed_line(forged))
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (4, "inserted")


@pytest.mark.parametrize("seq", [99, 2])
def test_insertion_with_any_sequence_number_is_detected(tmp_path: Path, seq: int) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    lines.insert(3, resealed_line({**json.loads(lines[2]), "seq": seq, "prev": "ab" * 32}))
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (4, "inserted")


def test_duplicated_line_is_detected(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    lines.insert(2, lines[1])
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (3, "inserted")


def test_garbage_line_is_reported_as_not_json(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path)
    lines[4] = b"hello\n"
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (5, "not_json")


def torn_log(path: Path, torn: bytes = TORN, *, after: int = 1) -> list[bytes]:
    """Two records, ``torn`` bytes as a write cut short leaves them, then ``after`` records (the first
    append closes the torn bytes with a recovery record); the file's lines."""
    write_log(path, 2)
    with open(path, "ab") as f:
        f.write(torn)
    if after:
        write_log(path, after)
    return path.read_bytes().splitlines(keepends=True)


def test_a_torn_last_line_gets_a_recovery_record_chained_from_the_last_whole_one(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines, torn = torn_log(log_path, after=0)[:2], TORN
    assert verify_audit_file(log_path).problem == "torn"
    with AuditLog(log_path) as log:  # (re)opening the file closes the torn line at once
        log.record("decision", now=T0)
    raws = log_path.read_bytes().splitlines()
    recovery, after = json.loads(raws[3]), json.loads(raws[4])
    assert raws[2] == torn
    assert recovery["event"] == "audit_recovery"
    assert (recovery["seq"], recovery["prev"]) == (3, _sha256(lines[1].rstrip(b"\n")))
    offset = len(b"".join(lines))
    assert (recovery["torn_offset"], recovery["torn_length"]) == (offset, len(torn))
    assert recovery["torn_sha256"] == _sha256(torn)
    assert after["seq"] == 4 and after["prev"] == _sha256(raws[3])
    result = verify_audit_file(log_path)
    assert result.ok, result
    assert [(r.line, r.first_torn_line, r.offset, r.length) for r in result.recoveries] == [
        (4, 3, offset, len(torn))
    ]
    assert result.seq == 4


def test_everything_after_a_recovery_is_still_checked(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = torn_log(log_path, after=3)
    assert len(lines) == 2 + 1 + 1 + 3 and verify_audit_file(log_path).ok
    lines[5] = lines[5].replace(b"req-1", b"req-9")
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (6, "edited")


def test_torn_bytes_changed_after_their_recovery_are_detected(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    data = b"".join(torn_log(log_path, b'{"event":"decision","idnat":"7777'))
    log_path.write_bytes(data.replace(b'"idnat":"7777', b'"idnat":"7778'))
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (3, "not_json")
    assert "recovery record on line 4" in result.detail


def test_a_recovery_record_without_torn_bytes_before_it_is_detected(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = torn_log(log_path)
    del lines[2]  # the torn bytes removed, the recovery record left
    rewrite(log_path, lines)
    result = verify_audit_file(log_path)
    assert (result.first_broken_line, result.problem) == (3, "edited")


def test_successive_torn_writes_are_named_by_one_recovery(tmp_path: Path) -> None:
    """A recovery record itself torn (the disk still full) is part of the torn bytes the next one names."""
    log_path = tmp_path / "audit.jsonl"
    torn_log(log_path, b'{"event":"decis\n{"event":"audit_recov')
    result = verify_audit_file(log_path)
    assert result.ok, result
    assert [(r.first_torn_line, r.last_torn_line, r.line) for r in result.recoveries] == [(3, 4, 5)]
    assert result.seq == 4


def test_a_whole_last_record_missing_only_its_newline_needs_no_recovery(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 2)
    log_path.write_bytes(log_path.read_bytes()[:-1])
    assert verify_audit_file(log_path).ok
    write_log(log_path, 1)
    result = verify_audit_file(log_path)
    assert result.ok and result.lines == 3 and result.recoveries == ()


def test_sequences_continue_across_restarts(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    torn_log(log_path, after=2)
    write_log(log_path, 2)
    seqs = [json.loads(line)["seq"] for line in log_path.read_bytes().splitlines() if line.endswith(b"}")]
    assert seqs == [1, 2, 3, 4, 5, 6, 7]
    assert read_head(log_path) == Head(7, _sha256(log_path.read_bytes().splitlines()[-1]))


def test_secrets_are_never_written() -> None:
    stream = io.BytesIO()
    log = AuditLog(stream)
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiI4MTAwIn0.c2lnbmF0dXJl"
    try:
        raise ValueError(f"bad token {jwt}")
    except ValueError as exc:
        error = exc
    log.record(
        "login_attempt",
        now=T0,
        idnat="810002813839",
        id_token=jwt,
        idToken=jwt,
        user_pin="1234",
        password="hunter2",
        headers={"Cookie": "gw_session=abc", "Authorization": "Bearer xyz", "Accept": "text/html"},
        X_Gateway_Assertion="assertion-value",
        client_secret="s3cr3t",
        signature="c2ln",
        error=error,
        note=f"callback carried {jwt}",
        mapping="kept",
    )
    text = stream.getvalue().decode()
    for secret in (
        jwt,
        "1234",
        "hunter2",
        "gw_session=abc",
        "Bearer xyz",
        "assertion-value",
        "s3cr3t",
        "c2ln",
    ):
        assert secret not in text
    record = json.loads(text)
    assert record["error"] == "ValueError"
    assert record["headers"] == {"Cookie": "[redacted]", "Authorization": "[redacted]", "Accept": "text/html"}
    assert record["mapping"] == "kept" and record["note"] == "callback carried [redacted]"


@pytest.mark.parametrize(
    "key, secret",
    [
        ("id_token", True),
        ("idToken", True),
        ("PIN", True),
        ("user_pin", True),
        ("Set-Cookie", True),
        ("saml_assertion", True),
        ("spinner", False),
        ("mapping", False),
        ("shipping", False),
        ("idnat", False),
        ("reasons", False),
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_chain_fields_cannot_be_overridden() -> None:
    with pytest.raises(ValueError):
        AuditLog(io.BytesIO()).record("decision", prev="0" * 64)


def test_threads_appending_keep_a_valid_chain(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog(log_path) as log:

        def work(n: int) -> None:
            for i in range(100):
                written = log.record("decision", now=T0 + i, request_id=f"t{n}-{i}")
                assert written["request_id"] == f"t{n}-{i}"  # each caller gets its own record back

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result = verify_audit_file(log_path)
    assert result.ok and result.lines == 1600
    ids = [json.loads(line)["request_id"] for line in log_path.read_text().splitlines()]
    assert sorted(ids) == sorted(f"t{n}-{i}" for n in range(16) for i in range(100))  # none lost, none twice


def test_two_processes_appending_concurrently_keep_a_valid_chain(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    script = textwrap.dedent(
        f"""
        import sys
        from gateway.audit import AuditLog
        with AuditLog({str(log_path)!r}) as log:
            for i in range(300):
                log.record("decision", now={T0} + i, request_id=f"{{sys.argv[1]}}-{{i}}")
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, name], cwd=REPO_ROOT) for name in ("a", "b")]
    assert [p.wait(timeout=30) for p in procs] == [0, 0]
    result = verify_audit_file(log_path)
    assert result.ok, result
    assert result.lines == 600
    ids = [json.loads(line)["request_id"] for line in log_path.read_bytes().splitlines()]
    assert {i.split("-")[0] for i in ids} == {"a", "b"}


def _append_many(log: AuditLog, name: str) -> None:
    for i in range(300):
        log.record("decision", now=T0 + i, request_id=f"{name}-{i}")


def test_processes_forked_with_an_open_log_keep_a_valid_chain(tmp_path: Path) -> None:
    """Like a WSGI server that preloads the app, then forks workers sharing the log object."""
    import multiprocessing

    log_path = tmp_path / "audit.jsonl"
    log = AuditLog(log_path)
    log.record("config_reload", now=T0)
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=_append_many, args=(log, name)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    log.close()
    result = verify_audit_file(log_path)
    assert result.ok, result
    assert result.lines == 601


def test_reopen_after_rotation_starts_a_new_chain(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    with AuditLog(log_path) as log:
        log.record("decision", now=T0)
        log_path.rename(tmp_path / "audit.jsonl.1")
        log.record("decision", now=T0 + 1)  # still the old file until reopened
        log.reopen()
        first_new = log.record("decision", now=T0 + 2)
    assert first_new["prev"] == ZERO_HASH and first_new["seq"] == 1
    assert verify_audit_file(tmp_path / "audit.jsonl.1").lines == 2
    assert verify_audit_file(tmp_path / "audit.jsonl.1").ok and verify_audit_file(log_path).ok


# --- Keyed chain -------------------------------------------------------------------------------------------


@pytest.fixture
def audit_key(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def write_keyed_log(path: Path, key_file: Path, count: int = 4) -> list[bytes]:
    with AuditLog(path, key_file=key_file) as log:
        for i in range(count):
            log.record("decision", now=T0 + i, request_id=f"req-{i}", idnat="810002813839", decision="allow")
    return path.read_bytes().splitlines(keepends=True)


def test_a_keyed_chain_verifies_only_with_its_key(tmp_path: Path, audit_key: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_keyed_log(log_path, audit_key)
    key = read_audit_key(audit_key)
    assert all(json.loads(line)["kid"] == key.kid for line in lines)
    result = verify_audit_file(log_path, keys=[key])
    assert result.ok and result.key_ids == (key.kid,)
    assert verify_audit_file(log_path).problem == "key_required"
    other = AuditKey(secrets.token_bytes(32))
    assert verify_audit_file(log_path, keys=[other]).problem == "unknown_key"


def test_a_keyed_chain_cannot_be_rewritten_without_the_key(tmp_path: Path, audit_key: Path) -> None:
    """What an unkeyed chain cannot stop: a tail rewritten from some line on with every hash recomputed."""
    log_path = tmp_path / "audit.jsonl"
    lines = write_keyed_log(log_path, audit_key)
    key = read_audit_key(audit_key)
    forged = json.loads(lines[2])
    forged["idnat"] = "810009999999"
    guessed = AuditKey(secrets.token_bytes(32))
    # Keyed with a guessed secret but the real key id, then the next line re-chained to it.
    unsealed = {k: v for k, v in forged.items() if k != "hash"}
    forged["hash"] = _seal(unsealed, guessed)
    lines[2] = canonical(forged) + b"\n"
    following = json.loads(lines[3])
    following["prev"] = _sha256(lines[2].rstrip(b"\n"))
    lines[3] = canonical(
        {**following, "hash": _seal({k: v for k, v in following.items() if k != "hash"}, guessed)}
    )
    rewrite(log_path, [*lines[:3], lines[3] + b"\n"])
    result = verify_audit_file(log_path, keys=[key])
    assert (result.first_broken_line, result.problem) == (3, "edited")


def test_unkeyed_records_in_a_keyed_log_are_detected(tmp_path: Path, audit_key: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_keyed_log(log_path, audit_key)
    forged = {k: v for k, v in json.loads(lines[3]).items() if k != "kid"}
    lines[3] = resealed_line(forged)
    rewrite(log_path, lines)
    result = verify_audit_file(log_path, keys=[read_audit_key(audit_key)])
    assert (result.first_broken_line, result.problem) == (4, "unkeyed")


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_text("too-short\n")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        read_audit_key(path)


# --- Head ---------------------------------------------------------------------------------------------------


def test_an_anchored_head_reveals_a_cut_tail_and_a_rewrite(tmp_path: Path, audit_key: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_keyed_log(log_path, audit_key, 5)
    key = read_audit_key(audit_key)
    anchored = read_head(log_path)
    assert anchored.seq == 5
    write_keyed_log(log_path, audit_key, 2)  # the log goes on after the head was exported
    assert verify_audit_file(log_path, keys=[key], head=anchored).ok
    rewrite(log_path, lines[:4])
    result = verify_audit_file(log_path, keys=[key], head=anchored)
    assert result.problem == "head_missing" and "no record 5" in result.detail
    assert verify_audit_file(log_path, keys=[key]).ok  # without the anchor, a shorter chain looks whole


def test_the_head_of_a_file_with_a_torn_tail_is_its_last_whole_record(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    lines = write_log(log_path, 3)
    with open(log_path, "ab") as f:
        f.write(b'{"event":"dec')
    assert read_head(log_path) == Head(3, _sha256(lines[2].rstrip(b"\n")))
    (tmp_path / "empty").touch()
    assert read_head(tmp_path / "empty") == Head(0, ZERO_HASH)


def test_head_parsing() -> None:
    digest = "ab" * 32
    assert Head.parse(f"12:{digest}") == Head(12, digest)
    assert Head.parse(digest) == Head(-1, digest)
    with pytest.raises(ValueError):
        Head.parse("12:nothex")


# --- Outages: the log never crashes its process, says why it cannot write, and resumes by itself ----------


def test_an_unwritable_file_is_an_outage_not_a_crash(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 2)
    with immutable(log_path):
        log = AuditLog(log_path, retry_interval=0)  # a worker booting now: no exception
        assert "EPERM" in (log.unavailable() or "")
        with pytest.raises(AuditError):
            log.record("decision", now=T0)
    assert log.unavailable() is None  # writable again: the readiness probe resumes the log by itself
    log.record("decision", now=T0)
    log.close()
    resumed = audit_records(log_path, "audit_resumed")
    assert [r["records_lost"] for r in resumed] == [1]
    assert "EPERM" in resumed[0]["cause"]
    assert verify_audit_file(log_path).ok


def test_a_full_disk_tears_a_line_then_the_log_recovers_by_itself(tmp_path: Path) -> None:
    with small_tmpfs("64k") as mount:
        log_path = mount / "audit.jsonl"
        log = AuditLog(log_path, retry_interval=0)
        log.record("decision", now=T0, request_id="before")
        filler = fill_up(mount)
        # A process that has not written since says so too (readiness of every worker of the instance).
        assert "file system is full" in (AuditLog(log_path).unavailable() or "")
        written = 0
        with pytest.raises(
            AuditError
        ):  # tmpfs allocates pages: the file's last page fills, then a write is cut
            for written in range(1000):  # noqa: B007 - counted for the message below
                log.record("decision", now=T0, request_id="x" * 300)
        assert log_path.read_bytes()[-1:] != b"\n", f"no torn line after {written} records"
        assert log.unavailable() is not None
        filler.unlink()
        assert log.unavailable() is None
        log.record("decision", now=T0, request_id="after")
        log.close()
        result = verify_audit_file(log_path)
        assert result.ok, result
        assert len(result.recoveries) == 1
        events = [r["event"] for r in audit_records(log_path, skip_torn=True)]
        assert events[-3:] == ["audit_recovery", "audit_resumed", "decision"]
