"""Token counting next to plain tiktoken on the same text, and the cost of a budget's
reserve + settle, in-process and on Redis.

Run: python -m pytest benches/test_tokens_bench.py --benchmark-only -s
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import redis
from servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
from nexus_limits.tokens import count_request_tokens, count_tokens, get_encoding

TEXT = (
    "The quick brown fox jumps over the lazy dog. 日本語のテキスト、emoji 👍🏽, code `x = f(y) + 42`,\n"
    "and a <|endoftext|> marker inside ordinary text. "
) * 40  # about 1,600 tokens
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": TEXT}]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_plain_tiktoken(benchmark, model):
    enc = get_encoding("o200k_base" if model == "gpt-4o" else "cl100k_base")
    n = benchmark(lambda: len(enc.encode_ordinary(TEXT)))
    benchmark.extra_info["tokens"] = n


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_count_tokens(benchmark, model):
    n = benchmark(count_tokens, TEXT, model)
    benchmark.extra_info["tokens"] = n


def test_count_request_tokens(benchmark):
    body = {"model": "gpt-4o", "messages": MESSAGES}
    benchmark(count_request_tokens, body)


def test_reserve_settle_in_process(benchmark):
    tl = nl.TokenLimiter(requests="1000000000/minute", tokens="1000000000000/minute", concurrency=1000)

    def once():
        tl.reserve("api-key", 1200).settle(900)

    benchmark(once)


@pytest.fixture(scope="module")
def client():
    server = RedisServer().start()
    c = redis.Redis(port=server.port)
    yield c
    c.close()
    server.close()


def test_reserve_settle_redis(benchmark, client):
    tl = nlr.TokenLimiter(client, requests="1000000000/minute", tokens="1000000000000/minute", concurrency=1000)

    def once():
        tl.reserve("api-key", 1200).settle(900)

    benchmark(once)


def test_incr_pair_redis(benchmark, client):
    """Two bare round trips, the floor of any reserve-then-settle on Redis."""
    benchmark(lambda: (client.incr("a"), client.incr("b")))
