"""Attacks on the limiter itself: key floods, wall-clock jumps, threads and processes
together on the same keys."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import uuid

import pytest

import nexus_limits as nl

HERE = os.path.dirname(__file__)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_flood_of_ten_million_keys_is_bounded_and_spares_the_victim(clock):
    tb = nl.TokenBucket("10/minute", clock=clock, max_keys=100_000)
    assert tb.hit("victim", 9).remaining == 1
    before = rss()
    collections.deque(map(tb.try_acquire, range(10_000_000)), maxlen=0)
    grown = rss() - before
    assert len(tb) == 100_000
    assert grown < 40 * 1024 * 1024, f"resident memory grew {grown / 1e6:.1f} MB for 100,000 keys"
    assert tb.peek("victim", 0).remaining == 1, "the flood did not reset the victim"
    assert not tb.hit("victim", 2).allowed
    stats = tb.stats()
    # The victim holds one of the 100,000 slots; 99,999 flood keys got the others.
    assert stats["allowed"] == 100_000 and stats["denied"] == 10_000_000 - 99_999 + 1  # + the victim's last try


def test_flood_on_the_real_clock_reclaims_only_fresh_keys():
    tb = nl.TokenBucket("1000/s", max_keys=50_000)
    tb.set_quota("victim", "10/hour")
    assert tb.hit("victim", 9).allowed
    for round_ in range(4):
        collections.deque(map(tb.try_acquire, range(round_ * 1_000_000, (round_ + 1) * 1_000_000)), maxlen=0)
        time.sleep(0.01)  # flood keys are fresh again after 1 ms; the victim is not
    assert len(tb) <= 50_000
    assert tb.stats()["evicted"] > 0, "room was made by reclaiming fresh keys"
    assert tb.peek("victim", 0).remaining == 1
    assert tb.inspect("victim")["own_quota"]


def test_flood_of_a_shared_memory_store_spares_its_keys(tmp_path):
    store = nl.SharedMemoryStore(path=tmp_path / "flood", capacity=1 << 14, ttl=3600)
    tb = nl.TokenBucket("10/minute", store=store)
    assert tb.hit("victim", 9).allowed
    admitted = sum(map(tb.try_acquire, range(1_000_000)))
    assert admitted < 1 << 14 and os.path.getsize(store.path) == 4096 + 32 * (1 << 14)
    assert tb.peek("victim", 0).remaining == 1
    assert tb.stats()["store_full"] == 1_000_000 - admitted


FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"

CLOCK_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import redis
    import nexus_limits as nl
    import nexus_limits.redis as nlr

    local = nl.TokenBucket("2/hour")
    shared = nlr.TokenBucket(redis.Redis.from_url(sys.argv[1]), "2/hour", prefix="clock")
    for line in sys.stdin:
        n = int(line)
        print(time.time(), local.hit("k", n).allowed, shared.hit("k", n).allowed, flush=True)
    """
)


@pytest.mark.skipif(not os.path.exists(FAKETIME), reason="libfaketime is not installed (scripts/setup-test.sh does it)")
def test_wall_clock_jumps_change_nothing(tmp_path, redis_server):
    """The process's wall clock jumps two days forwards, then back: in-process limiters
    read CLOCK_MONOTONIC and Redis limiters the server's TIME, so no decision moves."""
    stamp = tmp_path / "faketime"
    stamp.write_text("+0")
    script = tmp_path / "clock.py"
    script.write_text(CLOCK_SCRIPT)
    env = dict(
        os.environ,
        LD_PRELOAD=FAKETIME,
        FAKETIME_TIMESTAMP_FILE=str(stamp),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), redis_server.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:

        def ask(cost):
            proc.stdin.write(f"{cost}\n")
            proc.stdin.flush()
            wall, local, shared = proc.stdout.readline().split()
            return float(wall), local == "True", shared == "True"

        wall0, local, shared = ask(2)
        assert local and shared
        stamp.write_text("+2d")
        wall1, local, shared = ask(1)
        assert wall1 - wall0 > 86_400, "the process's wall clock really jumped"
        assert not local and not shared, "two days on the wall clock refilled nothing"
        stamp.write_text("-2d")
        wall2, local, shared = ask(1)
        assert wall2 < wall0 - 86_400
        assert not local and not shared, "going back did not break or reset anything"
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


def test_threads_and_processes_together_on_one_store(tmp_path):
    name = f"test-{uuid.uuid4().hex[:12]}"
    nl.SharedMemoryStore(name, capacity=4096, ttl=86400)
    script = tmp_path / "threads.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, threading
            import nexus_limits as nl
            lim = nl.FixedWindow("500/day", store=nl.SharedMemoryStore({name!r}))
            counts = []
            def run():
                counts.append(sum(lim.try_acquire(f"k{{i % 3}}") for i in range(1500)))
            threads = [threading.Thread(target=run) for _ in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            print(sum(counts))
            """
        )
    )
    try:
        procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) for _ in range(3)]
        # This process joins in with its own threads.
        lim = nl.FixedWindow("500/day", store=nl.SharedMemoryStore(name))
        mine = []
        threads = [
            threading.Thread(target=lambda: mine.append(sum(lim.try_acquire(f"k{i % 3}") for i in range(1500))))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = sum(mine) + sum(int(p.communicate(timeout=120)[0]) for p in procs)
        assert total == 3 * 500, "3 keys of 500, shared by 14 threads in 4 processes"
    finally:
        nl.SharedMemoryStore(name).unlink()


def test_threads_on_one_in_process_key_admit_exactly_the_quota():
    tb = nl.TokenBucket("20000/day")
    counts = []

    def run():
        counts.append(sum(tb.try_acquire("shared") for _ in range(10_000)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 20_000


def free_threaded_python():
    for name in ("python3.14t", "python3.13t"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(
    not sysconfig.get_config_var("Py_GIL_DISABLED") and free_threaded_python() is None,
    reason="no free-threaded CPython on this machine (python3.13t/3.14t)",
)
def test_free_threaded_python():  # pragma: no cover - only where a free-threaded build exists
    python = sys.executable if sysconfig.get_config_var("Py_GIL_DISABLED") else free_threaded_python()
    code = "import sys; print(sys._is_gil_enabled())"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
