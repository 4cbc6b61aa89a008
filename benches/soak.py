"""Soak: a mixed workload for a long time, watching resident memory.

    python benches/soak.py --seconds 1800          # the documented 30-minute run
    python benches/soak.py --seconds 60            # what CI runs (tests/package/test_soak.py)

Threads keep going at once, for the whole time:
- in-process limiters of every algorithm, a Composite and a TokenLimiter (reserve,
  then settle or cancel) on keys drawn from 30,000, with ``max_keys`` of 20,000 (so
  the stores fill up, reclaim and deny new keys);
- Redis limiters (a redis-server started here, or ``--redis URL``) on 20,000 keys;
- HTTP requests through the ASGI middleware (uvicorn on loopback) with 5,000 keys;
- a shared-memory store with 20,000 keys.

Resident memory is sampled every few seconds. The run fails (exit 1) if any worker
raised, or if memory still grows in the second half: after the first half, when every
bounded structure has reached its size, the last sample may exceed the first of the
second half by at most 10% + 16 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--redis", help="a redis:// URL (default: start a redis-server here)")
    parser.add_argument("--sample", type=float, default=0.0, help="seconds between memory samples")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    import httpx
    import redis
    from support.servers import ASGIServer, RedisServer

    import nexus_limits as nl
    import nexus_limits.redis as nlr
    from nexus_limits.adapters.asgi import RateLimitMiddleware

    server = None
    url = args.redis
    if url is None:
        server = RedisServer().start()
        url = server.url
    client = redis.Redis.from_url(url, socket_timeout=5)
    store_name = f"soak-{os.getpid()}"
    store = nl.SharedMemoryStore(store_name, capacity=1 << 17)

    counts: Dict[str, int] = {}
    errors: List[str] = []
    stop = threading.Event()

    def worker(name: str, step: Any) -> None:
        n = 0
        rng = random.Random(name)
        try:
            while not stop.is_set():
                step(rng)
                n += 1
        except Exception as error:  # any failure fails the soak
            errors.append(f"{name}: {type(error).__name__}: {error}")
        counts[name] = n

    in_process = [
        nl.TokenBucket("100/s", max_keys=20_000),
        nl.SlidingWindow("100/minute", max_keys=20_000),
        nl.FixedWindow("100/minute", max_keys=20_000),
        nl.LeakyBucket("100/s", max_keys=20_000),
    ]
    composite = nl.Composite([nl.TokenBucket("10/s", max_keys=20_000), nl.FixedWindow("50/minute", max_keys=20_000)])
    tokens = nl.TokenLimiter(requests="100/minute", tokens="100000/minute", concurrency=4, max_keys=20_000)

    def local(rng: random.Random) -> None:
        key = rng.randrange(30_000)
        for lim in in_process:
            lim.try_acquire(key)
        composite.hit(key)
        r = tokens.reserve(key % 25_000, rng.randrange(1, 2_000))
        if r.allowed:
            r.settle(rng.randrange(0, 2_000)) if rng.random() < 0.8 else r.cancel()
        if key % 50 == 0:
            time.sleep(0.0005)

    remote = [nlr.TokenBucket(client, "100/s", prefix="soak"), nlr.SlidingWindow(client, "100/minute", prefix="soak")]

    def on_redis(rng: random.Random) -> None:
        key = rng.randrange(20_000)
        for lim in remote:
            lim.hit(key)

    shared = nl.TokenBucket("100/s", store=store)

    def on_shm(rng: random.Random) -> None:
        for _ in range(20):
            shared.try_acquire(rng.randrange(20_000))
        time.sleep(0.0005)  # let the other threads have the GIL

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = RateLimitMiddleware(ok, limiter=nl.SlidingWindow("20/s", max_keys=20_000), key="header:x-api-key")
    http_server = ASGIServer(app).__enter__()
    http = httpx.Client(base_url=http_server.url, timeout=10)

    def over_http(rng: random.Random) -> None:
        r = http.get("/", headers={"x-api-key": str(rng.randrange(5_000))})
        if r.status_code not in (200, 429):
            raise RuntimeError(f"status {r.status_code}")

    threads = [
        threading.Thread(target=worker, args=("in-process", local)),
        threading.Thread(target=worker, args=("redis", on_redis)),
        threading.Thread(target=worker, args=("shared-memory", on_shm)),
        threading.Thread(target=worker, args=("http", over_http)),
    ]
    sample_every = args.sample or max(1.0, args.seconds / 30)
    samples: List[Dict[str, float]] = []
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - started < args.seconds and not errors:
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": rss() / 2**20})
            time.sleep(min(sample_every, max(0.0, args.seconds - (time.monotonic() - started))))
        samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": rss() / 2**20})
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        http.close()
        http_server.__exit__(None, None, None)
        client.close()
        store.unlink()
        if server is not None:
            server.close()

    second_half = [s for s in samples if s["t"] >= args.seconds / 2] or samples[-1:]
    first, last = second_half[0]["rss_mb"], second_half[-1]["rss_mb"]
    stable = last <= first * 1.10 + 16
    result = {
        "seconds": args.seconds,
        "operations": counts,
        "errors": errors,
        "rss_mb": {"start": samples[0]["rss_mb"], "half": first, "end": last, "max": max(s["rss_mb"] for s in samples)},
        "stable": stable,
        "samples": samples,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"soak: {args.seconds:.0f} s; operations: {counts}")
        print(
            f"resident memory: {samples[0]['rss_mb']:.1f} MB at start, {first:.1f} MB at half time, "
            f"{last:.1f} MB at the end (max {result['rss_mb']['max']:.1f} MB): {'stable' if stable else 'GROWING'}"
        )
        for e in errors:
            print("error:", e)
    return 0 if stable and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
