"""`nexus-limits bench` runs end to end (small sizes) and its JSON has every field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nexus_limits import _bench, cli


def test_bench_quick_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--keys", "2000", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for heading in ("Hot key", "Many keys", "Sweep", "reference (pure-Python GCRA)", "TokenBucket"):
        assert heading in printed
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "hot_key", "many_keys", "sweep"}
    assert {r["limiter"] for r in data["hot_key"]} == {_bench.REFERENCE, *_bench.ALGORITHMS}
    for row in data["hot_key"]:
        assert row["try_acquire_ns"] > 0
    for row in data["many_keys"]:
        assert row["keys"] == 2000 and row["insert_ns"] > 0 and row["existing_ns"] > 0
        assert "bytes_per_key" in row
    assert data["sweep"]["evicted"] >= 1 and data["sweep"]["sweep_ms"] >= 0
    assert data["machine"]["cpus"] >= 1


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
    ref = _bench.ReferenceGCRA(2, 60.0)
    assert ref.try_acquire("k") and ref.try_acquire("k")
    assert not ref.try_acquire("k")


def test_bench_with_redis(redis_server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    assert cli.main(["bench", "--quick", "--keys", "500", "--redis", url, "--json", str(out)]) == 0
    assert "vs INCR" in capsys.readouterr().out
    data = json.loads(out.read_text())["redis"]
    assert data["round_trips"]["rows"][0]["call"] == "INCR (bare round trip)"
    assert all(r["us"] > 0 and r["vs_incr"] > 0 for r in data["round_trips"]["rows"])
    assert [t["processes"] for t in data["throughput"]] == [1, 4]
    assert all(t["checks_per_second"] > 0 for t in data["throughput"])
