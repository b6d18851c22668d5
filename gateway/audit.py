"""Audit log: one JSON line per event (decision, login attempt, ban, quota breach...), hash-chained.

Chain design. Every line is the canonical JSON (sorted keys, no spaces, ASCII) of a record holding:

- ``seq``: 1, 2, 3... in file order (continued when appending to an existing file, across restarts);
- ``prev``: SHA-256 hex of the previous record's exact bytes (without its newline); 64 zeros on the first;
- ``hash``: SHA-256 hex of the canonical JSON of the record without ``hash`` or, with a key
  (``audit.key_file``), its HMAC-SHA256 under that key; keyed records also carry ``kid``, the key's id.

``hash`` catches an edit of any line, the last one included; ``prev`` ties each line to the exact bytes of its
predecessor (an edit with a recomputed hash, an insertion, a removal); ``seq`` tells a removal from a
reordering or an insertion, so :func:`verify_audit_file` can say what happened and where. Without a key,
someone able to rewrite the file from some line on can forge a consistent tail; with one, only a holder of
the key can. Either way removing the last lines leaves a valid shorter chain: the master exports the head
(sequence + hash, :class:`HeadExporter`) as a log line and a metric, to be kept off-host and given to
``gateway audit verify --head``.

Torn writes. A write cut short (disk full, crash) leaves bytes that are not a complete record. Whoever appends
next (this process or another, or a gateway started later) first writes an ``audit_recovery`` record
chained from the last complete record, naming the torn bytes (offset, length, SHA-256); they stay in the
file, and the verifier reports them as a recovery and checks everything after. A record the log could not
write makes :meth:`AuditLog.record` raise :class:`AuditError` (the request is refused with 503); the first
record written after such an outage is an ``audit_resumed`` record saying since when and how many records
were lost. Writing never raises at construction: a gateway whose audit file cannot be opened still starts,
and :meth:`AuditLog.unavailable` (readiness) says why it is not ready and retries.

Several gateway processes may append to one file: each append takes an exclusive ``flock``, reads the tail
under it, and writes its lines in a single ``write`` on an ``O_APPEND`` descriptor.

Nothing secret is written: keys that name secrets (token, pin, password, cookie, authorization, assertion,
signature, secret) are replaced by ``"[redacted]"``, JWT-looking strings too, and exceptions become their
class name only (their messages may quote tokens).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
_CHAIN_FIELDS = frozenset({"seq", "prev", "hash", "kid"})
#: Keywords ``record`` refuses: the chain and the timestamp are the log's own.
_RESERVED = _CHAIN_FIELDS | {"time"}
_SECRET_WORDS = ("secret", "token", "password", "passwd", "cookie", "authorization", "assertion", "signature")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_TAIL_CHUNK = 64 * 1024
#: Events the log writes about itself.
RECOVERY_EVENT = "audit_recovery"
RESUMED_EVENT = "audit_resumed"
#: Readiness fails below this much free space where the audit file lives (a few thousand records).
MIN_FREE_BYTES = 64 * 1024
#: A key shorter than this is refused: the chain is only as strong as the key is hard to guess.
MIN_KEY_BYTES = 32

log = logging.getLogger("gateway.audit")


class AuditError(Exception):
    """A record could not be written: the caller refuses what it was about to do (503)."""

    code = "audit_unavailable"
    #: For :meth:`AuditLog.record_batch`: how many of the batch's first records were written nonetheless.
    written = 0


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
    kind = type(value)
    if kind is str:
        # The substring test first: a regex scan of every field of every record cost a sixth of the access
        # stream's CPU, and a token always holds it.
        return _JWT.sub(REDACTED, value) if "eyJ" in value else value
    if value is None or kind is int or kind is bool or kind is float:
        return value  # before the isinstance tests (an ABC check for Mapping): most fields are plain
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
    return _CANONICAL.encode(record).encode()


#: One encoder for every record (json.dumps with these options builds a new one each call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _json_object(*members: bytes) -> bytes:
    """A JSON object from its canonical members (``"key":value``), in the order given; empty ones skipped."""
    return b"{" + b",".join(member for member in members if member) + b"}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rfc3339(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class AuditKey:
    """The secret keying the chain (HMAC-SHA256); ``kid`` names it in every record without revealing it."""

    secret: bytes = field(repr=False)

    @property
    def kid(self) -> str:
        return hashlib.sha256(b"cps-gateway audit key id\0" + self.secret).hexdigest()[:16]


def read_audit_key(path: str | os.PathLike[str]) -> AuditKey:
    """The key in ``path`` (its bytes, surrounding whitespace removed): e.g. ``openssl rand -hex 32``."""
    secret = Path(path).read_bytes().strip()
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"an audit key holds at least {MIN_KEY_BYTES} bytes (openssl rand -hex 32)")
    return AuditKey(secret)


def _seal(unsealed: Mapping[str, Any], key: AuditKey | None) -> str:
    """The ``hash`` field of a record: SHA-256 of its canonical JSON, or HMAC-SHA256 under ``key``."""
    return _seal_canonical(canonical(unsealed), key)


def _seal_canonical(data: bytes, key: AuditKey | None) -> str:
    if key is None:
        return _sha256(data)
    return hmac.new(key.secret, data, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    """The last record of a chain: its sequence number and the SHA-256 of its line (the next ``prev``)."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """``SEQ:HASH`` as exported (a bare ``HASH`` names the last line, whatever its number: seq -1)."""
        seq, _, digest = text.strip().rpartition(":")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or (seq and not seq.isdigit()):
            raise ValueError(f"{text!r} is not SEQ:HASH (e.g. 1234:{'ab' * 32})")
        return cls(int(seq) if seq else -1, digest)


EMPTY_HEAD = Head(0, ZERO_HASH)


def _describe(error: BaseException) -> str:
    """An operator-facing cause without secrets: ``OSError ENOSPC (No space left on device)``."""
    if isinstance(error, OSError) and error.errno is not None:
        return f"{type(error).__name__} {errno.errorcode.get(error.errno, error.errno)} ({os.strerror(error.errno)})"
    return (
        f"{type(error).__name__}: {error}"
        if isinstance(error, AuditError | ValueError)
        else type(error).__name__
    )


def _free_bytes(directory: Path) -> int | None:
    """Space the gateway may still write in ``directory``'s file system (root may use the reserved blocks)."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
    return blocks * stats.f_frsize


@dataclass(slots=True)
class _Outage:
    """Records this process could not write, since when and why (cleared by an ``audit_resumed`` record)."""

    since: float
    cause: str
    lost: int


class AuditLog:
    """Append-only audit events. ``target`` is a file path (shared by processes, chain continued across
    restarts) or a binary/text stream (one process; the chain starts at zero).

    ``key_file`` keys the chain (read when the file is opened, so an unreadable key is an outage like an
    unwritable file, never a crash). ``retry_interval``: how often :meth:`unavailable` tries again during an
    outage (requests try on their own at each record).
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | IO[Any],
        *,
        key_file: str | os.PathLike[str] | None = None,
        retry_interval: float = 1.0,
    ) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._stream: IO[Any] | None = None
        self._key_file = Path(key_file) if key_file is not None else None
        self._key: AuditKey | None = None
        self._fd = -1
        self._fd_pid = 0
        self._closed = False
        self._pending: list[_Slot] = []
        self._pending_lock = threading.Lock()
        #: (file size after our last append, its hash, its seq): skips re-reading the tail we wrote.
        self._own_tail: tuple[int, str, int] | None = None
        self._outage: _Outage | None = None
        self._retry_interval = retry_interval
        self._last_attempt = -math.inf
        self._stream_prev = ZERO_HASH
        self._stream_seq = 0
        #: SHA-256 of the last line this object wrote.
        self.head = ZERO_HASH
        if isinstance(target, str | os.PathLike):
            self._path = Path(target)
            with self._lock:
                self._write_batch([])  # opens the file and closes a torn tail now; never raises
        else:
            self._stream = target

    def _open(self) -> None:
        assert self._path is not None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._key_file is not None and self._key is None:
            self._key = read_audit_key(self._key_file)
        self._path.parent.mkdir(parents=True, exist_ok=True)
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
                    self._fd = -1
                self._write_batch([])

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

    def unavailable(self) -> str | None:
        """None when records can be written; else why not (for readiness). During an outage, tries again at
        most every ``retry_interval`` seconds, so the log resumes by itself even when no request comes. A file
        system with less than ``MIN_FREE_BYTES`` left counts too: every process of the instance says so, not
        only those whose writes already failed."""
        if self._path is None:
            return None
        if self._outage is None:
            free = _free_bytes(self._path.parent)
            if free is not None and free < MIN_FREE_BYTES:
                return f"the audit file system is full ({free} bytes free)"
            return None
        with self._lock:
            if self._outage is not None and time.monotonic() - self._last_attempt >= self._retry_interval:
                self._write_batch([])
            outage = self._outage
        if outage is None:
            return None
        # No path: readiness answers anyone who asks; the log line names the file.
        return f"the audit file cannot be written since {rfc3339(outage.since)}: {outage.cause}"

    def record(
        self,
        event: str,
        *,
        now: float | None = None,
        reasons: Iterable[Any] = (),
        **fields: Any,
    ) -> dict[str, Any]:
        """Append one event; returns the record written. Raises :class:`AuditError` when it was not written.

        Standard fields (request_id, client_ip, idnat, method, auth_mode, rule, decision) are always present;
        any other keyword is an event-specific field.
        """
        clash = _RESERVED & fields.keys()
        if clash:
            raise ValueError(f"reserved audit field(s): {sorted(clash)}")
        body = _body(event, time.time() if now is None else now, reasons, fields)
        if self._path is not None:
            return self._append_to_file(body)
        with self._lock:
            return self._append_to_stream(body)

    def record_batch(self, events: Iterable[tuple[str, float, Mapping[str, Any]]]) -> int:
        """Append several ``(event, now, fields)`` in one write (one lock, one tail read); returns how many.

        Raises :class:`AuditError` when not all of them were written; its ``written`` says how many of the
        first ones are in the file (whole records: their requests count as audited)."""
        bodies = []
        for event, now, fields in events:
            clash = _RESERVED & fields.keys()
            if clash:
                raise ValueError(f"reserved audit field(s): {sorted(clash)}")
            fields = dict(fields)
            bodies.append(_body(event, now, fields.pop("reasons", ()), fields))
        if self._path is None:
            with self._lock:
                for written, body in enumerate(bodies):
                    try:
                        self._append_to_stream(body)
                    except AuditError as exc:
                        exc.written = written
                        raise
            return len(bodies)
        slots = [_Slot(body) for body in bodies]
        with self._lock:
            self._write_batch(slots)
        written = sum(1 for _ in itertools.takewhile(lambda slot: slot.error is None, slots))
        if written < len(slots):
            error = AuditError(f"audit records not written: {slots[written].error}")
            error.written = written
            raise error
        return written

    def _chained(self, body: dict[str, Any], prev: str, seq: int) -> tuple[dict[str, Any], bytes]:
        record = {**body, "seq": seq, "prev": prev}
        if self._key is not None:
            record["kid"] = self._key.kid
        # canonical(record) is the members before "hash", "hash", the members after it (keys sorted): each
        # half is encoded once for both the seal and the line, not the whole record twice.
        before = canonical({name: value for name, value in record.items() if name < "hash"})[1:-1]
        after = canonical({name: value for name, value in record.items() if name > "hash"})[1:-1]
        record["hash"] = seal = _seal_canonical(_json_object(before, after), self._key)
        return record, _json_object(before, b'"hash":"' + seal.encode("ascii") + b'"', after)

    def _append_to_stream(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self._stream is not None
        record, line = self._chained(body, self._stream_prev, self._stream_seq + 1)
        try:
            if isinstance(self._stream, io.TextIOBase):
                self._stream.write(line.decode() + "\n")
            else:
                self._stream.write(line + b"\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:
            raise AuditError(f"audit record not written: {_describe(exc)}") from None
        self.head = _sha256(line)
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
        """Write ``batch`` (the caller holds ``self._lock``), preceded when needed by a recovery record (torn
        tail) and a resumed record (after an outage). Never raises: each slot gets its record or its error."""
        self._last_attempt = time.monotonic()
        bodies: list[dict[str, Any]] = []
        complete = prefix = 0
        try:
            if self._closed:
                raise AuditError("audit log is closed")
            if self._fd < 0 or self._fd_pid != os.getpid():
                self._open()  # first use, after a failed open, or inherited through fork
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                tail = self._tail()
                if tail.torn is not None:
                    bodies.append(_recovery_body(tail))
                if self._outage is not None:
                    bodies.append(_resumed_body(self._outage))
                prefix = len(bodies)
                bodies.extend(slot.body for slot in batch)
                error = None
                if bodies:
                    complete, error = self._append(tail, bodies, batch)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if error is not None:
                raise error
        except (OSError, ValueError, AuditError) as exc:
            unwritten = batch[max(0, complete - prefix) :]
            for slot in unwritten:
                slot.error = _describe(exc)
            self._outage_goes_on(exc, len(unwritten))
        else:
            self._outage_ends()
        for slot in batch:
            slot.done = True

    def _append(
        self, tail: _Tail, bodies: list[dict[str, Any]], batch: list[_Slot]
    ) -> tuple[int, OSError | None]:
        """One write of ``bodies`` chained after ``tail``: how many of them are whole in the file, and the
        error that cut the write short (None when all of it was written)."""
        prev, seq = tail.prev, tail.seq
        lines, records = [], []
        for body in bodies:
            seq += 1
            record, line = self._chained(body, prev, seq)
            prev = _sha256(line)
            records.append((record, prev))
            lines.append(line)
        # A torn last line (crash mid-write) is closed first: it stays visible to verify, never merged.
        lead = b"\n" if tail.needs_newline else b""
        data = lead + b"\n".join(lines) + b"\n"
        size = os.fstat(self._fd).st_size
        written, error = 0, None
        try:
            while written < len(data):  # a short write is retried once: it fails with the real cause
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            error = exc
        # A line is whole once its bytes are in (its newline may be missing: the next writer adds it).
        end, complete = len(lead), 0
        for line in lines:
            end += len(line)
            if end > written:
                break
            complete += 1
            end += 1
        first_slot = len(bodies) - len(batch)
        for index in range(complete):
            record, line_hash = records[index]
            self.head = line_hash
            if index >= first_slot:
                batch[index - first_slot].record = record
        self._own_tail = (size + written, prev, seq) if error is None else None
        return complete, error

    def _tail(self) -> _Tail:
        size = os.fstat(self._fd).st_size
        if self._own_tail is not None and self._own_tail[0] == size:
            # Nobody wrote after our last line: its hash and number are known, no need to read it.
            _, prev, seq = self._own_tail
            return _Tail(prev, seq)
        return _scan_tail(self._fd, size)

    def _outage_goes_on(self, error: BaseException, lost: int) -> None:
        self._own_tail = None
        cause = _describe(error)
        if self._outage is None:
            self._outage = _Outage(time.time(), cause, lost)
            # Once per outage, without a traceback: every request refused meanwhile would repeat it.
            log.error(
                "audit file %s cannot be written (%s): requests that must be audited are refused with 503 "
                "until it can",
                self._path,
                cause,
            )
        else:
            self._outage.cause = cause
            self._outage.lost += lost

    def _outage_ends(self) -> None:
        outage, self._outage = self._outage, None
        if outage is not None:
            log.warning(
                "audit file %s written again after %.1f s; %d record(s) could not be written meanwhile "
                "(their requests were refused)",
                self._path,
                time.time() - outage.since,
                outage.lost,
            )


class _Slot:
    """One record waiting for the next batch write."""

    __slots__ = ("body", "done", "error", "record")

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.done = False
        self.record: dict[str, Any] | None = None
        self.error: str | None = None


def _body(event: str, now: float, reasons: Iterable[Any], fields: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "time": rfc3339(now),
        "event": str(event),
        "reasons": [str(redact(r)) for r in reasons],
    }
    for name in STANDARD_FIELDS:
        body[name] = redact(fields.pop(name, "")) or ""
    for key, value in fields.items():
        body[key] = REDACTED if is_secret_key(key) else redact(value)
    return body


def _recovery_body(tail: _Tail) -> dict[str, Any]:
    assert tail.torn is not None
    offset, length, digest = tail.torn
    return _body(
        RECOVERY_EVENT,
        time.time(),
        ["torn_write"],
        {"torn_offset": offset, "torn_length": length, "torn_sha256": digest, "pid": os.getpid()},
    )


def _resumed_body(outage: _Outage) -> dict[str, Any]:
    return _body(
        RESUMED_EVENT,
        time.time(),
        ["audit_unavailable"],
        {
            "failed_since": rfc3339(outage.since),
            "cause": outage.cause,
            "records_lost": outage.lost,
            "pid": os.getpid(),
        },
    )


# --- The tail of a file: where the chain goes on -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tail:
    """What the next record chains to: the last whole record's hash and number, and what follows it."""

    prev: str
    seq: int
    #: Bytes after the last whole record that are no record: (offset, length, SHA-256); None when clean.
    torn: tuple[int, int, str] | None = None
    #: The file does not end with a newline (a torn line, or a whole record whose newline was cut).
    needs_newline: bool = False


def _is_record(raw: bytes) -> bool:
    """A complete record as the log writes them (parsed, canonical). Its hash is not checked: the tail may
    be keyed with a key this process does not hold (rotation)."""
    record = _record_of(raw)
    return record is not None and raw == canonical(record)


def _scan_tail(fd: int, size: int) -> _Tail:
    """Find the last whole record, reading backwards from the end in chunks (one chunk in the usual case)."""
    if size == 0:
        return _Tail(ZERO_HASH, 0)
    ends_with_newline = os.pread(fd, 1, size - 1) == b"\n"
    buffer, start = b"", size
    last: bytes | None = None
    last_end = 0  # offset just past the last whole record's bytes
    while start > 0 and last is None:
        chunk_start = max(0, start - _TAIL_CHUNK)
        buffer = os.pread(fd, start - chunk_start, chunk_start) + buffer
        start = chunk_start
        pieces = buffer.split(b"\n")
        offsets = [start]
        for piece in pieces[:-1]:
            offsets.append(offsets[-1] + len(piece) + 1)
        # The first piece may begin before this chunk: judge it only once the file's start is reached.
        first = 0 if start == 0 else 1
        for index in range(len(pieces) - 1, first - 1, -1):
            if pieces[index] and _is_record(pieces[index]):
                last, last_end = pieces[index], offsets[index] + len(pieces[index])
                break
    prev, seq = (ZERO_HASH, 0) if last is None else (_sha256(last), _seq_of(last))
    if last is not None and (last_end == size or (last_end == size - 1 and ends_with_newline)):
        return _Tail(prev, seq, needs_newline=not ends_with_newline)
    torn_start = 0 if last is None else last_end + 1
    torn_end = size - 1 if ends_with_newline else size
    digest = _sha256_of_range(fd, torn_start, torn_end)
    return _Tail(prev, seq, (torn_start, torn_end - torn_start, digest), needs_newline=not ends_with_newline)


def _sha256_of_range(fd: int, start: int, end: int) -> str:
    digest = hashlib.sha256()
    while start < end:
        chunk = os.pread(fd, min(_TAIL_CHUNK, end - start), start)
        if not chunk:
            break
        digest.update(chunk)
        start += len(chunk)
    return digest.hexdigest()


def _record_of(raw: bytes) -> dict[str, Any] | None:
    """The record on a line if it has the chain's shape (seq, prev, hash), else None."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    well_formed = (
        isinstance(record, dict)
        and isinstance(record.get("seq"), int)
        and isinstance(record.get("prev"), str)
        and isinstance(record.get("hash"), str)
    )
    return record if well_formed else None


def _seq_of(line: bytes) -> int:
    record = _record_of(line)
    return record["seq"] if record is not None else 0


def read_head(path: str | os.PathLike[str]) -> Head:
    """The head of the chain in ``path``: its last whole record (torn bytes after it are not part of it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        tail = _scan_tail(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return Head(tail.seq, tail.prev)


class HeadExporter:
    """Exports the head of the audit file every ``interval`` seconds, from one process per instance (the
    gunicorn master): a log line on ``gateway.audit`` and, through ``publish``, metrics. Either, kept
    off-host, anchors the chain: ``gateway audit verify --head SEQ:HASH`` then detects a cut tail or a
    rewrite up to that record, even by someone holding the key."""

    def __init__(
        self,
        path: Callable[[], Path | None],
        interval: Callable[[], float],
        publish: Callable[[str, Head], None] | None = None,
    ) -> None:
        self._path = path
        self._interval = interval
        self._publish = publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-head", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def export_once(self) -> Head | None:
        path = self._path()
        if path is None:
            return None
        try:
            head = read_head(path)
        except OSError as exc:
            log.warning("audit head of %s cannot be read: %s", path, _describe(exc))
            return None
        log.info("audit head: file=%s seq=%d hash=%s", path, head.seq, head.hash)
        if self._publish is not None:
            self._publish(str(path), head)
        return head

    def _run(self) -> None:
        while not self._stop.is_set():
            self.export_once()
            self._stop.wait(self._interval())


# --- Verification -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recovery:
    """Torn bytes closed by a recovery record."""

    #: 1-based line of the ``audit_recovery`` record.
    line: int
    #: 1-based lines the torn bytes span.
    first_torn_line: int
    last_torn_line: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class VerificationResult:
    ok: bool
    #: Lines read (the whole file, even past the first problem).
    lines: int
    #: 1-based number of the first broken line; None when ok.
    first_broken_line: int | None = None
    #: "not_json", "torn", "edited", "removed", "reordered", "inserted", "unkeyed", "key_required",
    #: "unknown_key" or "head_missing".
    problem: str | None = None
    detail: str = ""
    #: SHA-256 of the last record's line: compare with the anchored head to detect a removed tail.
    head: str = ZERO_HASH
    #: Sequence number of the last record.
    seq: int = 0
    #: Torn writes closed by recovery records; everything after each was checked.
    recoveries: tuple[Recovery, ...] = ()
    #: Key ids the records were keyed with (empty: an unkeyed chain).
    key_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    offset: int
    raw: bytes
    record: dict[str, Any] | None


def _seal_problem(line: _Line, keys: Mapping[str, AuditKey]) -> tuple[str, str] | None:
    assert line.record is not None
    kid = line.record.get("kid")
    key = None
    if kid is None:
        if keys:
            return (
                "unkeyed",
                "a record without a MAC in a log verified with a key (forged, or written without one)",
            )
    elif not isinstance(kid, str) or kid not in keys:
        if not keys:
            return "key_required", f"the log is keyed (key id {kid}): verify it with --key"
        return "unknown_key", f"keyed with key id {kid}, none of the keys given"
    else:
        key = keys[kid]
    unsealed = {k: v for k, v in line.record.items() if k != "hash"}
    intact = hmac.compare_digest(str(line.record["hash"]), _seal(unsealed, key))
    if not intact or line.raw != canonical(line.record):
        return "edited", "content does not match its hash"
    return None


def _torn_problem(recovery: _Line, first_torn: _Line, data: bytes) -> str | None:
    """Why ``recovery`` does not name exactly the bytes from ``first_torn`` up to itself, or None."""
    assert recovery.record is not None
    start, end = first_torn.offset, recovery.offset - 1
    if recovery.record.get("event") != RECOVERY_EVENT:
        return "not a JSON audit record (seq, prev, hash), and no recovery record names it"
    named = (
        recovery.record.get("torn_offset"),
        recovery.record.get("torn_length"),
        recovery.record.get("torn_sha256"),
    )
    if named != (start, end - start, _sha256(data[start:end])):
        return f"these bytes differ from the torn bytes the recovery record on line {recovery.number} names"
    return None


def verify_audit_file(
    path: str | os.PathLike[str], *, keys: Iterable[AuditKey] = (), head: Head | None = None
) -> VerificationResult:
    """Check the chain from its first line; ``keys`` check keyed records; ``head`` (exported earlier, kept
    elsewhere) must still be in the file, unchanged."""
    data = Path(path).read_bytes()
    by_kid = {key.kid: key for key in keys}
    complete = data.endswith(b"\n")
    raws = (data[:-1] if complete else data).split(b"\n") if data else []
    lines, offset = [], 0
    for number, raw in enumerate(raws, 1):
        lines.append(_Line(number, offset, raw, _record_of(raw)))
        offset += len(raw) + 1
    record_hashes = {_sha256(line.raw) for line in lines if line.record is not None}
    recoveries: list[Recovery] = []
    kids: set[str] = set()
    last: _Line | None = None

    def broken(number: int, problem: str, detail: str) -> VerificationResult:
        head_hash = _sha256(last.raw) if last is not None else ZERO_HASH
        return VerificationResult(
            False, len(lines), number, problem, detail, head_hash, 0, tuple(recoveries), tuple(sorted(kids))
        )

    expected_seq, expected_prev = 1, ZERO_HASH
    anchored: _Line | None = None
    index = 0
    torn_from: _Line | None = None
    while index < len(lines):
        line = lines[index]
        record = line.record
        if record is None:
            # Bytes that are no record: torn, and then the next record must be a recovery naming them all.
            following = next((later for later in lines[index:] if later.record is not None), None)
            if following is None:
                return broken(
                    line.number,
                    "torn",
                    "the file ends with bytes that are not a whole record (a torn write; the gateway closes "
                    "it with a recovery record when it next writes)",
                )
            problem = _torn_problem(following, line, data)
            if problem is not None:
                return broken(line.number, "not_json", problem)
            torn_from = line
            index = following.number - 1
            continue
        seal_problem = _seal_problem(line, by_kid)
        if seal_problem is not None:
            return broken(line.number, *seal_problem)
        if record.get("event") == RECOVERY_EVENT and torn_from is None:
            return broken(line.number, "edited", "a recovery record names torn bytes that are not before it")
        if isinstance(record.get("kid"), str):
            kids.add(record["kid"])
        seq, later = record["seq"], lines[index + 1 :]
        following_record = later[0].record if later else None
        if seq == expected_seq and record["prev"] == expected_prev:
            expected_seq, expected_prev = seq + 1, _sha256(line.raw)
            if torn_from is not None:
                recoveries.append(
                    Recovery(
                        line.number,
                        torn_from.number,
                        line.number - 1,
                        torn_from.offset,
                        record.get("torn_length", 0),
                    )
                )
                torn_from = None
            if head is not None and seq == head.seq:
                anchored = line
            last = line
            index += 1
            continue
        if seq == expected_seq:
            if following_record is not None and following_record.get("seq") == seq:
                return broken(line.number, "inserted", "a line with a copied sequence number was inserted")
            if last is None:
                return broken(line.number, "edited", "the first record does not start the chain")
            return broken(
                last.number, "edited", f"line {line.number} was chained to different bytes for this line"
            )
        # A genuine line out of place still chains to a line present in the file; a forged one does not.
        genuine = record["prev"] in record_hashes
        if seq > expected_seq:
            if genuine:
                return broken(line.number, "reordered", f"line {seq} comes before line {expected_seq}")
            if following_record is not None and following_record.get("seq") == expected_seq:
                return broken(line.number, "inserted", "a line was inserted here")
            if any(other.record and other.record.get("seq") == expected_seq for other in later):
                return broken(line.number, "reordered", f"line {seq} comes before line {expected_seq}")
            return broken(
                line.number, "removed", f"{seq - expected_seq} line(s) missing before this one (seq {seq})"
            )
        # seq < expected_seq: this sequence number was already used.
        if last is not None and last.raw == line.raw:
            return broken(line.number, "inserted", "a duplicate of the previous line")
        if (
            last is not None
            and last.record is not None
            and last.record.get("seq") == seq
            and last.record.get("prev") == record["prev"]
        ):
            return broken(last.number, "inserted", "a forged line was inserted before this one")
        if genuine:
            return broken(line.number, "reordered", f"line {seq} comes after line {expected_seq - 1}")
        return broken(line.number, "inserted", "a line that belongs to no place in the chain")
    head_hash = _sha256(last.raw) if last is not None else ZERO_HASH
    if head is not None:
        anchor_problem = _anchor_problem(head, anchored, head_hash, expected_seq - 1)
        if anchor_problem is not None:
            return broken(anchored.number if anchored else len(lines), *anchor_problem)
    return VerificationResult(
        True,
        len(lines),
        head=head_hash,
        seq=expected_seq - 1,
        recoveries=tuple(recoveries),
        key_ids=tuple(sorted(kids)),
    )


def _anchor_problem(
    head: Head, anchored: _Line | None, last_hash: str, last_seq: int
) -> tuple[str, str] | None:
    if head.seq < 0:  # a bare hash: the last line
        if head.hash == last_hash:
            return None
        return "head_missing", f"the last line's hash is not {head.hash}: lines were removed at the end"
    if anchored is None:
        return (
            "head_missing",
            f"no record {head.seq} (the file ends at {last_seq}): lines were removed at the end",
        )
    if _sha256(anchored.raw) != head.hash:
        return "edited", f"record {head.seq} is not the one anchored ({head.hash}): the log was rewritten"
    return None
