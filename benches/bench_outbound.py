"""An application calling an LLM provider past its limits, with and without
``nexus_limits.outbound``: throughput achieved against what the provider's limits
allow, and the 429s it answered.

    python benches/bench_outbound.py                 # both providers, about a minute
    python benches/bench_outbound.py --quick         # fewer calls
    python benches/bench_outbound.py --calls 400 --window 2 --processes 4

The provider is tests/support/outbound_provider.py under real uvicorn on loopback: it
enforces its limits per model (continuously refilled buckets over ``--window``
seconds) and answers 429 with ``retry-after`` and its rate-limit headers, in OpenAI's
and Anthropic's formats. The load: ``--calls`` calls started at once (asyncio
coroutines of the official async SDK, with its defaults: 2 retries honouring
``retry-after``), and with ``--processes`` > 1 also that many processes of the sync SDK
with 25 threads each, sharing one SharedMemoryStore.

Printed per run: calls that succeeded and failed (the SDK gave up after its retries),
the provider's 429s, the time from the first call to the last answer, the calls per
second achieved against the limit's, and the share of the best time the limits allow
(the binding limit's total cost beyond a full bucket, at its refill rate) that the run
achieved (1.00: as fast as the provider allows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Tuple

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "support")]

from outbound_provider import OutboundProvider, serve  # noqa: E402

import nexus_limits as nl  # noqa: E402
from nexus_limits import outbound  # noqa: E402
from nexus_limits.tokens import count_request_tokens  # noqa: E402


def best_time(provider: OutboundProvider, model: str, refund_output: bool = False) -> float:
    """The least time between the first admission and the last that the provider's
    limits allow for the calls it admitted."""
    limits = provider.limits[model]
    totals: Dict[str, float] = {}
    for _, m, charges in provider.log:
        if m == model:
            for dim, units in charges.items():
                totals[dim] = totals.get(dim, 0) + units
    if refund_output and "output_tokens" in totals:
        totals["output_tokens"] = provider.admitted.get(model, 0) * provider.output_tokens
    return max(
        (totals[d] - limits[d]) / (limits[d] / provider.window) for d in limits if d in totals and totals[d] > limits[d]
    )


def report(name: str, provider: OutboundProvider, model: str, ok: int, failed: int, took: float, **kw: Any) -> None:
    best = best_time(provider, model, **kw) if ok else float("nan")
    share = best / took if took > 0 else float("nan")
    print(
        f"  {name:<36} ok {ok:>4}  failed {failed:>4}  429s {provider.total_refused():>5}  "
        f"{took:6.2f} s  {ok / took:6.1f} calls/s  the limits allow {best:5.2f} s for these: {share:4.2f}"
    )


async def openai_run(url: str, calls: int, wrapped: bool, window: float) -> Tuple[int, int, float]:
    import openai

    client: Any = openai.AsyncOpenAI(api_key="sk-bench", base_url=url + "/v1")
    if wrapped:
        client = outbound.wrap(client, window=window)

    async def one(i: int) -> bool:
        try:
            await client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": f"Question {i}: what is {i} squared?"}],
                max_tokens=20,
            )
            return True
        except openai.RateLimitError:
            return False

    started = time.monotonic()
    try:
        results = await asyncio.gather(*[one(i) for i in range(calls)])
    finally:
        await client.close()
    return sum(results), calls - sum(results), time.monotonic() - started


async def anthropic_run(url: str, calls: int, wrapped: bool, window: float) -> Tuple[int, int, float]:
    import anthropic

    client: Any = anthropic.AsyncAnthropic(api_key="sk-bench", base_url=url)
    if wrapped:
        client = outbound.wrap(client, window=window)

    async def one(i: int) -> bool:
        try:
            await client.messages.create(
                model="claude-bench",
                max_tokens=40,
                messages=[{"role": "user", "content": f"Item {i}: a, b; c. d! e? " * (2 + i % 4)}],
            )
            return True
        except anthropic.RateLimitError:
            return False

    started = time.monotonic()
    try:
        results = await asyncio.gather(*[one(i) for i in range(calls)])
    finally:
        await client.close()
    return sum(results), calls - sum(results), time.monotonic() - started


WORKER = r"""
import concurrent.futures, json, sys
import openai
import nexus_limits as nl
from nexus_limits import outbound
url, store, calls, first, wrapped, window = sys.argv[1:7]
client = openai.OpenAI(api_key="sk-bench", base_url=url + "/v1")
if wrapped == "1":
    client = outbound.wrap(client, store=nl.SharedMemoryStore(path=store), window=float(window))
from nexus_limits.tokens import count_request_tokens
count_request_tokens({"model": "gpt-4o", "messages": []})  # loads the tokenizer before the start
print("ready", flush=True)
sys.stdin.readline()

def one(i):
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"Q{i}"}], max_tokens=20)
        return True
    except openai.RateLimitError:
        return False

with concurrent.futures.ThreadPoolExecutor(25) as pool:
    results = list(pool.map(one, range(int(first), int(first) + int(calls))))
print(json.dumps([sum(results), len(results) - sum(results)]))
"""


def processes_run(url: str, calls: int, processes: int, wrapped: bool, window: float) -> Tuple[int, int, float]:
    store = os.path.join(tempfile.mkdtemp(prefix="nl-bench-"), "outbound.shm")
    nl.SharedMemoryStore(path=store, capacity=4096)
    per = calls // processes
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, store, str(per), str(p * per), "1" if wrapped else "0", str(window)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(processes)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    ok = failed = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        a, b = json.loads(out.strip().splitlines()[-1])
        ok, failed = ok + a, failed + b
    return ok, failed, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--window", type=float, default=2.0, help="the provider's limit window, seconds")
    parser.add_argument("--requests", type=int, default=50, help="the provider's requests per window (OpenAI)")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    calls = 120 if args.quick else args.calls
    count_request_tokens({"model": "gpt-4o", "messages": [{"role": "user", "content": "warm"}]})

    print(f"OpenAI chat completions: {calls} calls at once; the provider allows {args.requests} per {args.window:g} s")
    for wrapped in (False, True):
        prov = OutboundProvider({"gpt-4o": {"requests": args.requests, "tokens": 10**7}}, window=args.window)
        with serve(prov) as server:
            ok, failed, took = asyncio.run(openai_run(server.url, calls, wrapped, args.window))
        report(
            "outbound.wrap(AsyncOpenAI())" if wrapped else "AsyncOpenAI() alone (2 retries)",
            prov,
            "gpt-4o",
            ok,
            failed,
            took,
        )

    inp = 2000
    print(f"Anthropic messages: {calls} calls at once; the provider allows {inp} input tokens per {args.window:g} s")
    for wrapped in (False, True):
        limits = {"requests": 10**4, "input_tokens": inp, "output_tokens": 10**6}
        prov = OutboundProvider({"claude-bench": limits}, window=args.window, output_tokens=15)
        with serve(prov) as server:
            ok, failed, took = asyncio.run(anthropic_run(server.url, calls, wrapped, args.window))
        name = "outbound.wrap(AsyncAnthropic())" if wrapped else "AsyncAnthropic() alone (2 retries)"
        report(name, prov, "claude-bench", ok, failed, took)

    if args.processes > 1:
        print(
            f"OpenAI, {args.processes} processes x 25 threads (sync SDK), one SharedMemoryStore: {calls} calls; "
            f"the provider allows {args.requests} per {args.window:g} s"
        )
        for wrapped in (False, True):
            prov = OutboundProvider({"gpt-4o": {"requests": args.requests, "tokens": 10**7}}, window=args.window)
            with serve(prov) as server:
                ok, failed, took = processes_run(server.url, calls, args.processes, wrapped, args.window)
            name = "outbound.wrap(OpenAI(), store=...)" if wrapped else "OpenAI() alone (2 retries)"
            report(name, prov, "gpt-4o", ok, failed, took)


if __name__ == "__main__":
    main()
