"""The README's Django example is a real Django app: run as pasted (its own process, since
Django's settings are configured once per process), through Django's test client, it
prints what its comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def django_block() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    found = [b for b in blocks if "settings.configure(" in b and "nexus_limits.adapters.django" in b]
    assert len(found) == 1, "the README has one Django example"
    return found[0]


def promised_output(code: str) -> list:
    """The ``# comment`` after each top-level ``print(...)``: what the reader is told."""
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.*)$", code, re.M)]


def test_the_readme_django_example_runs_and_prints_what_it_says(tmp_path):
    code = django_block()
    assert "@ratelimit(" in code and "NEXUS_LIMITS=" in code, "both the decorator and the settings"
    (tmp_path / "block.py").write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO"))}
    result = subprocess.run(
        [sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    promised = promised_output(code)
    assert len(promised) == len(printed) >= 4
    assert printed == promised
    assert printed[0] == "[200, 200, 429]"
