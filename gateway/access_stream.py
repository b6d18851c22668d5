"""The access stream: every request nginx serves through the gateway's policies lands in the audit trail.

In forward-auth mode nginx forwards requests itself and may answer from its decision cache without asking the
gateway. So the decision endpoint audits nothing: nginx writes one access-log line per request on a protected
route (``deploy/nginx/forward-auth.conf``, format ``cps_gateway_access``: JSON, one line per request, public
routes left out), carrying the request's facts and the decision token the gateway returned with its answer
(:data:`DECISION_HEADER`, also cached with it). The gateway reads that file and appends, per line, one
``access`` record to the hash-chained audit trail, with the time nginx served it; cached or not, every access
is one record, except the requests nginx refused itself before any decision (429 over a client's limit, 400
for a malformed request): consecutive ones are listed in one ``access_refused_by_nginx`` record, so that a
client flooding nginx with them cannot make the trail lag (they cost the reader about 7 µs a line instead of
28). Allowed
requests on quota rules are counted from the same stream (``count_served``).

Loss. The file is the journal, and nothing but this reader removes the need for it:

- nginx writes each line with one ``write`` as the request ends (no buffer: a crash of nginx loses no line
  it has written; a line being written when the machine stops may be torn, and is recorded as unreadable);
- the reader keeps its position in a file beside the audit log (inode, byte offset, written after each
  batch); a reader that died between writing records and its position finds the true one in the audit trail
  itself (each access record carries ``log_position``), so a line is recorded once;
- while no reader runs, lines wait in the file; the next reader starts where the last one stopped;
- rotation: rename the file, then make nginx reopen its logs (``nginx -s reopen``, SIGUSR1); the reader
  finishes the renamed file (followed by inode, also found by inode after a restart) before the new one.
  A file truncated in place (``copytruncate``) loses what was written between the copy and the truncation:
  do not rotate that way (the reader records an ``access_log_truncated`` event when it sees it).

Lateness. The reader polls every ``poll_interval`` (0.1 s) and writes what it read at once, so records land
within about that while it keeps up. Decisions need the stream healthy (:class:`StreamHealth`): when the
trail lags more than ``forward_auth.max_lag`` behind the file, when the reader reports an error, or when no
reader has run for that long, every decision is refused (503) and readiness fails. What nginx serves then
is only what its cache still holds (``forward_auth.cache_seconds``), so while the gateway runs every access
is recorded at most ``max_lag + cache_seconds`` after it happened; when the gateway stops, its accesses wait
in the file and are recorded when it starts again.

One reader per file: every worker process runs :meth:`AccessStream.run`, and only the one holding an
exclusive ``flock`` on the position file reads; another takes over within a second when it dies.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from gateway.audit import AuditError, AuditLog
from gateway.limits import ServedRequest

log = logging.getLogger("gateway.access_stream")

#: The decision token the gateway returns to nginx with every answer; nginx logs it with the access.
DECISION_HEADER = "X-Gateway-Decision"
#: Audit event of one access nginx served (cached decision or not).
ACCESS_EVENT = "access"
#: Audit event of a line that is not a ``cps_gateway_access`` record (torn by a crash, or foreign).
UNREADABLE_EVENT = "access_unreadable"
#: Audit event when the file shrank under the reader (truncated in place): lines may be missing.
TRUNCATED_EVENT = "access_log_truncated"
#: Audit event when the file the reader stopped in is gone (rotated and deleted meanwhile).
MISSING_EVENT = "access_log_missing"
#: Audit event of consecutive requests nginx refused itself before asking any decision (4xx: 429 over the
#: client's limit, 400 for a malformed request or a crafted Cookie header): one record listing each of them
#: (time, request id, client address, method, path, status, reason), so that a client flooding nginx with
#: requests it refuses cannot make the trail lag behind the file (each costs the reader a few microseconds
#: instead of a record's ~28). Nothing reached the portal: no decision let it in.
NGINX_REFUSED_EVENT = "access_refused_by_nginx"
#: Accesses listed at most in one ``access_refused_by_nginx`` record.
MAX_NGINX_REFUSED_PER_RECORD = 1000
#: How the template's lines without a decision end (checked before any parsing).
_UNDECIDED_TAILS = (
    b'"decision":"","cache":"","reason":"rate_limited"}',
    b'"decision":"","cache":"","reason":""}',
)
#: The outcome of a decision on a public route: nginx does not log those requests (no record, as in proxy mode).
PUBLIC = "public"

_SAFE_VALUE = re.compile(r"[A-Za-z0-9._~,:@!$*+-]*")
#: Lines read at most in one batch (one audit write): bounds memory and how long a batch holds the GIL.
MAX_BATCH_BYTES = 1 << 20
#: The position file is rewritten in place, padded to this size (no truncation between two versions).
_POSITION_SIZE = 512
#: How far back the audit file is searched for the last access record when a reader starts.
_TAIL_SEARCH_BYTES = 16 << 20


def _encode(value: str) -> str:
    return value if _SAFE_VALUE.fullmatch(value) else quote(value, safe="")


@dataclass(frozen=True, slots=True)
class DecisionToken:
    """What the access record needs from the decision: outcome, reasons, rule, identity, and the id of the
    decision (the request id of the request it was made for: cached answers repeat it).

    Written as ``<outcome> key=value ...`` (values percent-encoded when they hold other characters than
    letters, digits and ``._~,:@!$*+-``), so that it needs no escaping in a header or in nginx's JSON log."""

    outcome: str
    decision_id: str
    rule: str = ""
    reasons: tuple[str, ...] = ()
    idnat: str = ""
    method: str = ""
    auth_mode: str = ""
    #: The resource a quota rule counted (its last read is refreshed by every cached re-read).
    resource: str | None = None

    def encode(self) -> str:
        parts = [self.outcome, f"id={_encode(self.decision_id)}"]
        for key, value in (
            ("rule", self.rule),
            ("reasons", ",".join(self.reasons)),
            ("idnat", self.idnat),
            ("method", self.method),
            ("mode", self.auth_mode),
        ):
            if value:
                parts.append(f"{key}={_encode(value)}")
        if self.resource is not None:
            parts.append(f"resource={_encode(self.resource)}")
        return " ".join(parts)

    @classmethod
    def decode(cls, text: str) -> DecisionToken | None:
        """The token, or None when ``text`` is not one (empty: nginx could not ask the gateway)."""
        outcome, *pairs = text.split(" ")
        if not outcome or not outcome.isalpha():
            return None
        fields: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                return None
            fields[key] = unquote(value) if "%" in value else value
        reasons = fields.get("reasons", "")
        return cls(
            outcome=outcome,
            decision_id=fields.get("id", ""),
            rule=fields.get("rule", ""),
            reasons=tuple(reasons.split(",")) if reasons else (),
            idnat=fields.get("idnat", ""),
            method=fields.get("method", ""),
            auth_mode=fields.get("mode", ""),
            resource=fields.get("resource"),
        )


#: The fields of a ``cps_gateway_access`` line (deploy/nginx/forward-auth.conf), all JSON strings.
LINE_FIELDS = (
    "time",
    "request_id",
    "client_ip",
    "http_method",
    "uri",
    "status",
    "decision",
    "cache",
    "reason",
)


def _access_line(raw: bytes) -> dict[str, Any] | None:
    """One line of the template's format: a JSON object holding every LINE_FIELDS as a string, else None."""
    line = json.loads(raw.decode("utf-8", _LINE_ERRORS))
    # No Python-level loop over the fields: one set of their types.
    if type(line) is not dict or {type(value) for value in map(line.get, LINE_FIELDS)} != {str}:
        return None
    return line


@functools.lru_cache(maxsize=4096)
def _decoded(text: str) -> DecisionToken | None:
    """DecisionToken.decode, remembered: the accesses a cached decision lets in all carry its very token."""
    return DecisionToken.decode(text)


def _bytes_as_json_text(error: UnicodeError) -> tuple[str, int]:
    """Bytes that are not UTF-8 as the text ``\\xNN``, escaped for JSON. nginx writes the URI's bytes as they
    came (escape=json escapes none above 0x7f), always inside a JSON string: the line stays valid JSON (an
    allowed access is never an unreadable line) and its URI shows them as backslashreplace would."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    bad = error.object[error.start : error.end]
    return "".join(f"\\\\x{byte:02x}" for byte in bad), error.end


_LINE_ERRORS = "gateway-access-line"
codecs.register_error(_LINE_ERRORS, _bytes_as_json_text)


def access_event(raw: bytes, position: str) -> tuple[tuple[str, float, dict[str, Any]], ServedRequest | None]:
    """The audit event ``(event, time, fields)`` for one line of the access log, and the request to count
    for a quota when it is one."""
    try:
        line = _access_line(raw)
        if line is None:
            raise ValueError("not a cps_gateway_access line")
        served_at = float(line["time"])
        status = int(line["status"])
    except ValueError:
        text = raw.decode("utf-8", _LINE_ERRORS)
        fields = {"log_position": position, "length": len(raw), "line": text[:4096]}
        return (UNREADABLE_EVENT, time.time(), fields), None
    token = _decoded(line["decision"])
    uri = line["uri"]
    fields = {
        "request_id": line["request_id"],
        "client_ip": line["client_ip"],
        "http_method": line["http_method"],
        "path": uri.partition("?")[0],
        "status": status,
        "cached": line["cache"] == "HIT",
        "log_position": position,
    }
    served = None
    if token is None:
        # nginx could not ask the gateway (502), or refused before asking (a crafted Cookie header): 4xx/5xx.
        fields["reasons"] = [line["reason"]] if line["reason"] else []
    else:
        fields.update(
            decision=token.outcome,
            reasons=list(token.reasons),
            decision_id=token.decision_id,
            rule=token.rule,
            idnat=token.idnat,
            method=token.method,
            auth_mode=token.auth_mode,
        )
        if token.outcome == "allow" and token.idnat and token.rule:
            served = ServedRequest(token.idnat, token.rule, line["request_id"], served_at, token.resource)
    return (ACCESS_EVENT, served_at, fields), served


def nginx_refused_access(raw: bytes) -> list[Any] | None:
    """``[time, request_id, client_ip, http_method, path, status, reason]`` of a line nginx wrote for a request
    it refused (4xx) before any decision, else None (an ordinary line, or one for :func:`access_event`)."""
    if not raw.endswith(_UNDECIDED_TAILS):
        return None
    try:
        line = _access_line(raw)
        if line is None:
            return None
        status = int(line["status"])
        if not 400 <= status < 500:
            return None  # e.g. 503: the gateway could not be reached
        return [float(line["time"]), line["request_id"], line["client_ip"], line["http_method"],
                line["uri"].partition("?")[0], status, line["reason"]]  # fmt: skip
    except ValueError:
        return None


def nginx_refused_event(accesses: list[list[Any]], position: str) -> tuple[str, float, dict[str, Any]]:
    """The one record of consecutive requests nginx refused itself; ``position``: the last one's line."""
    fields = {"count": len(accesses), "accesses": accesses, "log_position": position}
    return NGINX_REFUSED_EVENT, accesses[0][0], fields


# --- Where the reader is: the position file -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """The reader's progress, shared with every process of the instance through the position file."""

    inode: int
    offset: int
    #: When the reader last wrote this file (it does at least every second while it runs).
    heartbeat: float
    #: When the reader last had nothing left to read: the trail lags the file by at most now - caught_up.
    caught_up: float
    #: Why the last batch could not be recorded (None: it was).
    error: str | None = None

    def encode(self) -> bytes:
        data = json.dumps(
            {
                "inode": self.inode,
                "offset": self.offset,
                "heartbeat": self.heartbeat,
                "caught_up": self.caught_up,
                "error": self.error,
            },
            separators=(",", ":"),
        ).encode()
        return data.ljust(_POSITION_SIZE - 1) + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> Position | None:
        try:
            doc = json.loads(data)
            return cls(
                int(doc["inode"]),
                int(doc["offset"]),
                float(doc["heartbeat"]),
                float(doc["caught_up"]),
                doc.get("error"),
            )
        except (ValueError, KeyError, TypeError):
            return None


def position_file(audit_file: Path) -> Path:
    """Where the reader keeps its position: beside the audit file it writes to."""
    return audit_file.with_name(audit_file.name + ".access-stream")


def read_position(path: Path) -> Position | None:
    try:
        with path.open("rb") as file:
            return Position.decode(file.read(_POSITION_SIZE))
    except OSError:
        return None


# --- The reader -------------------------------------------------------------------------------------------


CountServed = Callable[[list[ServedRequest]], None]


class AccessStream:
    """Reads nginx's access log into the audit trail (module docstring). ``count_served`` counts the allowed
    quota requests of a batch (it must be idempotent per request id: a batch may be counted again after a
    failure); it runs before the records are written, so a request is never recorded uncounted."""

    def __init__(
        self,
        log_path: Path,
        audit_file: Path,
        audit: AuditLog,
        *,
        count_served: CountServed | None = None,
        poll_interval: float = 0.1,
        rotation_grace: float = 2.0,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self.log_path = log_path
        self.audit_file = audit_file
        self.position_path = position_file(audit_file)
        self._audit = audit
        self._count_served = count_served
        self._poll_interval = poll_interval
        self._rotation_grace = rotation_grace
        self._max_batch = max_batch_bytes
        self._lock_fd = -1
        self._fd = -1
        self._inode = 0
        self._offset = 0
        #: When the path was first seen naming another file than the one being read (rotation), else None.
        self._rotated_seen: float | None = None
        self._last_growth = 0.0
        self._caught_up = 0.0
        self._last_written = 0.0
        self._error: str | None = None

    @property
    def leading(self) -> bool:
        return self._lock_fd >= 0

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: become the reader when no other process is, then read as lines come."""
        try:
            while not stop.is_set():
                if not self.leading and not self.try_lead():
                    stop.wait(1.0)
                    continue
                busy = self.step() >= 0 and self._backlog()
                if not busy:
                    stop.wait(self._poll_interval)
        finally:
            self.release()

    def try_lead(self) -> bool:
        """Take the reader's lock if no other process holds it; then find where to start."""
        try:
            self.position_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.position_path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            self._report_error(f"position file {self.position_path}: {os.strerror(exc.errno or 0)}")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self._start()
        return True

    def release(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def step(self, now: float | None = None) -> int:
        """Read and record what nginx wrote since the last step; returns the lines recorded (-1: an error,
        reported in the position file; the same lines are tried again next time)."""
        now = time.time() if now is None else now
        if self._fd < 0 and not self._open_current():
            self._caught_up = now
            self._save(now)
            return 0
        try:
            size_before = os.fstat(self._fd).st_size
            data = os.pread(self._fd, self._max_batch, self._offset)
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            self._report_error(f"cannot read {self.log_path}: {os.strerror(exc.errno or 0)}")
            self._save(now)
            return -1
        if size < self._offset:
            return self._truncated(now)
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) >= self._max_batch:
            end = len(data)  # a "line" longer than a batch: recorded as unreadable, not waited for forever
        recorded = 0
        if end:
            recorded = self._record(data[:end], now)
            if recorded < 0:
                self._save(now)
                return -1
            self._last_growth = now
        read_to = self._offset + (len(data) - end)
        if read_to >= size and not self._follow_rotation(now):  # nothing whole left to read in this file
            self._caught_up = now
        elif read_to >= size_before and self._still_current():
            # Lines keep coming (a busy nginx never lets the reader find the file's end), yet every line
            # written before this step began is recorded: the trail lags by no more than since then.
            self._caught_up = max(self._caught_up, now)
        self._save(now)
        return recorded

    def _still_current(self) -> bool:
        """Whether nginx still writes the file being read (no rotation has started)."""
        try:
            return os.stat(self.log_path).st_ino == self._inode
        except OSError:
            return False

    # --- internals ---------------------------------------------------------------------------------------

    def _backlog(self) -> bool:
        try:
            return self._fd >= 0 and os.fstat(self._fd).st_size > self._offset + self._max_batch // 2
        except OSError:
            return False

    def _record(self, chunk: bytes, now: float) -> int:
        events = []
        served = []
        end = self._offset
        lines = chunk.split(b"\n")
        if chunk.endswith(b"\n"):
            lines.pop()  # what follows the last newline: nothing
        refused: list[list[Any]] = []  # consecutive requests nginx refused, one record (in the lines' order)
        for raw in lines:
            end = min(end + len(raw) + 1, self._offset + len(chunk))
            if not raw.strip():
                continue
            access = nginx_refused_access(raw)
            if access is not None:
                refused.append(access)
                if len(refused) == MAX_NGINX_REFUSED_PER_RECORD:
                    events.append(nginx_refused_event(refused, f"{self._inode}:{end}"))
                    refused = []
                continue
            if refused:
                events.append(nginx_refused_event(refused, f"{self._inode}:{end - len(raw) - 1}"))
                refused = []
            event, counted = access_event(raw, f"{self._inode}:{end}")
            events.append(event)
            if counted is not None:
                served.append(counted)
        if refused:
            events.append(nginx_refused_event(refused, f"{self._inode}:{end}"))
        try:
            if served and self._count_served is not None:
                self._count_served(served)
            self._audit.record_batch(events)
        except AuditError as exc:
            # The records written are in the trail: start after them next time (never twice).
            if exc.written:
                self._offset = _position_offset(events[exc.written - 1][2]["log_position"])
            self._report_error(f"audit trail: {exc}")
            return -1
        except Exception as exc:  # the quota store: nothing recorded yet, all of it is tried again
            self._report_error(f"quota counting: {type(exc).__name__}")
            return -1
        self._offset += len(chunk)
        self._clear_error()
        return sum(fields["count"] if event == NGINX_REFUSED_EVENT else 1 for event, _, fields in events)

    def _truncated(self, now: float) -> int:
        log.warning("%s shrank below the position read (truncated in place?): reading it from its start",
                    self.log_path)  # fmt: skip
        event = (
            TRUNCATED_EVENT,
            now,
            {"log_position": f"{self._inode}:{self._offset}", "reasons": ["truncated"]},
        )
        try:
            self._audit.record_batch([event])
        except AuditError as exc:
            self._report_error(f"audit trail: {exc}")
            self._save(now)
            return -1
        self._offset = 0
        self._save(now)
        return 0

    def _follow_rotation(self, now: float) -> bool:
        """At the end of the file being read: move to the file now at the path when it is another one and the
        old one has been quiet for ``rotation_grace`` (nginx reopens its logs on SIGUSR1, each worker on its
        own). True while a rotation is in progress."""
        try:
            current = os.stat(self.log_path).st_ino
        except OSError:
            return False  # renamed, nginx has not reopened yet: keep reading the old one
        if current == self._inode:
            self._rotated_seen = None
            return False
        if self._rotated_seen is None:
            self._rotated_seen = now
        if now - max(self._rotated_seen, self._last_growth) < self._rotation_grace:
            return True
        os.close(self._fd)
        self._fd = -1
        self._rotated_seen = None
        self._open_current()
        return True  # the new file is read from its start at the next step

    def _open_current(self) -> bool:
        try:
            fd = os.open(self.log_path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # nginx has not written its first line yet
        except OSError as exc:
            self._report_error(f"cannot open {self.log_path}: {os.strerror(exc.errno or 0)}")
            return False
        self._fd, self._inode, self._offset = fd, os.fstat(fd).st_ino, 0
        return True

    def _start(self) -> None:
        """Where the last reader stopped: its position file, or further on the last access record it wrote
        (records are written before the position: a reader may have died in between)."""
        saved = read_position(self.position_path)
        last = _last_recorded_position(self.audit_file)
        if saved is not None and last is not None and last[0] == saved.inode:
            inode, offset = saved.inode, max(saved.offset, last[1])
        elif last is not None:
            inode, offset = last
        elif saved is not None:
            inode, offset = saved.inode, saved.offset
        else:
            inode, offset = 0, 0
        self._last_growth = self._caught_up = time.time()
        path = _file_with_inode(self.log_path, inode) if inode else None
        if path is None:
            if inode:
                log.warning("the access log file the last reader stopped in (inode %d) is gone", inode)
                event = {"log_position": f"{inode}:{offset}", "reasons": ["rotated_away"]}
                with contextlib.suppress(AuditError):
                    self._audit.record_batch([(MISSING_EVENT, time.time(), event)])
            self._open_current()
            return
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError:
            self._open_current()
            return
        self._inode, self._offset = inode, offset

    def _save(self, now: float) -> None:
        if self._lock_fd < 0:
            return
        position = Position(self._inode, self._offset, now, self._caught_up, self._error)
        try:
            os.pwrite(self._lock_fd, position.encode(), 0)
        except OSError as exc:
            log.error("cannot write %s: %s", self.position_path, os.strerror(exc.errno or 0))
        self._last_written = now

    def _report_error(self, error: str) -> None:
        if error != self._error:
            log.error("access stream %s: %s (retrying)", self.log_path, error)
        self._error = error

    def _clear_error(self) -> None:
        if self._error is not None:
            log.warning("access stream %s: recording again", self.log_path)
        self._error = None


def run_in_background(reader: AccessStream, *, join_timeout: float = 5.0) -> Callable[[], None]:
    """Run ``reader`` in a daemon thread; returns what stops it (after its current batch)."""
    stop = threading.Event()
    thread = threading.Thread(target=reader.run, args=(stop,), name="access-stream", daemon=True)
    thread.start()

    def stop_reader() -> None:
        stop.set()
        thread.join(join_timeout)

    return stop_reader


def _position_offset(position: str) -> int:
    return int(position.rpartition(":")[2])


def _file_with_inode(path: Path, inode: int) -> Path | None:
    """``path`` or a file beside it (a rotated copy: access.log.1...) with this inode."""
    try:
        candidates = [path, *sorted(path.parent.iterdir())]
    except OSError:
        return None
    for candidate in candidates:
        with contextlib.suppress(OSError):
            if candidate.stat().st_ino == inode and candidate.is_file():
                return candidate
    return None


def _last_recorded_position(audit_file: Path) -> tuple[int, int] | None:
    """(inode, offset) of the last access record in the audit file's tail, if any."""
    marker = b'"log_position":"'
    try:
        fd = os.open(audit_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        end = os.fstat(fd).st_size
        start, tail = end, b""
        while start > 0 and end - start < _TAIL_SEARCH_BYTES:
            chunk_start = max(0, start - (1 << 16))
            tail = os.pread(fd, start - chunk_start, chunk_start) + tail
            start = chunk_start
            lines = tail.split(b"\n")
            for line in reversed(lines[1:] if start else lines):
                at = line.find(marker)
                if at >= 0 and b'"event":"access' in line:
                    value = line[at + len(marker) : line.index(b'"', at + len(marker))]
                    inode, _, offset = value.decode().partition(":")
                    return int(inode), int(offset)
            tail = lines[0] if start else b""
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return None


# --- The decision side: is the stream healthy? --------------------------------------------------------------


class StreamHealth:
    """Read by every decision (and readiness): None while the audit trail keeps up with the access log, else
    why not. Reads the position file and stats the log at most every ``check_interval`` seconds."""

    def __init__(
        self, log_path: Path, audit_file: Path, max_lag: float, *, check_interval: float = 0.5
    ) -> None:
        self.log_path = log_path
        self.position_path = position_file(audit_file)
        self.max_lag = max_lag
        self._check_interval = check_interval
        self._started = time.time()
        self._checked = -float("inf")
        self._problem: str | None = None
        self._lock = threading.Lock()

    def problem(self, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        if 0 <= now - self._checked < self._check_interval:
            return self._problem
        with self._lock:
            if not 0 <= now - self._checked < self._check_interval:
                self._problem = self._evaluate(now)
                self._checked = now
        return self._problem

    def _evaluate(self, now: float) -> str | None:
        position = read_position(self.position_path)
        if position is None:
            if now - self._started > self.max_lag:
                return "no reader of the access log is running (position file missing or unreadable)"
            return None
        if position.error:
            return f"the access log cannot be recorded: {position.error}"
        if now - position.heartbeat > self.max_lag:
            return f"no reader of the access log for {now - position.heartbeat:.0f} s"
        try:
            stat = os.stat(self.log_path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None  # nothing written yet, or renamed before nginx reopens it
            return f"cannot read {self.log_path}: {os.strerror(exc.errno or 0)}"
        unread = stat.st_ino != position.inode or stat.st_size > position.offset
        lag = now - position.caught_up
        if unread and lag > self.max_lag:
            return f"the audit trail lags {lag:.0f} s behind the access log (at most {self.max_lag:g} s)"
        return None
