"""Issue 19, part 3: the official openai and anthropic SDKs, with their defaults, through
nexus_limits.outbound against a provider that enforces its own limits
(tests/support/outbound_provider.py, under real uvicorn).

Every test sends far more than the provider allows at once — 200 concurrent
coroutines, or 4 processes sharing one SharedMemoryStore, or two "hosts" sharing
Redis — with the limits unknown at the start (learned from the first answer's
headers). Each call must finish, the provider must refuse none, and the time from
the provider's first admission to its last must be within 10% of the least its
limits allow: (calls' total cost - the bucket) / the refill rate, on the binding
limit. A first test shows the same load without the transport does meet 429s.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import anthropic
import openai
import pytest
from support.outbound_provider import OutboundProvider, claude_tokens, serve

import nexus_limits as nl
from nexus_limits import outbound
from nexus_limits.tokens import count_request_tokens

WINDOW = 2.0
N = 200


def ideal_span(provider: OutboundProvider, model: str) -> float:
    """The least time the provider's limits allow between its first admission and its
    last, given the charges it recorded: the binding limit's total cost beyond a full
    bucket, at its refill rate."""
    limits = provider.limits[model]
    totals: Dict[str, int] = {}
    for _, m, charges in provider.log:
        if m == model:
            for dim, units in charges.items():
                totals[dim] = totals.get(dim, 0) + units
    # The last admission needs its own cost in the bucket: (total - capacity) / rate.
    return max((totals[d] - limits[d]) / (limits[d] / provider.window) for d in limits if d in totals)


def span(provider: OutboundProvider) -> float:
    times = [t for t, _, _ in provider.log]
    return max(times) - min(times)


def check_run(provider: OutboundProvider, model: str, calls: int, allowed_429: int = 0) -> None:
    refused = provider.total_refused()
    assert refused <= allowed_429, f"the provider answered {refused} 429s"
    assert provider.admitted.get(model) == calls
    ideal = ideal_span(provider, model)
    took = span(provider)
    assert ideal > 3.0, "the test must send well past the provider's bucket"
    print(
        f"\n{model}: {calls} calls in {took:.3f} s, the limits allow {ideal:.3f} s ({took / ideal:.3f}x), 429s: {refused}"
    )
    # Never faster than the provider allows, at most 10% slower.
    assert ideal - 0.05 <= took <= 1.10 * ideal, f"took {took:.3f} s, the limits allow {ideal:.3f} s"


def chat_words(i: int) -> str:
    return f"Question {i}: what is {i} times {i + 1}? Answer briefly."


def claude_text(i: int) -> str:
    # Short words and punctuation: the provider's tokenizer counts more tokens than a
    # characters/3.5 estimate, so the estimator has to learn (and the margin to hold).
    return f"Item {i}: a, b; c. d! e? f - g, h; i. j! " * (2 + i % 4)


@pytest.fixture
def warm():
    """Loads the tokenizer once, so the first call of a timed run does not pay for it."""
    count_request_tokens({"model": "gpt-4o", "messages": [{"role": "user", "content": "warm"}]})


def test_the_provider_enforces_its_limits_against_the_bare_sdk(warm):
    prov = OutboundProvider({"gpt-4o": {"requests": 20, "tokens": 10**6}}, window=WINDOW)
    with serve(prov) as server:

        async def main() -> List[object]:
            client = openai.AsyncOpenAI(api_key="sk-test", base_url=server.url + "/v1", max_retries=0)
            try:
                return await asyncio.gather(
                    *[
                        client.chat.completions.create(
                            model="gpt-4o", messages=[{"role": "user", "content": chat_words(i)}], max_tokens=20
                        )
                        for i in range(60)
                    ],
                    return_exceptions=True,
                )
            finally:
                await client.close()

        results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == prov.total_refused() >= 30
    assert "retry-after" in refused[0].response.headers


def test_200_coroutines_openai_learned_limits_no_429(warm):
    prov = OutboundProvider({"gpt-4o": {"requests": 50, "tokens": 10**6}}, window=WINDOW)
    with serve(prov) as server:

        async def main() -> List[int]:
            client = outbound.wrap(openai.AsyncOpenAI(api_key="sk-test", base_url=server.url + "/v1"), window=WINDOW)
            try:

                async def one(i: int) -> int:
                    r = await client.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": chat_words(i)}], max_tokens=20
                    )
                    assert r.usage is not None
                    return r.usage.completion_tokens

                return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(N)]), 60)
            finally:
                await client.close()

        assert asyncio.run(main()) == [20] * N
    check_run(prov, "gpt-4o", N)


def test_200_coroutines_openai_tokens_bind_streams_and_json(warm):
    """The token limit binds: each call's exact input plus its max_tokens (what OpenAI
    counts) against 6,000 tokens per 2 s; half the calls stream."""
    prov = OutboundProvider({"gpt-4o-mini": {"requests": 1000, "tokens": 6000}}, window=WINDOW, output_tokens=25)
    with serve(prov) as server:

        async def main() -> None:
            client = outbound.wrap(openai.AsyncOpenAI(api_key="sk-test", base_url=server.url + "/v1"), window=WINDOW)
            try:

                async def one(i: int) -> None:
                    messages = [{"role": "user", "content": chat_words(i) * (1 + i % 3)}]
                    if i % 2:
                        stream = await client.chat.completions.create(
                            model="gpt-4o-mini",
                            messages=messages,
                            max_tokens=60,
                            stream=True,
                            stream_options={"include_usage": True},
                        )
                        chunks = [c async for c in stream]
                        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 25
                    else:
                        r = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=60)
                        assert r.usage is not None and r.usage.completion_tokens == 25

                await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(N)]), 60)
            finally:
                await client.close()

        asyncio.run(main())
    check_run(prov, "gpt-4o-mini", N)


def test_200_coroutines_anthropic_input_limit_binds_estimates_learn(warm):
    """Anthropic's separate input and output limits; the input limit binds, and the
    client only estimates Claude's tokens: the first answer calibrates the estimator,
    the margin covers the rest."""
    prov = OutboundProvider(
        {"claude-test-input": {"requests": 1000, "input_tokens": 4000, "output_tokens": 8000}},
        window=WINDOW,
        output_tokens=15,
    )
    with serve(prov) as server:

        async def main() -> List[int]:
            client = outbound.wrap(anthropic.AsyncAnthropic(api_key="sk-test", base_url=server.url), window=WINDOW)
            try:

                async def one(i: int) -> int:
                    r = await client.messages.create(
                        model="claude-test-input",
                        max_tokens=40,
                        messages=[{"role": "user", "content": claude_text(i)}],
                    )
                    return r.usage.input_tokens

                return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(N)]), 60)
            finally:
                await client.close()

        inputs = asyncio.run(main())
    truth = [claude_tokens({"messages": [{"role": "user", "content": claude_text(i)}]}) for i in range(N)]
    assert inputs == truth
    base = anthropic_base = outbound.OutboundLimiter().estimator.base
    assert sum(truth) > 1.3 * sum(base({"messages": [{"role": "user", "content": claude_text(i)}]}) for i in range(N))
    del anthropic_base
    check_run(prov, "claude-test-input", N)


# --- processes --------------------------------------------------------------------------
WORKER = r"""
import asyncio, json, sys, concurrent.futures
import nexus_limits as nl
from nexus_limits import outbound
from nexus_limits.tokens import count_request_tokens

url, store_path, kind, calls, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
limits = json.loads(sys.argv[6]) or None
store = nl.SharedMemoryStore(path=store_path)
count_request_tokens({"model": "gpt-4o", "messages": [{"role": "user", "content": "warm"}]})
results = []

def text(i):
    return f"Item {i}: a, b; c. d! e? f - g, h; i. j! " * (2 + i % 4)

if kind == "openai":
    import openai
    client = outbound.wrap(
        openai.OpenAI(api_key="sk-test", base_url=url + "/v1"), store=store, window=2.0, limits=limits
    )
    print("ready", flush=True)
    sys.stdin.readline()

    def one(i):
        r = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"Question {i}: what is {i} squared?"}], max_tokens=20
        )
        return r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(25) as pool:
        results = list(pool.map(one, range(first, first + calls)))
    client.close()
else:
    import anthropic

    async def main():
        client = outbound.wrap(
            anthropic.AsyncAnthropic(api_key="sk-test", base_url=url), store=store, window=2.0, limits=limits
        )
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def one(i):
            r = await client.messages.create(
                model="claude-test-output", max_tokens=40, messages=[{"role": "user", "content": text(i)}]
            )
            return r.usage.output_tokens

        try:
            return await asyncio.gather(*[one(i) for i in range(first, first + calls)])
        finally:
            await client.close()

    results = asyncio.run(main())
print(json.dumps({"results": results, "stats": client._client._transport.stats() if kind == "openai" else None}))
"""


def run_workers(tmp_path, url: str, kind: str, processes: int, calls: int, limits=None) -> List[dict]:
    store_path = str(tmp_path / "outbound.shm")
    nl.SharedMemoryStore(path=store_path, capacity=4096)  # created once, opened by each worker
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, store_path, kind, str(calls), str(p * calls), json.dumps(limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
        for proc in procs:  # all start together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=90)
            assert proc.returncode == 0, stderr
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_4_processes_sync_openai_share_one_store_learned_limits(tmp_path):
    """The limits are unknown at the start: each process sends one call alone (its
    probe) and learns them from the answer. A process that learnt them first cannot
    know of the other processes' probes still on their way, so at most those (3) meet
    a 429 — within the first window, as the issue allows — and are sent again."""
    prov = OutboundProvider({"gpt-4o": {"requests": 40, "tokens": 10**6}}, window=WINDOW)
    with serve(prov) as server:
        out = run_workers(tmp_path, server.url, "openai", processes=4, calls=50)
    assert [r["results"] for r in out] == [[20] * 50] * 4
    first = min(t for t, _, _ in prov.log)
    check_run(prov, "gpt-4o", 200, allowed_429=3)
    assert all(t - first < WINDOW for t in prov.refused_at)


def test_4_processes_async_anthropic_share_one_store_given_limits_no_429(tmp_path):
    """Given limits: every call is reserved in the shared store before it is sent, so
    not one of the 4 x 50 coroutines meets a 429."""
    limits = {"requests": 1000, "input_tokens": 10**6, "output_tokens": 1500}
    prov = OutboundProvider({"claude-test-output": limits}, window=WINDOW, output_tokens=30)
    given = {"claude-test-output": {dim: f"{n}/2s" for dim, n in limits.items()}}
    with serve(prov) as server:
        out = run_workers(tmp_path, server.url, "anthropic", processes=4, calls=50, limits=given)
    assert [r["results"] for r in out] == [[30] * 50] * 4
    # The output limit binds: max_tokens is reserved and adjusted to the real output
    # when the answer ends, by the provider and by the transport alike.
    check_run_output(prov, "claude-test-output", 200)


def check_run_output(provider: OutboundProvider, model: str, calls: int) -> None:
    """check_run for Anthropic's output limit: the provider charges max_tokens at
    admission and refunds the unused part when the answer ends, so the least time its
    limit allows is that of the real outputs."""
    assert provider.total_refused() == 0, f"the provider answered {provider.total_refused()} 429s"
    assert provider.admitted.get(model) == calls
    limit = provider.limits[model]["output_tokens"]
    outputs = calls * 30
    # The last call needs its max_tokens (40) in the bucket when it is admitted.
    ideal = (outputs - 30 + 40 - limit) / (limit / provider.window)
    took = span(provider)
    print(f"\n{model}: {calls} calls in {took:.3f} s, the limits allow {ideal:.3f} s ({took / ideal:.3f}x)")
    assert ideal > 3.0
    assert ideal - 0.05 <= took <= 1.10 * ideal, f"took {took:.3f} s, the limits allow {ideal:.3f} s"


# --- Redis: two hosts --------------------------------------------------------------------
def test_two_hosts_share_the_limit_on_redis_no_429(redis_server, warm):
    import redis.asyncio

    redis.Redis(port=redis_server.port).flushall()
    prov = OutboundProvider({"gpt-4o": {"requests": 50, "tokens": 10**6}}, window=WINDOW)
    with serve(prov) as server:

        async def host(i: int) -> List[int]:
            store = redis.asyncio.Redis(port=redis_server.port)
            client = outbound.wrap(
                openai.AsyncOpenAI(api_key="sk-test", base_url=server.url + "/v1"), store=store, window=WINDOW
            )
            try:

                async def one(j: int) -> int:
                    r = await client.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": chat_words(j)}], max_tokens=20
                    )
                    assert r.usage is not None
                    return r.usage.completion_tokens

                return await asyncio.gather(*[one(i * 100 + j) for j in range(100)])
            finally:
                await client.close()
                await store.aclose()

        async def main() -> List[List[int]]:
            return await asyncio.wait_for(asyncio.gather(host(0), host(1)), 60)

        assert asyncio.run(main()) == [[20] * 100] * 2
    check_run(prov, "gpt-4o", 200)


def test_the_sync_transport_with_threads_on_redis(redis_client, warm):
    import concurrent.futures

    prov = OutboundProvider({"gpt-4o": {"requests": 20, "tokens": 10**6}}, window=WINDOW)
    with serve(prov) as server:
        client = outbound.wrap(
            openai.OpenAI(api_key="sk-test", base_url=server.url + "/v1"), store=redis_client, window=WINDOW
        )

        def one(i: int) -> int:
            r = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": chat_words(i)}], max_tokens=20
            )
            assert r.usage is not None
            return r.usage.completion_tokens

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            assert list(pool.map(one, range(50))) == [20] * 50
        client.close()
    assert prov.total_refused() == 0
    assert time.monotonic() - started < 20
    assert math.isclose(span(prov), ideal_span(prov, "gpt-4o"), rel_tol=0.1, abs_tol=0.1)


def test_clients_without_a_shared_store_converge_through_the_headers(warm):
    """Three clients of one organisation that share no store (three processes, say):
    each learns from the headers what the others spend, and the 429s it still meets
    pause and requeue the calls, so every call finishes, without the SDK retrying,
    near the provider's pace. (Sharing a store removes the 429s: the tests above.)"""
    prov = OutboundProvider({"gpt-4o": {"requests": 30, "tokens": 10**6}}, window=WINDOW)
    with serve(prov) as server:

        async def main() -> List[bool]:
            clients = [
                outbound.wrap(
                    openai.AsyncOpenAI(api_key="sk-test", base_url=server.url + "/v1", max_retries=0), window=WINDOW
                )
                for _ in range(3)
            ]

            async def one(client: Any, i: int) -> bool:
                try:
                    await client.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": chat_words(i)}], max_tokens=5
                    )
                    return True
                except openai.RateLimitError:
                    return False

            try:
                return await asyncio.wait_for(asyncio.gather(*[one(c, i) for c in clients for i in range(40)]), 60)
            finally:
                for client in clients:
                    await client.close()

        results = asyncio.run(main())
    assert all(results) and prov.admitted["gpt-4o"] == 120
    refused = prov.total_refused()
    ideal = ideal_span(prov, "gpt-4o")
    print(f"\n3 clients, no shared store: 120 calls in {span(prov):.3f} s ({span(prov) / ideal:.3f}x), 429s: {refused}")
    # The bare SDK meets one 429 per call past the bucket (90 here) and loses those calls;
    # these clients lose none and meet fewer. How many fewer depends on how the three
    # interleave (60-63 seen on a loaded 2-core machine, about 40 on a quiet one).
    assert refused < 80
    assert span(prov) <= 1.25 * ideal
