"""UsageReader: the usage of real provider responses, JSON and streams, compressed by
the real compressors (gzip, deflate zlib-wrapped and raw, brotli, zstd, stacked),
split anywhere; cut streams; the usage-only chunk stripped; end to end through real
uvicorn, httpx and the official SDKs."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import anthropic
import brotli
import httpx
import openai
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from support.servers import ASGIServer

import nexus_limits.tokens as nt
from nexus_limits.tokens._response import UsageReader

# --- bodies, as the providers send them -------------------------------------------------

CHAT_USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 20,
    "total_tokens": 120,
    "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 0},
}
CHAT_JSON = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1750000000,
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Héllo wörld 👍"}, "finish_reason": "stop"}],
    "usage": CHAT_USAGE,
    "system_fingerprint": "fp_1",
}
COMPLETIONS_JSON = {
    "id": "cmpl-1",
    "object": "text_completion",
    "choices": [{"text": "Hi", "index": 0, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}
EMBEDDINGS_JSON = {
    "object": "list",
    "data": [{"object": "embedding", "index": i, "embedding": [0.0023064255, -0.009327292] * 64} for i in range(3)],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 9, "total_tokens": 9},
}
RESPONSES_USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"cached_tokens": 10},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 3},
    "total_tokens": 57,
}
# The Responses API puts usage before other members: it may be anywhere.
RESPONSES_JSON = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "output": [{"type": "message", "content": [{"type": "output_text", "text": "日本", "annotations": []}]}],
    "usage": RESPONSES_USAGE,
    "user": None,
    "metadata": {"usage": "not this one"},
}
ANTHROPIC_JSON = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "Bonjour"}],
    "usage": {
        "input_tokens": 30,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 100,
        "cache_creation": {"ephemeral_5m_input_tokens": 5, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 9,
        "service_tier": "standard",
    },
}
JSON_CASES = [
    ("openai", CHAT_JSON, nt.Usage(100, 20, 64, 8)),
    ("openai", COMPLETIONS_JSON, nt.Usage(5, 7)),
    ("openai", EMBEDDINGS_JSON, nt.Usage(9, 0)),
    ("openai", RESPONSES_JSON, nt.Usage(50, 7, 10, 3)),
    ("openai-responses", RESPONSES_JSON, nt.Usage(50, 7, 10, 3)),
    ("anthropic", ANTHROPIC_JSON, nt.Usage(135, 9, 100, cache_write_tokens=5)),
    (None, CHAT_JSON, nt.Usage(100, 20, 64, 8)),
    (None, ANTHROPIC_JSON, nt.Usage(135, 9, 100, cache_write_tokens=5)),
]


def sse(events: Sequence[Any], named: bool = False, eol: str = "\n") -> bytes:
    out = []
    for event in events:
        head = f"event: {event['type']}{eol}" if named and isinstance(event, dict) else ""
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        out.append(f"{head}data: {data}{eol}{eol}")
    return "".join(out).encode()


def chat_chunk(content: Optional[str] = None, usage: Any = None, choices: Optional[list] = None) -> Dict[str, Any]:
    if choices is None:
        choices = [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1750000000,
        "model": "gpt-4o",
        "system_fingerprint": "fp_1",
        "choices": choices,
        "usage": usage,
    }


CHAT_EVENTS = [chat_chunk("Hello"), chat_chunk(" world"), chat_chunk(choices=[], usage=CHAT_USAGE), "[DONE]"]
CHAT_STREAM = sse(CHAT_EVENTS)
USAGE_EVENT = sse([CHAT_EVENTS[2]])
CHAT_STREAM_STRIPPED = sse([CHAT_EVENTS[0], CHAT_EVENTS[1], "[DONE]"])
RESPONSES_EVENTS = [
    {"type": "response.created", "sequence_number": 0, "response": {"object": "response", "usage": None}},
    {"type": "response.output_text.delta", "sequence_number": 1, "delta": "日本"},
    {"type": "response.output_text.done", "sequence_number": 2, "text": "日本"},
    {"type": "response.completed", "sequence_number": 3, "response": {"object": "response", "usage": RESPONSES_USAGE}},
]
ANTHROPIC_START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "content": [],
        "usage": {
            "input_tokens": 30,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 100,
            "output_tokens": 1,
        },
    },
}
ANTHROPIC_EVENTS = [
    ANTHROPIC_START,
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bonjour 🇫🇷"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
    {"type": "message_stop"},
]
STREAM_CASES = [
    ("openai", CHAT_STREAM, nt.Usage(100, 20, 64, 8)),
    ("openai", sse(RESPONSES_EVENTS, named=True), nt.Usage(50, 7, 10, 3)),
    ("openai-responses", sse(RESPONSES_EVENTS, named=True, eol="\r\n"), nt.Usage(50, 7, 10, 3)),
    # message_delta counts are cumulative: the latest (9) wins, nothing is summed.
    ("anthropic", sse(ANTHROPIC_EVENTS, named=True), nt.Usage(135, 9, 100, cache_write_tokens=5)),
    ("anthropic", sse(ANTHROPIC_EVENTS, named=True, eol="\r"), nt.Usage(135, 9, 100, cache_write_tokens=5)),
    (None, sse(ANTHROPIC_EVENTS, named=True, eol="\r\n"), nt.Usage(135, 9, 100, cache_write_tokens=5)),
]


# --- compressors, used the way servers use them ---------------------------------------


def _zlib_stream(wbits: int) -> Callable[[List[bytes]], List[bytes]]:
    def compress(parts: List[bytes]) -> List[bytes]:
        c = zlib.compressobj(6, zlib.DEFLATED, wbits)
        out = [c.compress(p) + c.flush(zlib.Z_SYNC_FLUSH) for p in parts]  # flushed per event
        return [*out, c.flush()]

    return compress


def _br_stream(parts: List[bytes]) -> List[bytes]:
    c = brotli.Compressor()
    return [*(c.process(p) + c.flush() for p in parts), c.finish()]


def _zstd_stream(parts: List[bytes]) -> List[bytes]:
    c = zstandard.ZstdCompressor().compressobj()
    return [*(c.compress(p) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for p in parts), c.flush()]


def _whole(fn: Callable[[bytes], bytes]) -> Callable[[List[bytes]], List[bytes]]:
    return lambda parts: [fn(b"".join(parts))]


COMPRESSORS: Dict[str, Callable[[List[bytes]], List[bytes]]] = {
    "identity": lambda parts: parts,
    "gzip": _zlib_stream(31),
    "x-gzip": _whole(gzip.compress),
    "deflate": _zlib_stream(15),  # zlib-wrapped, as RFC 9110 says
    "deflate-raw": _zlib_stream(-15),  # raw, as many servers send it
    "br": _br_stream,
    "zstd": _zstd_stream,
    "gzip, br": lambda parts: [brotli.compress(gzip.compress(b"".join(parts)))],
    "zstd, deflate": lambda parts: [zlib.compress(zstandard.ZstdCompressor().compress(b"".join(parts)))],
}


def header_of(name: str) -> Optional[str]:
    return {"identity": None, "deflate-raw": "deflate"}.get(name, name)


def read(
    provider: Optional[str],
    parts: Sequence[bytes],
    content_type: Optional[str],
    encoding: Optional[str] = None,
    complete: bool = True,
    **options: Any,
) -> Tuple[Any, bytes]:
    """(usage or the UsageError, the bytes forwarded) for a body arriving in `parts`."""
    reader = UsageReader(provider, "gpt-4o", 42, content_type=content_type, content_encoding=encoding, **options)
    out = b"".join(reader.feed(p) for p in parts) + reader.flush()
    try:
        return reader.finish(complete), out
    except nt.UsageError as error:
        return error, out


def cut_into(data: bytes, size: int) -> List[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


# --- JSON bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(COMPRESSORS))
@pytest.mark.parametrize(("provider", "body", "expected"), JSON_CASES)
def test_json_bodies_in_every_coding(encoding, provider, body, expected):
    raw = json.dumps(body, ensure_ascii=False).encode()
    encoded = b"".join(COMPRESSORS[encoding](cut_into(raw, 50)))
    for size in (1, 7, len(encoded)):
        parts = cut_into(encoded, size)
        usage, forwarded = read(provider, parts, "application/json", header_of(encoding))
        assert usage == expected
        assert forwarded == encoded  # the bytes pass unchanged


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_json_split_anywhere_with_any_whitespace(data):
    provider, body, expected = data.draw(st.sampled_from(JSON_CASES))
    indent = data.draw(st.sampled_from([None, 0, 2, "\t"]))
    raw = json.dumps(body, indent=indent, ensure_ascii=data.draw(st.booleans())).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    ctype = data.draw(st.sampled_from(["application/json", "application/json; charset=utf-8", None, "text/plain"]))
    usage, forwarded = read(provider, parts, ctype)
    assert usage == expected and forwarded == raw


def test_json_usage_anywhere_but_only_at_the_top():
    body = {"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "choices": [{"usage": {"prompt_tokens": 1}}]}
    assert read("openai", [json.dumps(body).encode()], "application/json")[0] == nt.Usage(3, 4)
    nested_only = {"choices": [], "data": {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}}
    usage, _ = read("openai", [json.dumps(nested_only).encode()], "application/json")
    assert isinstance(usage, nt.UsageError) and "no 'usage'" in str(usage)
    # Duplicate keys: the last one wins, as with json.loads.
    twice = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "usage": {"prompt_tokens": 2, "completion_tokens": 3}}'
    assert read("openai", [twice], "application/json")[0] == nt.Usage(2, 3)
    # An escaped key is still the key.
    escaped = b'{"choices": [], "us\\u0061ge": {"prompt_tokens": 2, "completion_tokens": 3}}'
    assert read("openai", [escaped], "application/json")[0] == nt.Usage(2, 3)
    # A byte-order mark, which json.loads accepts.
    assert read("openai", [b"\xef\xbb\xbf" + json.dumps(CHAT_JSON).encode()], None)[0] == nt.Usage(100, 20, 64, 8)


def test_escapes_split_at_every_byte():
    # Backslash runs and escaped quotes, in keys and values, cut everywhere.
    doc = {
        "choices": [{"t": 'a\\"b\\\\', "u\\": ["\\", '"', '\\\\"']}],
        'k"\\': '\\\\"usage": {"prompt_tokens": 999}',
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "z": "\\",
    }
    raw = json.dumps(doc).encode()
    assert b'\\\\\\"' in raw  # an escaped backslash then an escaped quote
    for cut in range(len(raw) + 1):
        assert read("openai", [raw[:cut], raw[cut:]], "application/json")[0] == nt.Usage(3, 4), cut
    assert read("openai", cut_into(raw, 1), "application/json")[0] == nt.Usage(3, 4)


def test_big_json_bodies_read_in_bounded_memory():
    # 10 MB of embeddings: usage is at the end; nothing of the body is kept.
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536} for i in range(500)],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 5000, "total_tokens": 5000},
    }
    raw = json.dumps(body).encode()
    assert len(raw) > 10_000_000
    encoded = gzip.compress(raw, 1)
    usage, forwarded = read("openai", cut_into(encoded, 65536), "application/json", "gzip")
    assert usage == nt.Usage(5000, 0) and forwarded == encoded


def test_json_cut_before_its_usage_is_no_usage():
    raw = json.dumps(CHAT_JSON).encode()
    cut = raw[: raw.index(b'"usage"')]
    for complete in (True, False):
        usage, _ = read("openai", [cut], "application/json", complete=complete)
        assert isinstance(usage, nt.UsageError)
    # Cut after the usage: the client went away, but the usage was delivered.
    after = raw[: raw.index(b'"system_fingerprint"')]
    assert read("openai", [after], "application/json", complete=False)[0] == nt.Usage(100, 20, 64, 8)
    usage, _ = read("openai", [after], "application/json", complete=True)
    assert isinstance(usage, nt.UsageError) and "ended before" in str(usage)


def test_a_generation_must_report_its_output():
    no_output = {"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 5}}
    usage, _ = read("openai", [json.dumps(no_output).encode()], "application/json")
    assert isinstance(usage, nt.UsageError) and "completion_tokens is missing" in str(usage)
    total_only = {"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 5, "total_tokens": 8}}
    assert read("openai", [json.dumps(total_only).encode()], "application/json")[0] == nt.Usage(5, 3)


# --- streams -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(COMPRESSORS))
@pytest.mark.parametrize(("provider", "stream", "expected"), STREAM_CASES)
def test_streams_in_every_coding(encoding, provider, stream, expected):
    events = stream.split(b"data: ")
    parts = [events[0]] + [b"data: " + e for e in events[1:]]
    encoded_parts = COMPRESSORS[encoding](parts)
    encoded = b"".join(encoded_parts)
    for chunks in (encoded_parts, cut_into(encoded, 1), cut_into(encoded, 13)):
        usage, forwarded = read(provider, chunks, "text/event-stream; charset=utf-8", header_of(encoding))
        assert usage == expected and forwarded == encoded


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_streams_split_anywhere(data):
    provider, stream, expected = data.draw(st.sampled_from(STREAM_CASES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=15)))
    parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    usage, forwarded = read(provider, parts, "text/event-stream")
    assert usage == expected and forwarded == stream


def test_anthropic_message_delta_may_carry_input_counts():
    events = [
        ANTHROPIC_START,
        {
            "type": "message_delta",
            "usage": {
                "input_tokens": 31,
                "cache_read_input_tokens": None,
                "output_tokens": 12,
                "output_tokens_details": {"thinking_tokens": 4},
                "server_tool_use": {"web_search_requests": 1},
            },
        },
        {"type": "message_stop"},
    ]
    # Counts the delta gives replace message_start's; those it leaves null keep theirs.
    assert read("anthropic", [sse(events)], "text/event-stream")[0] == nt.Usage(136, 12, 100, 4, cache_write_tokens=5)


def test_big_events_are_scanned_not_buffered():
    # A response.completed event of 3 MB (the whole output echoed): its usage is read.
    big = {
        "type": "response.completed",
        "response": {
            "object": "response",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "x" * 3_000_000}]}],
            "usage": RESPONSES_USAGE,
            "tools": [{"type": "function", "parameters": {"a": [[{"b": [1]}]]}}],
        },
    }
    stream = sse([RESPONSES_EVENTS[0], big])
    for size in (4096, 65536, len(stream)):
        assert read("openai", cut_into(stream, size), "text/event-stream")[0] == nt.Usage(50, 7, 10, 3)


# --- cut streams ---------------------------------------------------------------------------


def test_cut_openai_stream_charges_input_estimate_and_the_text_delivered():
    before_usage = sse(CHAT_EVENTS[:2])
    usage, _ = read("openai", [before_usage], "text/event-stream", complete=False)
    # "Hello world" is 2 tokens for gpt-4o; the input is the request's estimate (42).
    assert usage == nt.Usage(42, 2, exact=False)
    # A stream that ended without its usage chunk is a cut stream too.
    assert read("openai", [before_usage + sse(["[DONE]"])], "text/event-stream")[0] == nt.Usage(42, 2, exact=False)
    # Once the usage came, it is the usage, cut or not.
    with_usage = sse(CHAT_EVENTS[:3])
    assert read("openai", [with_usage], "text/event-stream", complete=False)[0] == nt.Usage(100, 20, 64, 8)
    # Cut mid-event: half an event is no text a client could read.
    half = CHAT_STREAM[: CHAT_STREAM.index(b"world") + 5]
    assert read("openai", [half], "text/event-stream", complete=False)[0] == nt.Usage(42, 1, exact=False)


def test_cut_anthropic_stream_keeps_message_start_input():
    text = "word " * 400  # about 2,000 characters: ~572 tokens at 3.5 characters per token
    events = [ANTHROPIC_START, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}}]
    usage, _ = read("anthropic", [sse(events)], "text/event-stream", complete=False)
    assert usage.input_tokens == 135 and usage.cached_input_tokens == 100 and not usage.exact
    assert usage.cache_write_tokens == 5, "cache writes priced as writes on a cut stream too"
    assert 500 < usage.output_tokens < 700  # the text delivered, not message_start's 1
    # Cut after a message_delta: its cumulative count stands.
    full = sse(ANTHROPIC_EVENTS)
    cut = full[: full.index(b"message_stop")]
    assert read("anthropic", [cut], "text/event-stream", complete=False)[0] == nt.Usage(
        135, 9, 100, cache_write_tokens=5
    )


def test_cut_responses_stream_counts_only_deltas():
    # The .done events repeat the text: counting them would charge it twice.
    usage, _ = read("openai", [sse(RESPONSES_EVENTS[:3])], "text/event-stream", complete=False)
    assert usage == nt.Usage(42, nt.count_tokens("日本", "gpt-4o"), exact=False)


def test_estimate_of_a_long_cut_stream_extrapolates():
    events = [chat_chunk(" hello") for _ in range(4000)]  # ~1 MB: more than is kept
    usage, _ = read("openai", cut_into(sse(events), 8192), "text/event-stream", complete=False)
    assert usage.input_tokens == 42 and not usage.exact
    assert 3600 <= usage.output_tokens <= 4400


def test_tool_call_arguments_count_as_output():
    call = {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}}
    usage, _ = read("openai", [sse([chat_chunk(choices=[call])])], "text/event-stream", complete=False)
    assert usage.output_tokens == nt.count_tokens('{"city": "Paris"}', "gpt-4o")


# --- stripping the usage chunk ---------------------------------------------------------------


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_strip_usage_chunk_at_every_split(eol):
    stream = sse(CHAT_EVENTS, eol=eol)
    expected = sse([CHAT_EVENTS[0], CHAT_EVENTS[1], "[DONE]"], eol=eol)
    for cut in range(len(stream) + 1):
        for parts in (
            [stream[:cut], stream[cut:]],
            [stream[:cut], b"", stream[cut : cut + 3], b"", stream[cut + 3 :]],  # empty chunks change nothing
        ):
            usage, forwarded = read("openai", parts, "text/event-stream", strip_usage_chunk=True)
            assert forwarded == expected, (cut, parts)
            assert usage == nt.Usage(100, 20, 64, 8)


def test_strip_byte_by_byte_and_nothing_else():
    stream = sse(CHAT_EVENTS) + b": keep-alive\n\n"
    expected = CHAT_STREAM_STRIPPED + b": keep-alive\n\n"
    usage, forwarded = read("openai", cut_into(stream, 1), "text/event-stream", strip_usage_chunk=True)
    assert forwarded == expected and usage == nt.Usage(100, 20, 64, 8)
    # Without strip_usage_chunk (the client asked for the usage) it stays.
    assert read("openai", [stream], "text/event-stream")[1] == stream
    # Azure's first chunk has no choices and no usage: it stays.
    azure = sse([chat_chunk(choices=[]) | {"prompt_filter_results": []}, *CHAT_EVENTS])
    forwarded = read("openai", [azure], "text/event-stream", strip_usage_chunk=True)[1]
    assert forwarded == sse([chat_chunk(choices=[]) | {"prompt_filter_results": []}]) + CHAT_STREAM_STRIPPED
    # Only streams are stripped.
    body = json.dumps(CHAT_JSON).encode()
    assert read("openai", [body], "application/json", strip_usage_chunk=True)[1] == body


def test_strip_holds_each_event_until_its_blank_line_and_flushes_the_last():
    reader = UsageReader(
        "openai", "gpt-4o", 1, content_type="text/event-stream", content_encoding=None, strip_usage_chunk=True
    )
    first = sse([CHAT_EVENTS[0]])
    assert reader.feed(first[:-1]) == b""  # not yet known not to be the usage chunk
    assert reader.feed(first[-1:]) == first
    assert reader.feed(b"data: [DONE]") == b""
    assert reader.flush() == b"data: [DONE]"  # a stream that ended without its blank line
    assert reader.flush() == b""
    # The usage chunk as the unterminated last event: dropped, and read.
    reader = UsageReader(
        "openai", "gpt-4o", 1, content_type="text/event-stream", content_encoding=None, strip_usage_chunk=True
    )
    assert reader.feed(USAGE_EVENT[:-2]) == b""
    assert reader.flush() == b""
    assert reader.finish() == nt.Usage(100, 20, 64, 8)


def test_strip_lets_big_events_pass_at_once():
    big = sse([chat_chunk("x" * 200_000)])
    reader = UsageReader(
        "openai", "gpt-4o", 1, content_type="text/event-stream", content_encoding=None, strip_usage_chunk=True
    )
    out = b"".join(reader.feed(p) for p in cut_into(big, 10_000))
    assert len(out) >= len(big) - 10_000 - 65536  # held back at most one event of 64 KiB
    assert out + reader.flush() == big


@pytest.mark.parametrize("encoding", ["gzip", "deflate-raw", "br", "zstd", "gzip, br"])
def test_strip_from_a_compressed_stream_forwards_it_decoded(encoding):
    encoded_parts = COMPRESSORS[encoding]([sse([e]) for e in CHAT_EVENTS])
    reader = UsageReader(
        "openai",
        "gpt-4o",
        1,
        content_type="text/event-stream",
        content_encoding=header_of(encoding),
        strip_usage_chunk=True,
    )
    assert reader.forward_decoded
    headers = [
        (b"content-type", b"text/event-stream"),
        (b"Content-Encoding", b"gzip"),
        (b"content-length", b"99"),
        (b"x-a", b"1"),
    ]
    assert reader.forwarded_headers(headers) == [(b"content-type", b"text/event-stream"), (b"x-a", b"1")]
    out = b"".join(reader.feed(p) for p in cut_into(b"".join(encoded_parts), 5)) + reader.flush()
    assert out == CHAT_STREAM_STRIPPED and reader.finish() == nt.Usage(100, 20, 64, 8)


def test_forwarded_headers_when_nothing_changes():
    plain = UsageReader("openai", None, 0, content_type="text/event-stream", content_encoding="gzip")
    headers = [("Content-Length", "10"), ("Content-Encoding", "gzip")]
    assert plain.forwarded_headers(headers) == headers and not plain.forward_decoded
    strip = UsageReader(
        "openai", None, 0, content_type="text/event-stream", content_encoding=None, strip_usage_chunk=True
    )
    assert strip.forwarded_headers(headers) == [("Content-Encoding", "gzip")]


# --- the older entry points read through the same validation -----------------------------------


def test_extract_usage_and_usage_stream_share_the_validation():
    assert nt.extract_usage(EMBEDDINGS_JSON) == nt.Usage(9, 0)
    with pytest.raises(nt.UsageError, match="completion_tokens is missing"):
        nt.extract_usage({"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 5}})
    with pytest.raises(nt.UsageError, match="not valid JSON"):
        nt.extract_usage(b"[" * 100_000)
    stream = nt.UsageStream("anthropic")
    stream.feed(sse(ANTHROPIC_EVENTS, named=True))
    assert stream.finish() == nt.Usage(135, 9, 100, cache_write_tokens=5) and stream.done


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="provider must be one of"):
        UsageReader("gemini", None, 0, content_type=None, content_encoding=None)
    with pytest.raises(ValueError, match="input_estimate"):
        UsageReader("openai", None, -1, content_type=None, content_encoding=None)
    with pytest.raises(ValueError, match="max_decoded_bytes"):
        UsageReader("openai", None, 0, content_type=None, content_encoding=None, max_decoded_bytes=10)
    reader = UsageReader("openai", {"not": "a model"}, 0, content_type=b"text/event-stream", content_encoding=b"GZIP")
    assert reader.model is None
    with pytest.raises(TypeError, match="chunk must be bytes"):
        reader.feed("text")  # type: ignore[arg-type]
    # Errors are final: finish() answers the same each time.
    empty = UsageReader("openai", None, 0, content_type="application/json", content_encoding=None)
    with pytest.raises(nt.UsageError, match="no body"):
        empty.finish()
    with pytest.raises(nt.UsageError, match="no body"):
        empty.finish()


# --- end to end: real uvicorn, httpx, the official SDKs ----------------------------------------


def _upstream_app(seen: List[Dict[str, Any]]):
    """A provider that compresses the way servers do: gzip per Accept-Encoding (zstd,
    br or deflate when asked by x-encoding), streams flushed per event."""

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body or b"{}")
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        seen.append({"body": request, "headers": headers})
        accepted = [e.split(";")[0].strip() for e in headers.get("accept-encoding", "").split(",")]
        encoding = headers.get("x-encoding", "gzip")
        if encoding not in accepted:
            encoding = "identity"
        if scope["path"] == "/v1/messages":
            events = sse(ANTHROPIC_EVENTS, named=True) if request.get("stream") else None
            parts = (
                [e + b"\n\n" for e in events.split(b"\n\n")[:-1]] if events else [json.dumps(ANTHROPIC_JSON).encode()]
            )
        elif request.get("stream"):
            chosen = (
                CHAT_EVENTS
                if (request.get("stream_options") or {}).get("include_usage")
                else [
                    CHAT_EVENTS[0],
                    CHAT_EVENTS[1],
                    "[DONE]",
                ]
            )
            parts = [sse([e]) for e in chosen]
        else:
            parts = [json.dumps(CHAT_JSON).encode()]
        ctype = b"text/event-stream; charset=utf-8" if request.get("stream") else b"application/json"
        out_headers = [(b"content-type", ctype)]
        if encoding != "identity":
            out_headers.append((b"content-encoding", encoding.encode()))
            parts = COMPRESSORS[encoding](parts)
        await send({"type": "http.response.start", "status": 200, "headers": out_headers})
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def _proxy_app(upstream: str, results: List[Any], identity: bool):
    """What the LLM middleware does with UsageReader: inject include_usage when the
    client did not ask, strip the chunk it did not ask for, read the usage."""

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        strip = False
        if request.get("stream") and "messages" in request and scope["path"] == "/v1/chat/completions":
            if not (request.get("stream_options") or {}).get("include_usage"):
                request["stream_options"] = {"include_usage": True}
                strip = True
        headers = {"content-type": "application/json"}
        if strip and identity:
            headers["accept-encoding"] = "identity"
        provider = "anthropic" if scope["path"] == "/v1/messages" else "openai"
        async with httpx.AsyncClient(base_url=upstream, timeout=10) as client:
            upstream_request = client.build_request("POST", scope["path"], json=request, headers=headers)
            response = await client.send(upstream_request, stream=True)
            await _relay(response, reader_of(provider, request, response, strip), send, results)

    def reader_of(provider, request, response, strip):
        return UsageReader(
            provider,
            request.get("model"),
            7,
            content_type=response.headers.get("content-type"),
            content_encoding=response.headers.get("content-encoding"),
            strip_usage_chunk=strip,
        )

    async def _relay(response, reader, send, results):
        forwarded = [(k, v) for k, v in response.headers.raw if k.lower() not in (b"transfer-encoding", b"connection")]
        await send({"type": "http.response.start", "status": 200, "headers": reader.forwarded_headers(forwarded)})
        async for chunk in response.aiter_raw():
            out = reader.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        await send({"type": "http.response.body", "body": reader.flush()})
        await response.aclose()
        results.append((reader.finish(True), reader.strip_usage_chunk, reader.forward_decoded))

    return app


def settled(results: List[Any], count: int) -> Any:
    """The proxy's count-th result: it finishes its reader after the client has read all."""
    deadline = time.monotonic() + 10
    while len(results) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return results[count - 1]


@pytest.fixture(scope="module")
def upstream():
    seen: List[Dict[str, Any]] = []
    with ASGIServer(_upstream_app(seen)) as server:
        server.seen = seen  # type: ignore[attr-defined]
        yield server


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_real_compressed_responses_read_from_raw_bytes(upstream, encoding):
    with httpx.Client(base_url=upstream.url, timeout=10) as client:
        for request, expected in (
            ({"model": "gpt-4o", "messages": []}, nt.Usage(100, 20, 64, 8)),
            (
                {"model": "gpt-4o", "messages": [], "stream": True, "stream_options": {"include_usage": True}},
                nt.Usage(100, 20, 64, 8),
            ),
        ):
            headers = {"accept-encoding": "gzip, deflate, br, zstd", "x-encoding": encoding}
            with client.stream("POST", "/v1/chat/completions", json=request, headers=headers) as response:
                assert response.headers["content-encoding"] == encoding
                reader = UsageReader(
                    "openai",
                    "gpt-4o",
                    0,
                    content_type=response.headers["content-type"],
                    content_encoding=response.headers["content-encoding"],
                )
                raw = [reader.feed(chunk) for chunk in response.iter_raw()]
            assert reader.finish() == expected
            # What was forwarded is what httpx decodes as the provider's body.
            decoded = httpx.Response(200, headers={"content-encoding": encoding}, content=b"".join(raw)).content
            assert decoded in (json.dumps(CHAT_JSON).encode(), CHAT_STREAM)


@pytest.mark.parametrize("identity", [True, False], ids=["identity-upstream", "compressed-upstream"])
def test_openai_sdk_through_a_stripping_proxy(upstream, identity):
    results: List[Any] = []
    with ASGIServer(_proxy_app(upstream.url, results, identity)) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0)
        chunks = list(
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
        )
        # The client did not ask for usage: it sees no usage chunk, every chunk has a choice.
        assert [c.choices[0].delta.content for c in chunks] == ["Hello", " world"]
        assert upstream.seen[-1]["body"]["stream_options"] == {"include_usage": True}
        assert settled(results, 1) == (nt.Usage(100, 20, 64, 8), True, not identity)
        # A client that asks for usage gets it, untouched.
        asked = list(
            client.chat.completions.create(
                model="gpt-4o", messages=[], stream=True, stream_options={"include_usage": True}
            )
        )
        assert asked[-1].choices == [] and asked[-1].usage.prompt_tokens == 100
        assert settled(results, 2) == (nt.Usage(100, 20, 64, 8), False, False)
        client.close()


def test_anthropic_sdk_decodes_the_compressed_bytes_forwarded(upstream):
    results: List[Any] = []
    with ASGIServer(_proxy_app(upstream.url, results, identity=False)) as proxy:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0)
        with client.messages.stream(
            model="claude-test-1", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as s:
            message = s.get_final_message()
        assert message.content[0].text == "Bonjour 🇫🇷"
        assert "gzip" in upstream.seen[-1]["headers"]["accept-encoding"]  # so the upstream compressed
        usage, strip, decoded = settled(results, 1)
        assert usage == nt.Usage(135, 9, 100, cache_write_tokens=5) and not strip and not decoded
        assert message.usage.output_tokens == usage.output_tokens == 9
        client.close()
