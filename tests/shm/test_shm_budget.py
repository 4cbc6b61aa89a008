"""TokenLimiter and SpendLimiter in a SharedMemoryStore: real processes of one host
share each key's requests, tokens and concurrency leases exactly; a killed process
leaves the store consistent and its leases end with their lease_ttl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import nexus_limits as nl
from nexus_limits.spend import SpendLimiter

# Every child builds the same limiter on the same store, then runs BODY.
PRELUDE = """
import json, os, sys, time
import nexus_limits as nl
store = nl.SharedMemoryStore(path={path!r})
tl = nl.TokenLimiter(**{limits!r}, store=store, name="shared-test")
def wait_for(flag, seconds=20.0):
    end = time.monotonic() + seconds
    while not os.path.exists(flag):
        if time.monotonic() > end:
            sys.exit("no start signal")
        time.sleep(0.002)
"""


def child(path, limits, body):
    """Source of a child process running ``body`` on the shared limiter ``tl``."""
    return PRELUDE.format(path=path, limits=limits) + textwrap.dedent(body)


def run(path, limits, body, timeout=60):
    out = subprocess.run(
        [sys.executable, "-c", child(path, limits, body)], capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def start(path, limits, body):
    return subprocess.Popen(
        [sys.executable, "-c", child(path, limits, body)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def store_path(tmp_path):
    path = str(tmp_path / "budget.shm")
    nl.SharedMemoryStore(path=path, capacity=4096)  # made once, before the children open it
    return path


def test_four_processes_admit_exactly_the_quota(store_path, tmp_path):
    limits = {"requests": "1000/hour", "tokens": "2000/hour", "concurrency": 50}
    flag = str(tmp_path / "go")
    body = f"""
    wait_for({flag!r})
    admitted = 0
    for _ in range(30):
        if tl.reserve("one-key", 100).allowed:
            admitted += 1
    print(json.dumps({{"admitted": admitted}}))
    """
    procs = [start(store_path, limits, body) for _ in range(4)]
    time.sleep(0.3)
    open(flag, "w").close()
    admitted = [finish(p)["admitted"] for p in procs]
    assert sum(admitted) == 20, admitted  # 2000 tokens / 100, whoever won them
    # This process sees what they did: 20 requests and 2,000 tokens charged, 20 leases held.
    tl = nl.TokenLimiter(**limits, store=nl.SharedMemoryStore(path=store_path), name="shared-test")
    seen = tl.inspect("one-key")
    assert seen["tokens"]["used"] == 2000 and seen["requests"]["used"] == 20
    assert seen["concurrency"] == {"limit": 50, "in_flight": 20}
    assert not tl.reserve("one-key", 1).allowed, "no token left"


def test_leases_are_shared_between_processes(store_path):
    limits = {"tokens": "100/hour", "concurrency": 2}
    tl = nl.TokenLimiter(**limits, store=nl.SharedMemoryStore(path=store_path), name="shared-test")
    held = [tl.reserve("k", 10) for _ in range(2)]
    assert all(r.allowed for r in held)
    try_one = 'r = tl.reserve("k", 10)\nprint(json.dumps({"allowed": r.allowed, "in_flight": tl.inspect("k")["concurrency"]["in_flight"]}))'
    assert run(store_path, limits, try_one) == {"allowed": False, "in_flight": 2}
    assert held[0].cancel()
    # The child's lease is its own: it settles it before it exits.
    settle = 'r = tl.reserve("k", 10)\nok = r.allowed and r.settle(7)\nprint(json.dumps({"allowed": r.allowed, "settled": ok}))'
    assert run(store_path, limits, settle) == {"allowed": True, "settled": True}
    assert tl.inspect("k")["concurrency"]["in_flight"] == 1
    # 10 held + 7 settled (the cancelled 10 came back), less what refilled meanwhile
    # (under a token a second).
    assert 16 <= tl.inspect("k")["tokens"]["used"] <= 17
    assert held[1].settle(10)
    assert tl.inspect("k")["concurrency"]["in_flight"] == 0


def test_a_killed_holders_lease_ends_with_its_lease_ttl(store_path, tmp_path):
    limits = {"requests": "100/hour", "concurrency": 1, "lease_ttl": 1.5}
    ready = str(tmp_path / "ready")
    body = f"""
    r = tl.reserve("k", 1)
    assert r.allowed
    open({ready!r}, "w").close()
    time.sleep(60)
    """
    holder = start(store_path, limits, body)
    try:
        end = time.monotonic() + 20
        while not os.path.exists(ready) and time.monotonic() < end and holder.poll() is None:
            time.sleep(0.01)
        assert os.path.exists(ready), holder.stderr.read() if holder.poll() is not None else "holder not ready"
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)
    tl = nl.TokenLimiter(**limits, store=nl.SharedMemoryStore(path=store_path), name="shared-test")
    refused = tl.reserve("k", 1)
    assert not refused.allowed and 0 < refused.retry_after <= 1.5, "the dead holder's lease is still counted"
    time.sleep(refused.retry_after + 0.05)
    again = tl.reserve("k", 1)
    assert again.allowed, "its lease ran out"
    assert tl.inspect("k")["requests"]["used"] == 2, "the dead holder's request stands"
    assert again.cancel()


def test_kill_9_mid_run_leaves_the_store_consistent(store_path, tmp_path):
    # Every reservation charges one request and 1,000 tokens together, and a cancel
    # refunds both; the token rate is 1,000 times the request rate, so the two buckets
    # are restored at the same instant. Had a kill torn a step, they would be restored
    # 0.36 ms apart (one request's worth).
    limits = {"requests": "10000000/hour", "tokens": "10000000000/hour", "concurrency": 8, "lease_ttl": 1.0}
    flag = str(tmp_path / "go")
    body = f"""
    import random
    wait_for({flag!r})
    end = time.monotonic() + 3.0
    n = 0
    while time.monotonic() < end:
        r = tl.reserve("k", 1000)
        if r.allowed:
            if random.random() < 0.5:
                r.cancel()
            else:
                r.settle(1000)
        n += 1
    print(json.dumps({{"calls": n}}))
    """
    procs = [start(store_path, limits, body) for _ in range(4)]
    time.sleep(0.3)
    open(flag, "w").close()
    time.sleep(0.8)
    for victim in procs[:2]:
        victim.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    survivors = [finish(p) for p in procs[2:]]
    for victim in procs[:2]:
        victim.communicate(timeout=10)
        assert victim.returncode == -signal.SIGKILL
    assert all(s["calls"] > 0 for s in survivors)
    tl = nl.TokenLimiter(**limits, store=nl.SharedMemoryStore(path=store_path), name="shared-test")
    seen = tl.inspect("k")
    requests, tokens = seen["requests"], seen["tokens"]
    assert requests["used"] > 0 and tokens["used"] > 0
    assert abs(requests["reset_after"] - tokens["reset_after"]) < 20e-6, (requests, tokens)
    # Leases the victims held end within lease_ttl; then every place is free again.
    time.sleep(1.1)
    assert tl.inspect("k")["concurrency"]["in_flight"] == 0
    taken = [tl.reserve("k", 1) for _ in range(9)]
    assert [r.allowed for r in taken] == [True] * 8 + [False]
    assert all(r.cancel() for r in taken[:8])


def test_quota_changes_stats_and_reset_are_seen_by_every_process(store_path):
    limits = {"requests": "100/hour", "tokens": "10000/hour"}
    tl = nl.TokenLimiter(**limits, store=nl.SharedMemoryStore(path=store_path), name="shared-test")
    assert tl.reserve("k", 300).settle(300)
    tl.set_quota("k", tokens="500/hour")
    show = 't = tl.inspect("k")["tokens"]\nprint(json.dumps({k: t[k] for k in ("limit", "own_quota", "used")}))'
    seen = run(store_path, limits, show)
    assert (seen["limit"], seen["own_quota"], seen["used"]) == (500, True, 300)
    assert run(store_path, limits, 'print(json.dumps(tl.reserve("k", 201).allowed))') is False
    assert run(store_path, limits, 'print(json.dumps(tl.clear_quota("k")))') is True
    assert tl.inspect("k")["tokens"]["limit"] == 10000
    run(store_path, limits, 'tl.reset("k")\nprint(json.dumps(None))')
    assert tl.inspect("k")["tokens"]["used"] == 0
    stats = tl.stats()
    assert stats["tokens"]["allowed"] == 1 and stats["tokens_reserved"] == 300 and stats["tokens_settled"] == 300
    assert "concurrency" not in stats
    # Another name, or other rates, is another limiter: nothing shared.
    other = nl.TokenLimiter(**limits, store=nl.SharedMemoryStore(path=store_path), name="other")
    assert tl.reserve("k", 300).allowed and other.inspect("k")["tokens"]["used"] == 0


def test_spend_limiter_shared_between_processes(store_path, tmp_path):
    body = """
    from nexus_limits.spend import SpendLimiter
    spend = SpendLimiter("1.00/hour", store=store, name="team")
    admitted = 0
    for _ in range(20):
        r = spend.reserve("k", "gpt-4o", 10_000, 0)   # $0.025 each
        admitted += r.allowed
    print(json.dumps({"admitted": admitted}))
    """
    limits = {"requests": "1/hour"}  # the children's tl is unused here
    results = [run(store_path, limits, body) for _ in range(3)]
    assert sum(r["admitted"] for r in results) == 40, results  # $1.00 / $0.025
    here = SpendLimiter("1.00/hour", store=nl.SharedMemoryStore(path=store_path), name="team")
    assert not here.reserve("k", "gpt-4o", 10_000, 0).allowed
    with pytest.raises(ValueError, match="set_budget is not available with a SharedMemoryStore"):
        here.set_budget("2.00/hour")
    with pytest.raises(ValueError, match="set_default_quota is not available with a SharedMemoryStore"):
        nl.TokenLimiter(tokens="10/s", store=nl.SharedMemoryStore(path=store_path)).set_default_quota(tokens="5/s")


def test_bad_options(tmp_path):
    store = nl.SharedMemoryStore(path=str(tmp_path / "s"), capacity=64)
    with pytest.raises(TypeError, match="store must be a SharedMemoryStore"):
        nl.TokenLimiter(tokens="10/s", store="/dev/shm/x")
    with pytest.raises(ValueError, match="ttl does not apply with store="):
        nl.TokenLimiter(tokens="10/s", store=store, ttl=60)
    with pytest.raises(ValueError, match="max_keys does not apply with store="):
        nl.TokenLimiter(tokens="10/s", store=store, max_keys=5)
    with pytest.raises(ValueError, match="name applies with store="):
        nl.TokenLimiter(tokens="10/s", name="x")
    with pytest.raises(TypeError, match="name must be a str"):
        nl.TokenLimiter(tokens="10/s", store=store, name=5)
    with pytest.raises(ValueError, match="needs 86400s to forget a key but the store's ttl is 3600s"):
        nl.TokenLimiter(daily_tokens=1000, store=store)
    with pytest.raises(ValueError, match="lease_ttl .* is above the store's ttl"):
        nl.TokenLimiter(concurrency=1, lease_ttl=7200, store=store)
    with pytest.raises(ValueError, match="from 1 to 65535, got 65536"):
        nl.TokenLimiter(concurrency=65536, store=store)
    with pytest.raises(ValueError, match="needs at least one"):
        nl.TokenLimiter(store=store)
    with pytest.raises(ValueError, match="name applies with store="):
        SpendLimiter("1.00/hour", name="x")
    tl = nl.TokenLimiter(tokens="10/s", concurrency=1, store=store)
    with pytest.raises(ValueError, match="top_keys is not available with a SharedMemoryStore"):
        tl.top_keys()
    with pytest.raises(ValueError, match="no requests limit to change"):
        tl.set_quota("k", requests="1/s")
    for key in (None, 1.5, ["k"], True):
        with pytest.raises(TypeError):
            tl.reserve(key, 1)
    for tokens in (-1, 2**64, "5", 1.0):
        with pytest.raises((TypeError, ValueError, OverflowError)):
            tl.reserve("k", tokens)
    assert tl.store_path == str(tmp_path / "s") and "store=" in repr(tl)
    assert nl.TokenLimiter(tokens="10/s").store_path is None


def test_a_full_store_refuses_and_charges_nothing(tmp_path):
    store = nl.SharedMemoryStore(path=str(tmp_path / "small"), capacity=32)
    tl = nl.TokenLimiter(requests="10/minute", tokens="1000/minute", concurrency=5, store=store)
    admitted = [k for k in range(40) if tl.reserve(f"key-{k}", 10).allowed]
    assert 0 < len(admitted) < 40, "a store of 32 slots holds 3 keys per admitted call"
    refused = tl.reserve("one-more", 10)
    assert not refused.allowed and refused.retry_after > 0
    assert tl.inspect("one-more")["tokens"]["used"] == 0, "nothing charged"
    assert all(tl.inspect(f"key-{k}")["concurrency"]["in_flight"] == 1 for k in admitted)
