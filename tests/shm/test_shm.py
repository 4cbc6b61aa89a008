"""The shared-memory store with real processes: exact limits across workers, kill -9,
reopening, a full table, and uvicorn --workers 4 end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from support.servers import free_port

import nexus_limits as nl

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
WORKER = os.path.join(HERE, "shm_worker.py")


@pytest.fixture
def store_name():
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        nl.SharedMemoryStore(name).unlink()
    except ValueError:
        pass


def worker(name, rate, keys, calls, record, forever=False):
    args = [sys.executable, WORKER, name, rate, str(keys), str(calls), str(record)]
    return subprocess.Popen(args + (["--forever"] if forever else []))


def records(paths):
    lines = []
    for p in paths:
        if os.path.exists(p):
            with open(p) as f:
                lines += f.read().split()
    return lines


def test_store_file_and_errors(store_name, tmp_path):
    store = nl.SharedMemoryStore(store_name, capacity=1000)
    assert store.capacity == 1024 and store.name == store_name and store.ttl == 3600.0
    assert store.path == f"/dev/shm/nexus-limits.{store_name}"
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.path.getsize(store.path) == 4096 + 1024 * 32
    assert "capacity=1024" in repr(store)
    with pytest.raises(ValueError, match="exists with capacity 1024"):
        nl.SharedMemoryStore(store_name, capacity=5000)
    assert nl.SharedMemoryStore(store_name).capacity == 1024, "no capacity: the existing one"
    with pytest.raises(ValueError, match="must be 1 to 200 letters"):
        nl.SharedMemoryStore("../etc/passwd")
    with pytest.raises(ValueError, match="a name .* or a path, not both"):
        nl.SharedMemoryStore("a", path=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="a name .* or a path"):
        nl.SharedMemoryStore()
    with pytest.raises(TypeError, match="name must be a str"):
        nl.SharedMemoryStore(5)
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        nl.SharedMemoryStore(store_name + "x", capacity=0)
    with pytest.raises(ValueError, match="ttl must be a number of seconds from 1"):
        nl.SharedMemoryStore(store_name + "x", ttl=0.5)
    with pytest.raises(ValueError, match="exists with ttl 3600 s"):
        nl.SharedMemoryStore(store_name, ttl=60)
    # Another file, a store of another layout version, a damaged one.
    other = tmp_path / "not-a-store"
    other.write_bytes(b"x" * 10_000)
    with pytest.raises(ValueError, match="not a nexus-limits shared-memory store"):
        nl.SharedMemoryStore(path=other)
    versioned = tmp_path / "v"
    nl.SharedMemoryStore(path=versioned, capacity=64)
    data = bytearray(versioned.read_bytes())
    data[8] = 1
    versioned.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="layout version 1 .* reads version 2"):
        nl.SharedMemoryStore(path=versioned)
    damaged = tmp_path / "d"
    nl.SharedMemoryStore(path=str(damaged), capacity=64)
    with open(damaged, "ab") as f:
        f.write(b"\0" * 32)
    with pytest.raises(ValueError, match="damaged"):
        nl.SharedMemoryStore(path=str(damaged))
    with pytest.raises(ValueError, match="cannot open"):
        nl.SharedMemoryStore(path=str(tmp_path / "no" / "such" / "dir"))


def test_limiters_on_the_store(store_name, clock):
    store = nl.SharedMemoryStore(store_name, capacity=4096, ttl=120)
    tb = nl.TokenBucket("5/minute", store=store)
    fw = nl.FixedWindow("5/minute", store=store)
    assert [tb.try_acquire("a") for _ in range(6)] == [True] * 5 + [False]
    assert fw.hit("a").remaining == 4, "limiters sharing a store never share keys"
    other = nl.TokenBucket("5/minute", store=nl.SharedMemoryStore(store_name))
    assert not other.hit("a").allowed, "another handle (as another process would) sees the state"
    info = other.inspect("a")
    assert info["used"] == 5 and not info["allowed"] and info["tracked"]
    assert tb.stats()["allowed"] == 5 and tb.stats()["denied"] == 1 and tb.stats()["keys"] == 2
    tb.reset("a")
    assert tb.hit("a").remaining == 4
    assert len(store) == 2 and len(tb) == 2
    sw = nl.SlidingWindow("3/minute", store=store, shadow=True)
    assert all(sw.hit(b"k").allowed for _ in range(5)) and sw.stats()["shadow_denied"] == 2
    lb = nl.LeakyBucket("10/s", capacity=2, store=store)
    assert [lb.hit(7).allowed for _ in range(3)] == [True, True, False]
    assert lb.peek(7).retry_after > 0 and lb.get_limit(7) == (False, 0)
    assert "store=" in repr(tb)
    assert tb.ttl == store.ttl == 120.0 and tb.max_keys is None, "the store's ttl evicts its keys"
    assert tb.quota == nl.TokenBucket("5/minute").quota
    # What a shared store cannot do, and bad combinations.
    with pytest.raises(ValueError, match="not available with a SharedMemoryStore"):
        tb.set_quota("a", "1/s")
    with pytest.raises(ValueError, match="not available with a SharedMemoryStore"):
        tb.set_default_quota("1/s")
    with pytest.raises(ValueError, match="not available with a SharedMemoryStore"):
        tb.top_keys(3)
    with pytest.raises(ValueError, match="Composite parts must keep their states in-process"):
        nl.Composite([tb, fw])
    with pytest.raises(ValueError, match="max_keys does not apply"):
        nl.TokenBucket("1/s", store=store, max_keys=10)
    with pytest.raises(ValueError, match="ttl does not apply"):
        nl.TokenBucket("1/s", store=store, ttl=10)
    with pytest.raises(ValueError, match="needs 86400s to forget a key but the store's ttl is 120s"):
        nl.TokenBucket("1/day", store=store)
    with pytest.raises(TypeError, match="store must be a SharedMemoryStore"):
        nl.TokenBucket("1/s", store="shm")
    with pytest.raises(TypeError, match="key must be str, bytes or int"):
        tb.hit(1.5)


def test_full_store_denies_new_keys_and_recovers(tmp_path):
    store = nl.SharedMemoryStore(path=tmp_path / "full", capacity=32, ttl=1)
    tb = nl.TokenBucket("1/s", store=store)
    results = [tb.try_acquire(f"k{i}") for i in range(100)]
    assert sum(results) == 32 and tb.stats()["store_full"] == 68
    assert not tb.try_acquire("k99"), "a key that found no room is denied"
    first = results.index(True)
    assert tb.peek(f"k{first}").allowed is False, "tracked keys keep their state"
    time.sleep(2.2)
    assert tb.try_acquire("late"), "slots idle past the ttl go to new keys"
    assert store.sweep() == 31


def test_processes_admit_exactly_the_quota(store_name, tmp_path):
    nl.SharedMemoryStore(store_name, capacity=4096, ttl=86400)
    paths = [tmp_path / f"w{i}" for i in range(6)]
    procs = [worker(store_name, "300/day", 4, 800, p) for p in paths]
    assert all(p.wait(120) == 0 for p in procs)
    admitted = records(paths)
    assert len(admitted) == 4 * 300, "6 processes, 4 keys of 300: exactly 1200 admitted"
    assert all(admitted.count(f"key-{k}") == 300 for k in range(4))


def test_new_keys_raced_by_processes_are_admitted_once(store_name, tmp_path):
    nl.SharedMemoryStore(store_name, capacity=1 << 15, ttl=86400)
    paths = [tmp_path / f"w{i}" for i in range(4)]
    procs = [worker(store_name, "1/day", 3000, 3000, p) for p in paths]
    assert all(p.wait(120) == 0 for p in procs)
    admitted = records(paths)
    assert len(admitted) == 3000 and len(set(admitted)) == 3000, "each new key exactly once"
    assert len(nl.SharedMemoryStore(store_name)) == 3000


def test_kill_9_mid_run_leaves_the_others_correct(store_name, tmp_path):
    nl.SharedMemoryStore(store_name, capacity=4096, ttl=86400)
    paths = [tmp_path / f"w{i}" for i in range(4)]
    # 2000 per key, 2 keys: the workers run until killed or done.
    procs = [worker(store_name, "2000/day", 2, 10**9, p, forever=(i == 0)) for i, p in enumerate(paths)]
    deadline = time.monotonic() + 30
    while len(records(paths)) < 500:  # killed mid-run, while all four are admitting
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(procs[0].pid, signal.SIGKILL)
    assert procs[0].wait(10) == -signal.SIGKILL
    for p in procs[1:]:
        p.kill()
        p.wait(10)
    # The survivors' stores still work: a new process opens it (nothing locked) and
    # finishes the quota; every admission was counted once.
    done = tmp_path / "after"
    finisher = worker(store_name, "2000/day", 2, 10_000, done)
    assert finisher.wait(60) == 0
    admitted = records([*paths, done])
    # A worker killed between its decision and its record loses at most one line each.
    assert 4000 - 4 <= len(admitted) <= 4000
    lim = nl.TokenBucket("2000/day", store=nl.SharedMemoryStore(store_name))
    assert not lim.try_acquire("key-0") and not lim.try_acquire("key-1")


def test_state_survives_every_process_exiting(store_name, tmp_path):
    first = tmp_path / "first"
    assert worker(store_name, "50/day", 1, 30, first).wait(60) == 0
    second = tmp_path / "second"
    assert worker(store_name, "50/day", 1, 100, second).wait(60) == 0
    assert len(records([first])) == 30 and len(records([second])) == 20


def test_uvicorn_workers_share_one_limit(store_name):
    port = free_port()
    env = dict(os.environ, NL_SHM_NAME=store_name, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "shm_app:app",
            "--workers",
            "4",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=HERE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url, headers={"x-api-key": "warmup"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        pids = set()
        codes = []
        for _ in range(120):
            # A new connection each time, so the kernel spreads them over the workers.
            r = httpx.get(url, headers={"x-api-key": "client-1"})
            codes.append(r.status_code)
            if r.status_code == 200:
                pids.add(r.text)
        assert codes.count(200) == 40 and codes.count(429) == 80, "one limit of 40/hour across 4 workers"
        assert len(pids) >= 2, "the requests reached several workers"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
