"""The one-minute soak CI runs (benches/soak.py; the documented run is 30 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SOAK = os.path.join(os.path.dirname(__file__), "..", "..", "benches", "soak.py")


def test_one_minute_soak_keeps_memory_stable():
    out = subprocess.run(
        [sys.executable, SOAK, "--seconds", "60", "--json"], capture_output=True, text=True, timeout=300
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, (result["errors"], result["rss_mb"])
    assert result["errors"] == [] and result["stable"]
    ops = result["operations"]
    assert ops["in-process"] > 10_000 and ops["redis"] > 100 and ops["http"] > 100 and ops["shared-memory"] > 100
