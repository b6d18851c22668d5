"""Reading the gateway's audit log (JSON lines) in tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def audit_records(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records in file order (none while the file does not exist), only ``event``'s when named."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]
    return records if event is None else [record for record in records if record["event"] == event]
