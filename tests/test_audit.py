"""Audit log: hash chain, tamper detection with the right line number, redaction, concurrent appends."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gateway.audit import ZERO_HASH, AuditLog, _sha256, canonical, is_secret_key, verify_audit_file
from gateway.policy.decision import Reason
from tests.support.processes import REPO_ROOT

T0 = 1_700_000_000.0


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


def test_a_torn_last_line_is_closed_before_the_next_append(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 2)
    with open(log_path, "ab") as f:
        f.write(b'{"event":"decis')
    assert verify_audit_file(log_path).problem == "not_json"
    with AuditLog(log_path) as log:
        log.record("decision", now=T0)
    lines = log_path.read_bytes().splitlines()
    assert lines[2] == b'{"event":"decis' and json.loads(lines[3])["event"] == "decision"
    assert verify_audit_file(log_path).first_broken_line == 3


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
