"""Reading the gateway's audit log (JSON lines) in tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def audit_records(path: Path, event: str | None = None, *, skip_torn: bool = False) -> list[dict[str, Any]]:
    """The records in file order (none while the file does not exist), only ``event``'s when named.
    ``skip_torn``: leave out torn bytes (lines that are no JSON) instead of failing on them."""
    lines = path.read_bytes().splitlines() if path.exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            if not skip_torn:
                raise
    return records if event is None else [record for record in records if record["event"] == event]
