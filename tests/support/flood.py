"""One client sending as many requests as it can (wrk, keep-alive connections) for a bounded time, counting
the statuses it was answered."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from pathlib import Path

WRK = shutil.which("wrk") or "/usr/bin/wrk"

# Each wrk thread counts its statuses; done() sums them over the threads and prints "status <code> <count>".
_COUNTING_SCRIPT = """\
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do total[status] = (total[status] or 0) + n end
  end
  for status, n in pairs(total) do io.write(string.format("status %d %d\\n", status, n)) end
end
"""


def flood(
    url: str, headers: dict[str, str], *, seconds: int, connections: int, work_dir: Path
) -> collections.Counter[int]:
    """The statuses answered to ``connections`` keep-alive connections sending GET ``url`` for ``seconds``."""
    script = work_dir / "count-statuses.lua"
    script.write_text(_COUNTING_SCRIPT)
    argv = [
        "nice",
        "-n",
        "19",
        WRK,
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
    ]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    output = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=seconds + 20
    ).stdout
    return collections.Counter(
        {int(status): int(n) for status, n in re.findall(r"^status (\d+) (\d+)$", output, re.MULTILINE)}
    )
