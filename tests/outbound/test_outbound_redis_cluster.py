"""The outbound limiter on a real 3-node Redis Cluster: several transports — in threads
of one process, and in separate processes, sync and asyncio — share one model's limit
through the cluster, and the provider (tests/support/outbound_provider.py, under real
uvicorn) answers not one 429. The keys of one model live in one slot (their hash tag),
so the ledger's script, which touches them together, runs on the cluster; different
models spread over the nodes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any, Dict

import openai
import pytest
import redis
import redis.cluster
from support.outbound_provider import OutboundProvider, serve

from nexus_limits import outbound
from nexus_limits.tokens import count_request_tokens

WINDOW = 2.0
MODEL = "gpt-4o"


@pytest.fixture(autouse=True)
def warm():
    count_request_tokens({"model": MODEL, "messages": [{"role": "user", "content": "warm"}]})


def cluster_keys(cluster: Any, pattern: str) -> Dict[str, int]:
    """Every key matching ``pattern`` on every node, with the port of its node."""
    found = {}
    for node in cluster.nodes:
        c = redis.Redis(port=node.port)
        try:
            for key in c.scan_iter(match=pattern, count=1000):
                found[key.decode()] = node.port
        finally:
            c.close()
    return found


def check_run(provider: OutboundProvider, calls: int, limit: int) -> None:
    """Every call admitted, none refused, at the pace the provider's limit allows (the
    calls beyond one bucket at its refill rate), within 10%."""
    assert provider.total_refused() == 0, f"the provider answered {provider.total_refused()} 429s"
    assert provider.admitted.get(MODEL) == calls
    times = [t for t, _, _ in provider.log]
    took = max(times) - min(times)
    ideal = (calls - limit) / (limit / WINDOW)
    print(f"\n{calls} calls in {took:.3f} s, the limit allows {ideal:.3f} s ({took / ideal:.3f}x), 429s: 0")
    assert ideal - 0.05 <= took <= 1.10 * ideal, f"took {took:.3f} s, the limit allows {ideal:.3f} s"


def test_a_models_keys_share_one_slot_and_models_spread(redis_cluster):
    namespace = f"slots-{uuid.uuid4().hex[:8]}"
    models = [f"model-{i}" for i in range(12)]
    prov = OutboundProvider({m: {"requests": 1000, "tokens": 10**6} for m in models}, window=WINDOW)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    with serve(prov) as server:
        sdk = outbound.wrap(
            openai.OpenAI(api_key="sk-test", base_url=server.url + "/v1"),
            store=client,
            namespace=namespace,
            limits={"*": {"requests": "100/minute", "tokens": "100000/minute"}},
        )
        # A bucket's key lives only while the bucket is not full (a request of 100/minute
        # for 0.6 s): each model's keys are looked for right after its call.
        seen: Dict[str, Dict[str, int]] = {}
        try:
            for model in models:
                r = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
                assert r.usage.completion_tokens == 5
                seen[model] = cluster_keys(redis_cluster, f"nl:{namespace}:{{{model}}}:*")
        finally:
            sdk.close()
    nodes = set()
    for model in models:
        names = {f"nl:{namespace}:{{{model}}}:{dim}" for dim in ("requests", "tokens", "pause")}
        assert seen[model] and set(seen[model]) <= names, (model, seen[model])
        assert len({client.keyslot(k) for k in names}) == 1, f"{model}'s keys span slots"
        assert len(set(seen[model].values())) == 1
        nodes.add(client.get_node_from_key(f"nl:{namespace}:{{{model}}}:requests").port)
    assert len(nodes) == 3, "twelve models spread over the three nodes"
    stats = outbound.limiter_of(sdk).stats()
    assert stats["store"] == "redis" and stats["redis"]["breaker_open"] == 0 and stats["redis"]["errors"] == 0
    client.close()


def test_three_transports_in_threads_share_one_limit_through_the_cluster(redis_cluster):
    """Three clients, each with its own cluster client and transport (as three
    services would have), 20 threads each, 60 calls against a limit of 20 per 2 s."""
    namespace = f"threads-{uuid.uuid4().hex[:8]}"
    prov = OutboundProvider({MODEL: {"requests": 20, "tokens": 10**6}}, window=WINDOW)
    limits = {MODEL: {"requests": f"20/{WINDOW:g}s", "tokens": f"1000000/{WINDOW:g}s"}}
    with serve(prov) as server:
        stores = [redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.port) for _ in range(3)]
        clients = [
            outbound.wrap(
                openai.OpenAI(api_key="sk-test", base_url=server.url + "/v1"),
                store=store,
                namespace=namespace,
                limits=limits,
                window=WINDOW,
            )
            for store in stores
        ]

        def one(i: int) -> int:
            r = clients[i % 3].chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=5
            )
            return r.usage.completion_tokens

        try:
            with concurrent.futures.ThreadPoolExecutor(60) as pool:
                assert list(pool.map(one, range(60), timeout=60)) == [5] * 60
        finally:
            for c in clients:
                c.close()
            for s in stores:
                s.close()
    check_run(prov, 60, 20)
    keys = cluster_keys(redis_cluster, f"nl:{namespace}:*")
    assert len({redis.cluster.RedisCluster.keyslot(stores[0], k) for k in keys}) == 1


WORKER = r"""
import asyncio, json, sys, concurrent.futures
import openai, redis.cluster, redis.asyncio.cluster
from nexus_limits import outbound

url, port, namespace, kind, calls, first = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
limits = {"gpt-4o": {"requests": "15/2s", "tokens": "1000000/2s"}}

def ask(i):
    return [{"role": "user", "content": f"question {i}"}]

if kind == "sync":
    store = redis.cluster.RedisCluster(host="127.0.0.1", port=port)
    client = outbound.wrap(openai.OpenAI(api_key="sk-test", base_url=url), store=store, namespace=namespace,
                           limits=limits, window=2.0)
    print("ready", flush=True)
    sys.stdin.readline()
    def one(i):
        return client.chat.completions.create(model="gpt-4o", messages=ask(i), max_tokens=5).usage.completion_tokens
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        results = list(pool.map(one, range(first, first + calls)))
    stats = outbound.limiter_of(client).stats()
    client.close()
else:
    async def main():
        store = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port)
        client = outbound.wrap(openai.AsyncOpenAI(api_key="sk-test", base_url=url), store=store,
                               namespace=namespace, limits=limits, window=2.0)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        async def one(i):
            r = await client.chat.completions.create(model="gpt-4o", messages=ask(i), max_tokens=5)
            return r.usage.completion_tokens
        try:
            return await asyncio.gather(*[one(i) for i in range(first, first + calls)]), outbound.limiter_of(client).stats()
        finally:
            await client.close()
            await store.aclose()
    results, stats = asyncio.run(main())
print(json.dumps({"results": results, "redis": stats["redis"]}))
"""


def test_three_processes_sync_and_asyncio_share_one_limit_through_the_cluster(redis_cluster):
    """Three processes (two sync, one asyncio), 15 concurrent calls each, against a
    limit of 15 per 2 s; all start together."""
    namespace = f"procs-{uuid.uuid4().hex[:8]}"
    prov = OutboundProvider({MODEL: {"requests": 15, "tokens": 10**6}}, window=WINDOW)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    with serve(prov) as server:
        url, port = server.url + "/v1", str(redis_cluster.port)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, url, port, namespace, kind, "15", str(p * 15)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for p, kind in enumerate(["sync", "sync", "asyncio"])
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
            started = time.monotonic()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            out = []
            for proc in procs:
                stdout, stderr = proc.communicate(timeout=60)
                assert proc.returncode == 0, stderr
                out.append(json.loads(stdout.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    assert time.monotonic() - started < 30
    assert [r["results"] for r in out] == [[5] * 15] * 3
    assert all(r["redis"]["errors"] == 0 and r["redis"]["breaker_open"] == 0 for r in out)
    check_run(prov, 45, 15)


# -- a hung node ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster():
    """A cluster of this module's own: a node is made to hang."""
    from support.servers import RedisCluster

    c = RedisCluster().start()
    yield c
    c.close()


def test_a_hung_node_costs_one_socket_timeout_and_holds_back_only_its_models(own_cluster):
    """A cluster client with short socket timeouts (and its 10 retries by default): while
    the node serving one model hangs (DEBUG SLEEP), that model's first call waits one
    socket timeout, and its next calls answer at once from this process's share
    (on_error="local"); a model served by another node keeps its buckets on Redis."""
    import threading

    prov = OutboundProvider(default={"requests": 1000, "tokens": 10**6}, window=WINDOW)
    store = redis.cluster.RedisCluster(
        host="127.0.0.1", port=own_cluster.port, socket_timeout=0.3, socket_connect_timeout=0.3
    )
    with serve(prov) as server:
        client = outbound.wrap(
            openai.OpenAI(api_key="sk-test", base_url=server.url + "/v1"),
            store=store,
            limits={"*": {"requests": "100/minute", "tokens": "100000/minute"}},
            on_error="local",
            replicas=3,
        )
        limiter = outbound.limiter_of(client)
        ledger: Any = limiter.ledger
        by_port: Dict[int, str] = {}
        for i in range(200):
            model = f"model-{i}"
            by_port.setdefault(store.get_node_from_key(ledger._keys(model, [])[0]).port, model)
        assert len(by_port) == 3
        victim, hurt = next(iter(by_port.items()))
        healthy = [m for p, m in by_port.items() if p != victim]

        def ask(model: str) -> float:
            start = time.monotonic()
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            assert r.usage.completion_tokens == 5
            return time.monotonic() - start

        def sleep_node() -> None:
            c = redis.Redis(port=victim)
            c.execute_command("DEBUG", "SLEEP", 3)
            c.close()

        try:
            for model in by_port.values():
                ask(model)
            sleeper = threading.Thread(target=sleep_node)
            sleeper.start()
            time.sleep(0.1)
            first = ask(hurt)
            assert first < 1.0, f"{first:.2f} s: one attempt, not the cluster client's retries"
            assert max(ask(hurt) for _ in range(5)) < 0.5
            stats = limiter.stats()["redis"]
            assert stats["breaker_open"] == 1, "the hung node's breaker only"
            errors = stats["errors"]
            for model in healthy:
                before = ledger.used(model, limiter.rates(model))["requests"]
                ask(model)
                assert ledger.used(model, limiter.rates(model))["requests"] > before, "counted on Redis"
            assert limiter.stats()["redis"]["errors"] == errors, "the other nodes answered"
            sleeper.join(10)
            deadline = time.monotonic() + 10
            while limiter.stats()["redis"]["breaker_open"] and time.monotonic() < deadline:
                ask(hurt)
                time.sleep(0.1)
            assert limiter.stats()["redis"]["breaker_open"] == 0
        finally:
            client.close()
            store.close()
