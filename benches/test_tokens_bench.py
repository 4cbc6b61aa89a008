"""Token counting next to plain tiktoken on the same text, and the cost of a budget's
reserve + settle, in-process and on Redis.

Run: python -m pytest benches/test_tokens_bench.py --benchmark-only -s
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import redis
from support.servers import RedisServer

import nexus_limits as nl
import nexus_limits.redis as nlr
import nexus_limits.tokens as nt
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


# --- reading usage from response bytes (UsageReader) ----------------------------------

_CHUNK = (
    b'data: {"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1750000000,'
    b'"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":[{"index":0,'
    b'"delta":{"content":" the"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
)


def _reader(**options):
    from nexus_limits.tokens._response import UsageReader

    ctype = options.pop("content_type", "text/event-stream")
    return UsageReader(
        "openai", "gpt-4o", 10, content_type=ctype, content_encoding=options.pop("encoding", None), **options
    )


def test_json_loads_of_one_sse_chunk(benchmark):
    """The floor a reader that parses every event would pay."""
    import json

    benchmark(json.loads, _CHUNK[6:])


@pytest.mark.parametrize("strip", [False, True], ids=["pass-through", "strip"])
def test_usage_reader_feed_sse_chunk(benchmark, strip):
    """One OpenAI stream chunk (a text delta, ~250 bytes), uncompressed."""
    reader = _reader(strip_usage_chunk=strip)
    benchmark(reader.feed, _CHUNK)


def test_usage_stream_feed_sse_chunk(benchmark):
    """The older UsageStream, which parses every event."""
    stream = nt.UsageStream("openai", "gpt-4o")
    benchmark(stream.feed, _CHUNK)


def test_usage_reader_feed_gzip_sse_chunk(benchmark):
    """The same chunk gzip-compressed and flushed, as a server streams it (the time
    includes compressing it, about as much as decoding)."""
    import zlib

    reader = _reader(encoding="gzip")
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    reader.feed(compressor.compress(_CHUNK) + compressor.flush(zlib.Z_SYNC_FLUSH))
    # Later chunks repeat the first: with a shared window they compress to a few bytes.
    piece = compressor.compress(_CHUNK) + compressor.flush(zlib.Z_SYNC_FLUSH)
    benchmark.extra_info["encoded_bytes"] = len(piece)

    def feed():
        reader.feed(compressor.compress(_CHUNK) + compressor.flush(zlib.Z_SYNC_FLUSH))

    benchmark(feed)


@pytest.mark.parametrize("kind", ["chat", "embeddings"])
def test_usage_reader_json_body(benchmark, kind):
    """A whole JSON body read for its usage, next to json.loads of the same bytes."""
    import json

    if kind == "chat":
        doc = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1600, "total_tokens": 1610},
        }
    else:
        doc = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536} for i in range(16)],
            "usage": {"prompt_tokens": 80, "total_tokens": 80},
        }
    body = json.dumps(doc).encode()
    parts = [body[i : i + 16384] for i in range(0, len(body), 16384)]
    benchmark.extra_info["bytes"] = len(body)
    benchmark.extra_info["json_loads_us"] = round(
        min(timeit.repeat(lambda: json.loads(body), number=20, repeat=3)) / 20 * 1e6, 1
    )

    def once():
        reader = _reader(content_type="application/json")
        for part in parts:
            reader.feed(part)
        return reader.finish()

    assert benchmark(once).input_tokens in (10, 80)
