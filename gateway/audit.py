"""Audit log: one JSON line per event (decision, login attempt, ban, quota breach...), hash-chained.

Chain design. Every line is the canonical JSON (sorted keys, no spaces, ASCII) of a record holding:

- ``seq``: 1, 2, 3... in file order (continued when appending to an existing file);
- ``prev``: SHA-256 hex of the previous line's exact bytes (without its newline); 64 zeros on the first line;
- ``hash``: SHA-256 hex of the canonical JSON of the record without ``hash``.

``hash`` catches an edit of any line, the last one included; ``prev`` ties each line to the exact bytes of its
predecessor (an edit with a recomputed hash, an insertion, a removal); ``seq`` tells a removal from a
reordering or an insertion, so :func:`verify_audit_file` can say what happened and where. The chain is not
keyed: someone able to rewrite the whole file from some line on can forge a consistent tail, and removing the
last lines leaves a valid shorter chain. Ship :attr:`AuditLog.head` (the last line's hash) elsewhere (syslog,
metrics) to anchor it.

Several gateway processes may append to one file: each append takes an exclusive ``flock``, reads the last
line under it, and writes one line in a single ``write`` on an ``O_APPEND`` descriptor.

Nothing secret is written: keys that name secrets (token, pin, password, cookie, authorization, assertion,
signature, secret) are replaced by ``"[redacted]"``, JWT-looking strings too, and exceptions become their
class name only (their messages may quote tokens).
"""

from __future__ import annotations

import enum
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

ZERO_HASH = "0" * 64
REDACTED = "[redacted]"
#: Fields every record carries (empty when not applicable), so consumers see one stable shape.
STANDARD_FIELDS = (
    "request_id",
    "client_ip",
    "idnat",
    "method",
    "auth_mode",
    "rule",
    "decision",
)
_CHAIN_FIELDS = frozenset({"seq", "prev", "hash"})
#: Keywords ``record`` refuses: the chain and the timestamp are the log's own.
_RESERVED = _CHAIN_FIELDS | {"time"}
_SECRET_WORDS = ("secret", "token", "password", "passwd", "cookie", "authorization", "assertion", "signature")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_TAIL_CHUNK = 64 * 1024


class AuditError(Exception):
    code = "audit_error"


@functools.lru_cache(maxsize=4096)  # records reuse a handful of field names
def is_secret_key(key: str) -> bool:
    """True for keys that name a secret: ``id_token``, ``idToken``, ``user_pin``, ``Set-Cookie``..."""
    words = [w for w in _WORD_SPLIT.split(_CAMEL.sub("_", key).lower()) if w]
    return any(
        any(secret in word for secret in _SECRET_WORDS) or word.startswith("pin") or word.endswith("pin")
        for word in words
    )


def redact(value: Any) -> Any:
    """A JSON-safe copy of ``value`` with secrets removed."""
    if isinstance(value, Mapping):
        return {str(k): REDACTED if is_secret_key(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return redact(value.value)
    if isinstance(value, BaseException):
        # Never the message: exceptions from HTTP and JWT libraries quote tokens and headers.
        return type(value).__name__
    if isinstance(value, str):
        return _JWT.sub(REDACTED, value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return REDACTED
    return f"<{type(value).__name__}>"


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rfc3339(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Append-only audit events. ``target`` is a file path (shared by processes, chain continued across
    restarts) or a binary/text stream (one process; the chain starts at zero)."""

    def __init__(self, target: str | os.PathLike[str] | IO[Any]) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._stream: IO[Any] | None = None
        self._fd = -1
        self._fd_pid = 0
        self._closed = False
        self._pending: list[_Slot] = []
        self._pending_lock = threading.Lock()
        #: (file size after our last append, its hash, its seq): skips re-reading the tail we wrote.
        self._own_tail: tuple[int, str, int] | None = None
        if isinstance(target, str | os.PathLike):
            self._path = Path(target)
            self._open()
        else:
            self._stream = target
        self._stream_prev = ZERO_HASH
        self._stream_seq = 0
        self.head = ZERO_HASH

    def _open(self) -> None:
        assert self._path is not None
        # Read-write: the tail that ``prev`` hashes is read through the very descriptor we append to, so a
        # rotated (renamed) file never gets a chain continued from its successor.
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        # flock excludes open file descriptions, not processes: a descriptor inherited through fork (a WSGI
        # server preloading the app) would let workers write together. Each process opens its own.
        self._fd_pid = os.getpid()
        self._own_tail = None

    def reopen(self) -> None:
        """Start writing to the file now at the path (after log rotation renamed the old one)."""
        with self._lock:
            if self._path is not None and not self._closed:
                if self._fd >= 0:
                    os.close(self._fd)
                self._open()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def record(
        self,
        event: str,
        *,
        now: float | None = None,
        reasons: Iterable[Any] = (),
        **fields: Any,
    ) -> dict[str, Any]:
        """Append one event; returns the record written.

        Standard fields (request_id, client_ip, idnat, method, auth_mode, rule, decision) are always present;
        any other keyword is an event-specific field.
        """
        clash = _RESERVED & fields.keys()
        if clash:
            raise ValueError(f"reserved audit field(s): {sorted(clash)}")
        body: dict[str, Any] = {
            "time": rfc3339(time.time() if now is None else now),
            "event": str(event),
            "reasons": [str(redact(r)) for r in reasons],
        }
        for name in STANDARD_FIELDS:
            body[name] = redact(fields.pop(name, "")) or ""
        for key, value in fields.items():
            body[key] = REDACTED if is_secret_key(key) else redact(value)
        if self._path is not None:
            return self._append_to_file(body)
        with self._lock:
            return self._append_to_stream(body)

    def _chained(self, body: dict[str, Any], prev: str, seq: int) -> tuple[dict[str, Any], bytes]:
        record = {**body, "seq": seq, "prev": prev}
        record["hash"] = _sha256(canonical(record))
        line = canonical(record)
        self.head = _sha256(line)
        return record, line

    def _append_to_stream(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self._stream is not None
        record, line = self._chained(body, self._stream_prev, self._stream_seq + 1)
        if isinstance(self._stream, io.TextIOBase):
            self._stream.write(line.decode() + "\n")
        else:
            self._stream.write(line + b"\n")
        self._stream.flush()
        self._stream_prev, self._stream_seq = self.head, record["seq"]
        return record

    def _append_to_file(self, body: dict[str, Any]) -> dict[str, Any]:
        """Group commit: the caller's record is written by whichever thread writes next, together with the
        records other threads queued meanwhile (one flock, one tail read, one write). Every caller returns
        only once its own line is in the file, as with one write per record, but threads no longer queue
        behind each other's lock + syscalls one record at a time."""
        slot = _Slot(body)
        with self._pending_lock:
            self._pending.append(slot)
        with self._lock:
            if not slot.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._write_batch(batch)
        if slot.error is not None:
            raise AuditError(f"audit record not written: {slot.error}")
        assert slot.record is not None
        return slot.record

    def _write_batch(self, batch: list[_Slot]) -> None:
        try:
            if self._closed:
                raise AuditError("audit log is closed")
            if self._fd_pid != os.getpid():
                self._open()  # inherited through fork: get our own open file description
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(self._fd).st_size
                if self._own_tail is not None and self._own_tail[0] == size:
                    # Nobody wrote after our last line: its hash and number are known, no need to read it.
                    _, prev, seq = self._own_tail
                    complete = True
                else:
                    last, complete = _last_line(self._fd)
                    prev, seq = (ZERO_HASH, 0) if last is None else (_sha256(last), _seq_of(last))
                lines = []
                for slot in batch:
                    seq += 1
                    slot.record, line = self._chained(slot.body, prev, seq)
                    prev = self.head
                    lines.append(line)
                # A torn last line (crash mid-write) is closed first: it stays visible to verify, never merged.
                data = (b"" if complete else b"\n") + b"\n".join(lines) + b"\n"
                written = os.write(self._fd, data)
                if written != len(data):
                    raise AuditError("short write to the audit log")
                self._own_tail = (size + written, self.head, seq)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except (OSError, AuditError) as exc:
            for slot in batch:
                slot.error = exc
                slot.record = None
        for slot in batch:
            slot.done = True


class _Slot:
    """One record waiting for the next batch write."""

    __slots__ = ("body", "done", "error", "record")

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.done = False
        self.record: dict[str, Any] | None = None
        self.error: Exception | None = None


def _last_line(fd: int) -> tuple[bytes | None, bool]:
    """The file's last line (without newline) and whether it ended with a newline; None when empty."""
    end = os.fstat(fd).st_size
    if end == 0:
        return None, True
    buffer = b""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        buffer = os.pread(fd, end - start, start) + buffer
        end = start
        body = buffer[:-1] if buffer.endswith(b"\n") else buffer
        cut = body.rfind(b"\n")
        if cut >= 0 or end == 0:
            return body[cut + 1 :], buffer.endswith(b"\n")
    return None, True


def _seq_of(line: bytes) -> int:
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, KeyError, TypeError):
        return 0
    return seq if isinstance(seq, int) else 0


@dataclass(frozen=True, slots=True)
class VerificationResult:
    ok: bool
    #: Lines read (the whole file, even past the first problem).
    lines: int
    #: 1-based number of the first broken line; None when ok.
    first_broken_line: int | None = None
    #: "not_json", "edited", "removed", "reordered", "inserted" or "truncated".
    problem: str | None = None
    detail: str = ""
    #: SHA-256 of the last line: compare with the anchored head to detect a removed tail.
    head: str = ZERO_HASH


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    raw: bytes
    record: dict[str, Any] | None


def _parse(number: int, raw: bytes) -> _Line:
    try:
        record = json.loads(raw)
    except ValueError:
        return _Line(number, raw, None)
    well_formed = (
        isinstance(record, dict)
        and isinstance(record.get("seq"), int)
        and isinstance(record.get("prev"), str)
        and isinstance(record.get("hash"), str)
    )
    return _Line(number, raw, record if well_formed else None)


def _self_consistent(line: _Line) -> bool:
    assert line.record is not None
    without_hash = {k: v for k, v in line.record.items() if k != "hash"}
    return line.record["hash"] == _sha256(canonical(without_hash)) and line.raw == canonical(line.record)


def verify_audit_file(path: str | os.PathLike[str]) -> VerificationResult:
    data = Path(path).read_bytes()
    if not data:
        return VerificationResult(True, 0)
    complete = data.endswith(b"\n")
    raws = (data[:-1] if complete else data).split(b"\n")
    lines = [_parse(i, raw) for i, raw in enumerate(raws, 1)]
    head = _sha256(raws[-1])
    line_hashes = {_sha256(raw) for raw in raws}

    def broken(number: int, problem: str, detail: str) -> VerificationResult:
        return VerificationResult(False, len(lines), number, problem, detail, head)

    expected_seq, expected_prev = 1, ZERO_HASH
    for index, line in enumerate(lines):
        record = line.record
        if record is None:
            return broken(line.number, "not_json", "not a JSON audit record (seq, prev, hash)")
        if not _self_consistent(line):
            return broken(line.number, "edited", "content does not match its hash")
        seq, later = record["seq"], lines[index + 1 :]
        following = later[0].record if later else None
        if seq == expected_seq and record["prev"] == expected_prev:
            expected_seq, expected_prev = seq + 1, _sha256(line.raw)
            continue
        if seq == expected_seq:
            if following is not None and following.get("seq") == seq:
                return broken(line.number, "inserted", "a line with a copied sequence number was inserted")
            if index == 0:
                return broken(1, "edited", "the first line does not start the chain")
            return broken(
                line.number - 1, "edited", f"line {line.number} was chained to different bytes for this line"
            )
        # A genuine line out of place still chains to a line present in the file; a forged one does not.
        genuine = record["prev"] in line_hashes
        if seq > expected_seq:
            if genuine:
                return broken(line.number, "reordered", f"line {seq} comes before line {expected_seq}")
            if following is not None and following.get("seq") == expected_seq:
                return broken(line.number, "inserted", "a line was inserted here")
            if any(other.record and other.record.get("seq") == expected_seq for other in later):
                return broken(line.number, "reordered", f"line {seq} comes before line {expected_seq}")
            return broken(
                line.number, "removed", f"{seq - expected_seq} line(s) missing before this one (seq {seq})"
            )
        # seq < expected_seq: this sequence number was already used.
        previous = lines[index - 1] if index else None
        if previous is not None and previous.raw == line.raw:
            return broken(line.number, "inserted", "a duplicate of the previous line")
        if (
            previous is not None
            and previous.record is not None
            and previous.record.get("seq") == seq
            and previous.record.get("prev") == record["prev"]
        ):
            return broken(line.number - 1, "inserted", "a forged line was inserted before this one")
        if genuine:
            return broken(line.number, "reordered", f"line {seq} comes after line {expected_seq - 1}")
        return broken(line.number, "inserted", "a line that belongs to no place in the chain")
    if not complete:
        return broken(len(lines), "truncated", "the last line has no newline (torn write)")
    return VerificationResult(True, len(lines), head=head)
