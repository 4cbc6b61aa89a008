"""Token counting (offline tiktoken), Anthropic estimates, usage from responses and streams."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_limits import tokens as nt
from nexus_limits.tokens import _encodings

COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_known_token_ids():
    # Published examples (tiktoken's README and OpenAI's cookbook).
    cl100k = nt.get_encoding("cl100k_base")
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert nt.get_encoding("o200k_harmony").n_vocab == 201088
    assert nt.get_encoding("o200k_base") is nt.get_encoding("o200k_base"), "built once"
    for name in ("r50k_base", "p50k_base"):
        enc = nt.get_encoding(name)
        assert enc.decode(enc.encode("hello world")) == "hello world"
        assert enc.n_vocab == 50257 if name == "r50k_base" else enc.n_vocab == 50281


def test_cookbook_message_counts():
    """The cookbook's example conversation: 129 tokens on gpt-3.5/gpt-4, 124 on gpt-4o."""
    for model, expected in (("gpt-4", 129), ("gpt-3.5-turbo-0125", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)):
        count = nt.count_request_tokens({"model": model, "messages": COOKBOOK_MESSAGES})
        assert count == nt.TokenCount(expected, True, "openai", model)


TRICKY = [
    "",
    "   \t\t\n\n   leading and trailing   ",
    "日本語のテキストと中文文本",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷",
    "text with <|endoftext|> and <|fim_prefix|> inside",
    "a" * 10_000,
    "na" * 3000 + " batman",
    "mixed\r\nline\rendings\n",
]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
@pytest.mark.parametrize(
    ("model", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-5-mini", "o200k_base")]
)
def test_counts_equal_tiktoken_on_tricky_text(text, model, encoding):
    enc = nt.get_encoding(encoding)
    assert nt.count_tokens(text, model=model) == len(enc.encode(text, disallowed_special=()))


WORDS = st.lists(
    st.text(alphabet=st.sampled_from("ab1 .,'\n\t\u00e9\u4e2d\U0001f44d!?-_"), min_size=0, max_size=12),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(words=WORDS, piece=st.integers(4, 40), encoding=st.sampled_from(["o200k_base", "cl100k_base", "r50k_base"]))
def test_long_text_is_encoded_in_pieces_without_changing_the_count(words, piece, encoding):
    from nexus_limits.tokens import _count

    text = " ".join(words)
    enc = nt.get_encoding(encoding)
    tokens, exact = _count._encoded_length(enc, text, piece)
    whole = len(enc.encode_ordinary(text))
    if exact:
        assert tokens == whole, "cut only where no token changes"
    else:
        assert abs(tokens - whole) <= len(text) // (piece // 2) + 1, "only where no space allowed a cut"


def test_special_tokens_count_as_text():
    assert nt.count_tokens("<|endoftext|>", "gpt-4") == 7
    assert nt.count_tokens("<|endoftext|>", "gpt-4") != 1


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-16k", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("gpt-oss-120b", "o200k_harmony"),
        ("text-davinci-003", "p50k_base"),
        ("davinci", "r50k_base"),
        ("ft:gpt-4o-mini:org::abc", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("GPT-4O", "o200k_base"),
        ("llama-3-70b", None),
        ("", None),
        (None, None),
    ],
)
def test_model_table(model, encoding):
    assert nt.encoding_for_model(model) == encoding


def test_unknown_models_are_estimates():
    count = nt.count_request_tokens({"model": "my-local-model", "messages": [{"role": "user", "content": "hi"}]})
    assert not count.exact and count.tokens == 8
    assert nt.count_tokens("hello world", model="unknown") == 2


def test_tools_follow_the_cookbook_formula():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "description": "The city."},
                        "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit"},
                    },
                },
            },
        }
    ]
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    base = nt.count_request_tokens({"model": "gpt-4o", "messages": msgs}).tokens
    with_tools = nt.count_request_tokens({"model": "gpt-4o", "messages": msgs, "tools": tools})
    enc = nt.get_encoding("o200k_base")
    n = lambda s: len(enc.encode(s))  # noqa: E731
    expected = (
        7
        + n("get_weather:Get the weather")
        + 3
        + 3
        + n("city:string:The city")
        + 3
        - 3
        + 3
        + n("c")
        + 3
        + n("f")
        + n("unit:string:Unit")
        + 12
    )
    assert with_tools.tokens - base == expected and with_tools.exact
    legacy = nt.count_request_tokens({"model": "gpt-4", "messages": msgs, "functions": [tools[0]["function"]]})
    assert legacy.tokens > nt.count_request_tokens({"model": "gpt-4", "messages": msgs}).tokens


def png(w: int, h: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", w, h) + b"\x08\x02\x00\x00\x00"


def jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x00" * 9
    return b"\xff\xd8" + app0 + sof


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00" * 8


def webp(w: int, h: int) -> bytes:
    return b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x00" * 8 + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")


def data_url(raw: bytes, kind: str) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize("maker", [png, jpeg, gif, webp])
def test_image_sizes_from_data_urls(maker):
    assert nt._images.image_size(data_url(maker(1234, 567), "x")) == (1234, 567)


def test_openai_image_tile_rule():
    rule = nt._images.openai_image_tokens
    assert rule((4096, 8192), "low") == (85, True)
    assert rule((1024, 1024), "high") == (765, True)  # -> 768x768: 4 tiles
    assert rule((2048, 4096), "auto") == (1105, True)  # -> 1024x2048 -> 768x1536: 6 tiles
    assert rule((100, 100), "high") == (255, True)
    assert rule(None, "auto") == (765, False)
    image = {"type": "image_url", "image_url": {"url": data_url(png(1024, 1024), "png"), "detail": "high"}}
    with_image = nt.count_request_tokens(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]}
    )
    text_only = nt.count_request_tokens(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}]}]}
    )
    assert with_image.tokens - text_only.tokens == 765 and with_image.exact
    remote = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    assert not nt.count_request_tokens({"model": "gpt-4o", "messages": [{"role": "user", "content": [remote]}]}).exact


def test_responses_and_embeddings_bodies():
    r = nt.count_request_tokens({"model": "gpt-4.1", "instructions": "Be brief.", "input": "hello world"})
    assert r.tokens == (3 + 1 + 3) + (3 + 1 + 2) + 3 and not r.exact
    items = nt.count_request_tokens(
        {
            "model": "gpt-4.1",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
                {"type": "function_call", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "output": "42"},
            ],
            "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"properties": {}}}],
        }
    )
    assert items.tokens > r.tokens
    emb = nt.count_request_tokens({"model": "text-embedding-3-small", "input": ["hello world", "hi", [1, 2, 3]]})
    assert emb == nt.TokenCount(2 + 1 + 3, True, "openai", "text-embedding-3-small")
    assert nt.count_request_tokens({"model": "davinci-002", "prompt": "hello world"}).tokens == 2


def test_anthropic_estimate_and_calibration():
    est = nt.AnthropicEstimator()
    body = {
        "model": "claude-sonnet-4-5-20250929",
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": "x" * 350},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "y" * 35},
                    {"type": "tool_use", "id": "t", "name": "f", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": "ok"},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": base64.b64encode(png(750, 100)).decode(),
                        },
                    },
                ],
            },
        ],
    }
    base = est.base(body)
    chars = len("You are terse.") + 350 + 35 + len(json.dumps({"id": "t", "name": "f", "input": {}})) + 2
    assert base == -(-chars * 2 // 7) + 4 * 3 + 3 + 100
    assert est.estimate(body) == base
    with_tools = dict(body, tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}])
    assert est.base(with_tools) > base + 346
    # Learning: the real model counts 1.4x the base estimate; the factor converges on it.
    for _ in range(60):
        est.observe("claude-sonnet-4-5-20250929", base, int(base * 1.4))
    assert est.factor("claude-sonnet-4-5") == pytest.approx(1.4, rel=0.01)
    assert est.samples("claude-sonnet-4-5-20250929") == 60
    assert est.factor("claude-3-haiku-20240307") == 1.0, "per family"
    assert est.observe("m", 0, 10) == 1.0, "nothing learnt from an empty estimate"
    count = nt.count_request_tokens(body, provider="anthropic")
    assert not count.exact and count.provider == "anthropic"
    with pytest.raises(ValueError, match="initial_factor"):
        nt.AnthropicEstimator(initial_factor=0)
    with pytest.raises(ValueError, match="alpha"):
        nt.AnthropicEstimator(alpha=2)
    with pytest.raises(ValueError, match="'messages' list"):
        est.base({"messages": "hi"})


@pytest.mark.parametrize(
    ("call", "exc", "why"),
    [
        (lambda: nt.count_tokens(b"bytes"), TypeError, "text must be a str"),
        (lambda: nt.count_request_tokens("{}"), TypeError, "body must be a dict"),
        (lambda: nt.count_request_tokens({}, provider="google"), ValueError, "provider must be"),
        (
            lambda: nt.count_request_tokens({"model": 5, "messages": []}),
            nt.RequestBodyError,
            "'model' must be a string",
        ),
        (lambda: nt.count_request_tokens({"messages": []}, model=5), TypeError, "model must be a str"),
        (lambda: nt.count_request_tokens({"model": "gpt-4"}), ValueError, "needs 'messages', 'input' or 'prompt'"),
        (
            lambda: nt.count_request_tokens({"model": "gpt-4", "messages": "hi"}),
            ValueError,
            "'messages' must be a list",
        ),
        (
            lambda: nt.count_request_tokens({"model": "gpt-4", "messages": ["hi"]}),
            nt.RequestBodyError,
            r"'messages\[0\]' must be an object \(a message\), got a string",
        ),
        (lambda: nt.count_request_tokens({"model": "gpt-4.1", "input": 5}), ValueError, "'input' must be"),
        (lambda: nt.get_encoding("gpt5_base"), ValueError, "unknown encoding"),
    ],
)
def test_bad_bodies(call, exc, why):
    with pytest.raises(exc, match=why):
        call()


def test_corrupt_or_missing_rank_files(monkeypatch, tmp_path):
    monkeypatch.setattr(_encodings, "_ranks", {})
    good = _encodings.ENCODINGS["r50k_base"]
    monkeypatch.setitem(_encodings.ENCODINGS, "r50k_bad", ("r50k_base.tiktoken", "0" * 64, good[2], good[3]))
    with pytest.raises(nt.EncodingFileError, match="corrupt"):
        nt.get_encoding("r50k_bad")
    monkeypatch.setitem(_encodings.ENCODINGS, "missing", ("nope.tiktoken", "0" * 64, good[2], good[3]))
    with pytest.raises(nt.EncodingFileError, match="cannot be read"):
        nt.get_encoding("missing")
    assert gzip.decompress(gzip.compress(b"x")) == b"x"


# --- usage ------------------------------------------------------------------------------

OPENAI_JSON = {
    "object": "chat.completion",
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 8},
    },
}
RESPONSES_JSON = {
    "object": "response",
    "usage": {
        "input_tokens": 50,
        "output_tokens": 7,
        "input_tokens_details": {"cached_tokens": 10},
        "output_tokens_details": {"reasoning_tokens": 3},
    },
}
ANTHROPIC_JSON = {
    "type": "message",
    "usage": {"input_tokens": 30, "output_tokens": 9, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 100},
}


def test_extract_usage():
    u = nt.extract_usage(OPENAI_JSON)
    assert u == nt.Usage(100, 20, 64, 8, True) and u.total_tokens == 120
    assert nt.extract_usage(json.dumps(RESPONSES_JSON)) == nt.Usage(50, 7, 10, 3)
    a = nt.extract_usage(json.dumps(ANTHROPIC_JSON).encode())
    assert a == nt.Usage(135, 9, 100, 0, True, 5) and a.total_tokens == 144 and a.cache_write_tokens == 5
    assert nt.extract_usage({"usage": {"input_tokens": 1, "output_tokens": 2}}, provider="anthropic").input_tokens == 1
    assert nt.extract_usage({"usage": {"prompt_tokens": 1}}, provider="openai-chat").input_tokens == 1


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"object": "chat.completion"}, "no 'usage'"),
        ({"foo": 1}, "cannot tell the provider"),
        ({"object": "chat.completion", "usage": {"prompt_tokens": -1}}, "non-negative"),
        ({"object": "chat.completion", "usage": {"prompt_tokens": "10"}}, "non-negative"),
        ({"object": "chat.completion", "usage": [1]}, "usage must be an object"),
    ],
)
def test_extract_usage_errors(body, why):
    with pytest.raises(nt.UsageError, match=why):
        nt.extract_usage(body)


def test_extract_usage_bad_provider():
    with pytest.raises(ValueError, match="provider must be one of"):
        nt.extract_usage({}, provider="gemini")


def sse(events, name: bool = False) -> bytes:
    out = b""
    for e in events:
        if name and isinstance(e, dict):
            out += f"event: {e.get('type', 'x')}\n".encode()
        data = e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)
        out += f"data: {data}\n\n".encode()
    return out


OPENAI_STREAM = sse(
    [
        {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "Héllo "}}]},
        {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "wörld 👍"}}]},
        {"object": "chat.completion.chunk", "choices": [], "usage": OPENAI_JSON["usage"]},
        "[DONE]",
    ]
)
RESPONSES_STREAM = sse(
    [
        {"type": "response.created", "response": {"object": "response"}},
        {"type": "response.output_text.delta", "delta": "日本"},
        {"type": "response.completed", "response": {"object": "response", "usage": RESPONSES_JSON["usage"]}},
    ],
    name=True,
)
ANTHROPIC_STREAM = sse(
    [
        {
            "type": "message_start",
            "message": {
                "usage": {
                    "input_tokens": 30,
                    "output_tokens": 1,
                    "cache_read_input_tokens": 100,
                    "cache_creation_input_tokens": 5,
                }
            },
        },
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Bonjour 🇫🇷"}},
        {"type": "message_delta", "usage": {"output_tokens": 5}},
        {"type": "message_delta", "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ],
    name=True,
).replace(b"\n", b"\r\n")

STREAMS = [
    ("openai", OPENAI_STREAM, nt.Usage(100, 20, 64, 8)),
    ("openai-responses", RESPONSES_STREAM, nt.Usage(50, 7, 10, 3)),
    ("anthropic", ANTHROPIC_STREAM, nt.Usage(135, 9, 100, cache_write_tokens=5)),
]


@pytest.mark.parametrize(("provider", "stream", "expected"), STREAMS, ids=[s[0] for s in STREAMS])
def test_streams_fed_byte_by_byte(provider, stream, expected):
    for given_provider in (provider, None):
        s = nt.UsageStream(given_provider)
        for i in range(len(stream)):
            s.feed(stream[i : i + 1])
        assert s.usage == expected and s.finish() == expected and s.errors == 0


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_streams_in_random_splits(data):
    _provider, stream, expected = data.draw(st.sampled_from(STREAMS))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    s = nt.UsageStream()
    last = 0
    for cut in [*cuts, len(stream)]:
        s.feed(memoryview(stream[last:cut]))
        last = cut
    assert s.finish() == expected


def test_anthropic_deltas_are_cumulative_not_summed():
    s = nt.UsageStream("anthropic")
    s.feed(ANTHROPIC_STREAM)
    assert s.usage.output_tokens == 9


def test_stream_without_usage_falls_back_to_counting(monkeypatch):
    stream = sse([{"object": "chat.completion.chunk", "choices": [{"delta": {"content": "hello world"}}]}])
    s = nt.UsageStream("openai", model="gpt-4o", input_estimate=42)
    s.feed(stream[:-1])  # cut before the final newline: finish() reads what is left
    usage = s.finish()
    assert usage == nt.Usage(42, 2, exact=False)
    a = nt.UsageStream("anthropic")
    a.feed(sse([{"type": "content_block_delta", "delta": {"text": "x" * 35}}]))
    # 35 characters at 3.5 per token, with an estimator no call has calibrated (the
    # process-wide one may have been, by other tests).
    monkeypatch.setattr("nexus_limits.tokens._count.anthropic_estimator", nt.AnthropicEstimator())
    assert a.finish() == nt.Usage(0, 10, exact=False)


def test_malformed_streams_are_counted_not_raised():
    s = nt.UsageStream()
    s.feed(b'data: {broken json\n\n: a comment\n\nevent: ping\n\ndata: [1,2]\n\ndata: {"foo": 1}\n\n')
    s.feed(b'data: {"object": "chat.completion.chunk", "usage": {"prompt_tokens": -5}}\n\n')
    assert s.errors == 3 and s.usage is None
    s.feed(b"data: [DONE]\n\n")
    assert s.done and s.finish() == nt.Usage(0, 0, exact=False)
    with pytest.raises(TypeError, match="chunk must be bytes"):
        s.feed("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="provider must be one of"):
        nt.UsageStream("palm")


# --- upstream headers ----------------------------------------------------------------


def test_openai_headers():
    limits = nt.parse_rate_limit_headers(
        {
            "X-RateLimit-Limit-Requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "6m0s",
            "retry-after": "3",
        }
    )
    assert limits.requests == nt.UpstreamLimit(500, 499, 0.12)
    assert limits.tokens == nt.UpstreamLimit(30000, 29000, 360.0)
    assert limits.retry_after == 3.0 and limits.input_tokens is None


def test_anthropic_headers():
    now = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.timezone.utc)
    limits = nt.parse_rate_limit_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2026-11-28T12:00:30Z",
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "39000",
            "anthropic-ratelimit-input-tokens-reset": "2026-11-28T12:01:00+00:00",
            "anthropic-ratelimit-output-tokens-reset": "not a time",
            "retry-after": "Sat, 28 Nov 2026 12:00:10 GMT",
        },
        now=now,
    )
    assert limits.requests == nt.UpstreamLimit(50, 49, 30.0)
    assert limits.input_tokens == nt.UpstreamLimit(40000, 39000, 60.0)
    assert limits.output_tokens == nt.UpstreamLimit(None, None, None)
    assert limits.retry_after == 10.0 and limits.tokens is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("20ms", 0.02), ("5us", 5e-6), ("7ns", 7e-9)],
)
def test_go_durations(text, seconds):
    assert nt.parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1x", "s", "1s2", "-1s"])
def test_bad_go_durations(text):
    with pytest.raises(ValueError):
        nt.parse_go_duration(text)


def test_bad_header_values_become_none():
    limits = nt.parse_rate_limit_headers(
        {"x-ratelimit-limit-tokens": "lots", "x-ratelimit-reset-tokens": "soon", "retry-after": "never"}
    )
    assert limits.tokens == nt.UpstreamLimit(None, None, None) and limits.retry_after is None
    assert nt.parse_rate_limit_headers({"retry-after": "-3"}).retry_after is None


def test_output_estimate():
    est = nt.OutputEstimate(default=1024, per_model={"gpt-4o": 4096, "gpt-4o-mini": 512})
    assert est({"model": "gpt-4o-mini-2024-07-18"}) == 512, "the longest prefix wins"
    assert est({"model": "gpt-4o"}) == 4096
    assert est({"model": "claude-x"}) == 1024
    assert est({"model": "gpt-4o", "max_tokens": 50}) == 50
    assert est({"max_completion_tokens": 70, "max_tokens": 50}) == 70
    assert est({"max_output_tokens": 0}) == 0
    with pytest.raises(nt.RequestBodyError, match="'max_tokens' must be a non-negative integer, got -1"):
        est({"max_tokens": -1})
    with pytest.raises(nt.RequestBodyError, match="'max_tokens' must be at most 9007199254740991"):
        est({"max_tokens": 2**53})
    for bad in (1.5, "100", True, float("nan"), float("inf"), [], {}):
        with pytest.raises(nt.RequestBodyError, match="'max_output_tokens' must be a non-negative integer") as error:
            est({"max_output_tokens": bad})
        assert error.value.field == "max_output_tokens"
    assert est({"max_tokens": 2**53 - 1}) == 2**53 - 1
    with pytest.raises(ValueError, match="default must be"):
        nt.OutputEstimate(default=-5)
    with pytest.raises(ValueError, match="per_model"):
        nt.OutputEstimate(per_model={"x": 1.5})
    with pytest.raises(TypeError, match="body must be a dict"):
        est([])
