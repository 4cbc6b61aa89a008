"""`nexus-limits bench` runs end to end (small sizes) and its JSON has every field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nexus_limits import cli
from nexus_limits.bench import measure
from nexus_limits.bench.peers import contenders


def test_bench_quick_json(redis_server, tmp_path, capsys):
    """The harness in --quick mode: every contender, every workload, every field."""
    out, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    args = [
        "bench",
        "--quick",
        "--keys",
        "2000",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--markdown",
        str(md),
        "--redis",
        url,
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "vs INCR" in printed and "each library's own Redis backend" in printed
    for heading in ("Hot key", "Many keys", "Threads", "Accuracy", "Sweep", "reference (pure-Python GCRA)"):
        assert heading in printed
    data = json.loads(out.read_text())
    assert {"machine", "plan", "key_counts", "skipped", "contenders", "sweep"} <= set(data)
    assert data["key_counts"] == [1000, 2000]
    names = set(data["contenders"])
    assert {
        "nexus-limits TokenBucket",
        "nexus-limits SlidingWindow",
        "nexus-limits FixedWindow",
        measure.REFERENCE,
    } <= names
    assert names | set(data["skipped"]) == {c.name for c in contenders()}, "every peer ran or says it was skipped"
    for name, r in data["contenders"].items():
        assert r["hot"]["allowed_ns"] > 0 and r["hot"]["denied_ns"] > 0, name
        assert [t["threads"] for t in r["threads"]] == [1, 2] and all(t["checks_per_second"] > 0 for t in r["threads"])
        assert 0 <= r["threads"][1]["spurious_denials"] <= 1
        assert r["accuracy"]["steady"] > 0 and r["accuracy"]["burst"] > 0
        assert r["cleanup"]["keys"] == 5000 and "left" in r["cleanup"]
        assert [m["keys"] for m in r["many"]] == [1000, 2000]
        assert all(m["insert_ns"] > 0 and m["existing_ns"] > 0 and "bytes_per_key" in m for m in r["many"])
    ours = data["contenders"]["nexus-limits TokenBucket"]
    assert ours["cleanup"]["left"] == 0, "idle nexus-limits keys are gone"
    assert ours["threads"][1]["spurious_denials"] == 0
    for name in ("nexus-limits TokenBucket", "nexus-limits SlidingWindow", "nexus-limits FixedWindow"):
        # In any sliding window: at most twice the quota (a full bucket plus its refill,
        # or two fixed windows meeting at a boundary), never more.
        accuracy = data["contenders"][name]["accuracy"]
        assert accuracy["steady"] <= 2.05 and accuracy["burst"] <= 2.05, (
            name,
            accuracy,
        )  # one call of slack for timer jitter
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# Benchmarks" in md.read_text() and "bench.png" in md.read_text()
    assert data["redis"][0]["name"] == "nexus-limits TokenBucket (Redis)" and all(r["us"] > 0 for r in data["redis"])
    vs_incr = data["redis_vs_incr"]
    assert vs_incr["round_trips"]["rows"][0]["call"] == "INCR (bare round trip)"
    assert [t["processes"] for t in vs_incr["throughput"]] == [1, 4]


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--keys", "0"])
    assert "--keys must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "nexus_limits.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout


def test_reference_gcra_limits():
    ref = measure.ReferenceGCRA(2, 60.0)
    assert ref.try_acquire("k") and ref.try_acquire("k")
    assert not ref.try_acquire("k")
