"""Measurements across stores: in-process next to shared memory and Redis, nexus-limits'
Redis backend next to a bare round trip and to the peers' Redis backends."""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

from .measure import ALGORITHMS, ALWAYS, HUGE, ns_per_call


def redis_round_trips(url: str, calls: int = 2_000, repeats: int = 15) -> Dict[str, Any]:
    """µs per call on one client: a bare INCR and a minimal Lua script (``TIME``, ``GET``,
    ``SET PX``, run with ``client.evalsha``) next to each Redis limiter's try_acquire.

    The targets take turns, batch by batch, so that drift in the machine's speed (a
    loopback round trip varies a lot on a shared VM) falls on all of them alike; each
    figure is the median of its batches. Each row has its ratio to INCR (``vs_incr``)
    and to the minimal script (``vs_script``)."""
    import redis

    from .. import redis as nlr

    # The least a check could be as a script: the server's clock, read a state, write one
    # with an expiry.
    minimal = (
        "#!lua\n"
        'local t = redis.call("TIME")\n'
        'local v = redis.call("GET", KEYS[1])\n'
        'redis.call("SET", KEYS[1], t[1], "PX", 60000)\n'
        "return 1"
    )
    client = redis.Redis.from_url(url)
    client.ping()
    sha = client.script_load(minimal)
    targets: List[Any] = [
        ("INCR (bare round trip)", lambda k: client.incr(k), "nl-bench-incr"),
        ("minimal script (TIME, GET, SET PX)", lambda k: client.evalsha(sha, 1, k), "nl-bench-script"),
    ]
    for name in ALGORITHMS:
        lim = getattr(nlr, name)(client, ALWAYS, prefix="nl-bench")
        targets.append((f"{name}.try_acquire", lim.try_acquire, "hot-key"))
    samples: Dict[str, List[float]] = {name: [] for name, _, _ in targets}
    for _ in range(repeats):
        for name, fn, arg in targets:
            samples[name].append(ns_per_call(fn, arg, calls, 1) / 1e3)
    base = statistics.median(samples[targets[0][0]])
    script = statistics.median(samples[targets[1][0]])
    rows = []
    for name, _, _ in targets:
        us = statistics.median(samples[name])
        rows.append({"call": name, "us": us, "vs_incr": us / base, "vs_script": us / script})
    client.delete("nl-bench-incr", "nl-bench-script")
    client.close()
    return {"url": url, "rows": rows}


def store_comparison(
    redis_url: Optional[str] = None, calls: int = 20_000, repeats: int = 15, keys: int = 100_000
) -> Dict[str, Any]:
    """ns per try_acquire of a TokenBucket kept in-process, in a SharedMemoryStore and
    (with ``redis_url``) on Redis: one hot key, and ``keys`` distinct keys. Turns are
    interleaved, each figure the median of its batches."""
    import uuid

    import nexus_limits as nl

    name = f"bench-{uuid.uuid4().hex[:8]}"
    store = nl.SharedMemoryStore(name, capacity=4 * keys)
    try:
        targets: List[Tuple[str, Any]] = [
            ("in-process", nl.TokenBucket(ALWAYS)),
            ("shared memory", nl.TokenBucket(ALWAYS, store=store)),
        ]
        client = None
        if redis_url is not None:
            import redis

            from .. import redis as nlr

            client = redis.Redis.from_url(redis_url)
            targets.append(("Redis", nlr.TokenBucket(client, ALWAYS, prefix="nl-bench")))
        hot: Dict[str, List[float]] = {t: [] for t, _ in targets}
        for _ in range(repeats):
            for t, lim in targets:
                n = calls if t != "Redis" else max(calls // 100, 50)
                hot[t].append(ns_per_call(lim.try_acquire, "hot-key", n, 1))
        spread: Dict[str, float] = {}
        names = [f"client-{i:08d}" for i in range(keys)]
        for t, lim in targets:
            if t == "Redis":
                continue
            f = lim.try_acquire
            started = time.perf_counter()
            for k in names:
                f(k)
            spread[t] = (time.perf_counter() - started) / keys * 1e9
        rows = []
        base = statistics.median(hot["in-process"])
        for t, _ in targets:
            ns = statistics.median(hot[t])
            rows.append({"store": t, "hot_ns": ns, "vs_in_process": ns / base, "distinct_ns": spread.get(t)})
        shm = statistics.median(hot["shared memory"])
        out: Dict[str, Any] = {"rows": rows, "shm_vs_in_process": shm / base}
        if client is not None:
            out["redis_vs_shm"] = statistics.median(hot["Redis"]) / shm
            client.close()
        return out
    finally:
        store.unlink()


def _redis_worker(url: str, seconds: float, queue: Any) -> None:
    import redis

    from .. import redis as nlr

    client = redis.Redis.from_url(url)
    lim = nlr.TokenBucket(client, ALWAYS, prefix="nl-bench")
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(100):
            lim.try_acquire("shared-key")
        n += 100
    queue.put(n)


def redis_throughput(url: str, processes: int, seconds: float = 3.0) -> Dict[str, Any]:
    """Checks per second on one shared key from `processes` OS processes."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_redis_worker, args=(url, seconds, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(10)
    return {"processes": processes, "checks_per_second": total / seconds}


def _hit(limiter: Any, item: Any) -> Any:
    return lambda key: limiter.hit(item, key)


def redis_peers(url: str, calls: int) -> List[Dict[str, Any]]:
    """µs per check on one hot key, each library's own Redis backend, same server."""
    import redis

    from .. import redis as nlr

    rows: List[Dict[str, Any]] = []
    client = redis.Redis.from_url(url)
    ours = nlr.TokenBucket(client, "1000000000/second", prefix="nl-peers")
    rows.append(
        {"name": "nexus-limits TokenBucket (Redis)", "us": ns_per_call(ours.try_acquire, "hot", calls, 3) / 1e3}
    )
    ours_sw = nlr.SlidingWindow(client, "1000000000/second", prefix="nl-peers")
    rows.append(
        {
            "name": "nexus-limits SlidingWindow (Redis)",
            "us": ns_per_call(ours_sw.try_acquire, "hot", calls, 3) / 1e3,
        }
    )
    try:
        from limits import parse, storage, strategies

        store = storage.RedisStorage(url)
        item = parse("1000000000/second")
        for strategy in ("MovingWindowRateLimiter", "FixedWindowRateLimiter", "SlidingWindowCounterRateLimiter"):
            lim = getattr(strategies, strategy)(store)
            rows.append(
                {
                    "name": f"limits {strategy.replace('RateLimiter', '')} (Redis)",
                    "us": ns_per_call(_hit(lim, item), f"hot-{strategy}", calls, 3) / 1e3,
                }
            )
    except ImportError:
        pass
    try:
        import throttled

        store_t = throttled.RedisStore(server=url)
        th = throttled.Throttled(using="token_bucket", quota=throttled.rate_limiter.per_sec(HUGE), store=store_t)
        rows.append(
            {
                "name": "throttled-py TokenBucket (Redis)",
                "us": ns_per_call(lambda k: th.limit(k), "hot-throttled", calls, 3) / 1e3,
            }
        )
    except ImportError:
        pass
    client.close()
    base = rows[0]["us"]
    for row in rows:
        row["vs_nexus"] = row["us"] / base
    return rows
