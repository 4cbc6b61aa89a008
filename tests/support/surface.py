"""The README's table of what each limiter has, read for the surface tests (in-process
in tests/package/test_surface.py, Redis in tests/redis/test_redis_surface.py)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
INSPECT_KEYS = {
    "key",
    "algorithm",
    "rate",
    "limit",
    "own_quota",
    "used",
    "remaining",
    "allowed",
    "retry_after",
    "reset_after",
    "tracked",
    "shadow",
}
COUNTERS = {"allowed", "denied", "near_limit", "shadow_denied"}


def surface_table():
    """The README's surface table: {method names: {column: cell}}."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method or attribute | rate limiters |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = tuple(re.findall(r"`(?:await )?(\w+)", cells[0]))
        rows[names] = dict(zip(header[1:], cells[1:]))
    return rows


COLUMNS = {
    "rate limiters": ["TokenBucket", "SlidingWindow", "FixedWindow", "LeakyBucket"],
    "`Concurrency`": ["Concurrency"],
    "`Composite`": ["Composite"],
}
