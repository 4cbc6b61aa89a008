"""The library pieces the LLM middleware and the gateway call on every request, timed
one by one in one process.

    python benches/bench_hot_parts.py                          # this checkout only
    python benches/bench_hot_parts.py --baseline /tmp/h1base   # and an earlier copy, interleaved

``--baseline DIR``: DIR holds an earlier copy of the ``nexus_limits`` package
(``cp -r python /tmp/h1base`` before a change: DIR is then ``/tmp/h1base``, the folder
that contains ``nexus_limits/``). Its pure-Python modules are imported under the name
``nl_baseline``, next to this checkout's ``nexus_limits``; both use this checkout's
native ``_core`` (the pieces timed here are Python), so old and new differ only in
their Python code. Rounds alternate old and new, so whatever else the machine does
lands on both alike; each figure is the median of its rounds, in microseconds per call.

The pieces, each on the shape of a typical gateway request (an OpenAI chat request
``{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}``,
answered with a ~300-byte JSON completion carrying ``usage``):

- ``UsageReader()``: building the reader for the answer (``content-type:
  application/json``, no content coding);
- ``UsageReader life``: building it, ``forwarded_headers``, ``feed`` of the body,
  ``flush`` and ``finish``: everything the middleware does with it;
- ``count_request_tokens``: the request's input tokens (the message text differs from
  call to call, as real traffic does);
- ``reserve+headers+settle``: ``TokenLimiter.reserve``, ``headers()`` and ``settle``
  (a limiter with a requests and a tokens limit that are never reached);
- ``peek``: ``TokenLimiter.peek(key)`` and its ``allowed``;
- ``Metrics.observe``: one request's counter and histogram update.

Before timing, the script checks that old and new give the same answers (usage,
counts, headers, the metrics text) and stops if they do not.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

BODY = json.dumps(
    {
        "id": "chatcmpl-bench-0123456789abcdefghijklmnop",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        "system_fingerprint": "fp_0123456789",
    }
).encode()
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"x-request-id", b"req_bench"),
    (b"date", b"Mon, 30 Nov 2026 18:00:00 GMT"),
]
# Distinct texts, so that nothing keyed by the content could help.
TEXTS = [f"Say hello {i}" if i % 2 else f"Say hello to {i} people" for i in range(1000)]
BODIES = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]} for text in TEXTS]


def load_baseline(directory: str) -> Any:
    """The package in ``directory``/nexus_limits, imported as ``nl_baseline`` with this
    checkout's native core."""
    import nexus_limits._core

    root = Path(directory) / "nexus_limits"
    if not (root / "__init__.py").is_file():
        sys.exit(f"--baseline: {root}/__init__.py not found (pass the folder that contains nexus_limits/)")
    sys.modules["nl_baseline._core"] = nexus_limits._core
    spec = importlib.util.spec_from_file_location(
        "nl_baseline", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nl_baseline"] = module
    spec.loader.exec_module(module)
    return module


def pieces(pkg: Any) -> Dict[str, Callable[[int], float]]:
    """name -> run(n): seconds per call over n calls."""
    name = pkg.__name__
    response = importlib.import_module(f"{name}.tokens._response")
    count_mod = importlib.import_module(f"{name}.tokens._count")
    budget = importlib.import_module(f"{name}.budget")
    metrics_mod = importlib.import_module(f"{name}.metrics")
    from prometheus_client import CollectorRegistry

    UsageReader = response.UsageReader
    count_request_tokens = count_mod.count_request_tokens
    count_request_tokens(BODIES[0])  # builds the encoding

    def reader_init(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            UsageReader(
                "openai",
                "gpt-4o-mini",
                9,
                content_type="application/json",
                content_encoding=None,
                strip_usage_chunk=False,
            )
        return (time.perf_counter() - start) / n

    def reader_life(n: int) -> float:
        body = BODY
        headers = HEADERS
        start = time.perf_counter()
        for _ in range(n):
            reader = UsageReader(
                "openai",
                "gpt-4o-mini",
                9,
                content_type="application/json",
                content_encoding=None,
                strip_usage_chunk=False,
            )
            reader.forwarded_headers(headers)
            reader.feed(body)
            reader.flush()
            reader.finish(True)
        return (time.perf_counter() - start) / n

    def count(n: int) -> float:
        bodies = BODIES
        m = len(bodies)
        start = time.perf_counter()
        for i in range(n):
            count_request_tokens(bodies[i % m], provider="openai", key="sk-bench")
        return (time.perf_counter() - start) / n

    limiter = budget.TokenLimiter(requests="1000000000/minute", tokens="1000000000000/minute")

    def reserve(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            r = limiter.reserve("sk-bench", 1033)
            r.headers()
            r.settle(12)
        return (time.perf_counter() - start) / n

    def peek(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            _ = limiter.peek("sk-bench").allowed
        return (time.perf_counter() - start) / n

    metrics = metrics_mod.Metrics(registry=CollectorRegistry())
    decision = limiter.peek("sk-bench").decision

    def observe(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            metrics.observe("tier-a", "a", "/v1/chat/completions", 0.00021, decision)
        return (time.perf_counter() - start) / n

    return {
        "UsageReader()": reader_init,
        "UsageReader life": reader_life,
        "count_request_tokens": count,
        "reserve+headers+settle": reserve,
        "peek": peek,
        "Metrics.observe": observe,
    }


def answers(pkg: Any) -> List[Any]:
    """What each piece answers on a few shapes, to compare old with new."""
    name = pkg.__name__
    response = importlib.import_module(f"{name}.tokens._response")
    count_mod = importlib.import_module(f"{name}.tokens._count")
    budget = importlib.import_module(f"{name}.budget")
    metrics_mod = importlib.import_module(f"{name}.metrics")
    from prometheus_client import CollectorRegistry

    out: List[Any] = []
    for body, headers in ((BODY, HEADERS), (b'{"usage": {"prompt_tokens": 1}, "choices": []}', HEADERS)):
        reader = response.UsageReader("openai", "gpt-4o", 5, content_type="application/json", content_encoding=None)
        out.append(reader.forwarded_headers(headers))
        out.append(reader.feed(body))
        out.append(reader.flush())
        try:
            out.append(reader.finish(True))
        except ValueError as error:
            out.append(repr(error))
    for body in BODIES[:50]:
        out.append(count_mod.count_request_tokens(body))
    limiter = budget.TokenLimiter(requests="2/minute", tokens="1000/minute")
    for tokens in (10, 900, 10, 10):
        r = limiter.reserve("k", tokens)
        out.append(sorted(r.headers()))
        out.append(r.allowed)
    registry = CollectorRegistry()
    metrics = metrics_mod.Metrics(registry=registry)
    decision = limiter.peek("k").decision
    for seconds in (0.0, 1e-6, 3e-6, 0.0002, 0.7, 5.0):
        metrics.observe("tier-a", "a", "/v1/chat/completions", seconds, decision)
    text = metrics.render().decode()
    out.append([line for line in text.splitlines() if "_created" not in line])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="DIR", help="a folder holding an earlier nexus_limits/ to compare")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ms", type=float, default=40.0, help="milliseconds per piece per round (about)")
    args = parser.parse_args()

    import nexus_limits

    packages: List[Tuple[str, Any]] = []
    if args.baseline:
        packages.append(("old", load_baseline(args.baseline)))
    packages.append(("new", nexus_limits))
    runs = {label: pieces(pkg) for label, pkg in packages}
    if args.baseline:
        old, new = answers(packages[0][1]), answers(nexus_limits)
        if old != new:
            for i, (a, b) in enumerate(zip(old, new)):
                if a != b:
                    print(f"answer {i} differs:\n  old {a!r}\n  new {b!r}")
            sys.exit("old and new answer differently")
    names = list(runs["new"])
    # Calls per round: about --ms milliseconds of the new code's time.
    counts = {}
    for name in names:
        per_call = min(runs["new"][name](50) for _ in range(3))
        counts[name] = max(50, int(args.ms / 1000 / max(per_call, 1e-9)))
    samples: Dict[Tuple[str, str], List[float]] = {(label, name): [] for label, _ in packages for name in names}
    gc.collect()
    for _ in range(args.rounds):
        for name in names:
            for label, _ in packages:
                samples[(label, name)].append(runs[label][name](counts[name]))
    print(f"µs per call, median of {args.rounds} interleaved rounds (python {sys.version.split()[0]})")
    header = f"{'piece':<24} {'calls/round':>11}"
    header += f" {'old':>9} {'new':>9} {'new/old':>8}" if args.baseline else f" {'new':>9}"
    print(header)
    for name in names:
        new = statistics.median(samples[("new", name)]) * 1e6
        line = f"{name:<24} {counts[name]:>11}"
        if args.baseline:
            old = statistics.median(samples[("old", name)]) * 1e6
            line += f" {old:>9.2f} {new:>9.2f} {new / old:>8.2f}"
        else:
            line += f" {new:>9.2f}"
        print(line)


if __name__ == "__main__":
    main()
