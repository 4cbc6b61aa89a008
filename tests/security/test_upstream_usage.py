"""An upstream's response is input too: poisoned usage (negative, strings, floats, NaN,
booleans, beyond 2**53, missing), nested garbage, decompression bombs, lines that never
end, unknown or lying content codings. UsageReader's feed() forwards the bytes unchanged
whatever they are, finish() answers or raises UsageError (nothing else), and memory
stays bounded."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tracemalloc
import zlib
from typing import Any, Callable, List, Optional, Sequence

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nexus_limits.tokens as nt
from nexus_limits.tokens._response import DEFAULT_MAX_DECODED_BYTES, UsageReader, _openai_format
from nexus_limits.tokens._usage import _usage_of  # the oracle's rules

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MB = 1 << 20


def reader(ctype: Optional[str] = "application/json", encoding: Optional[str] = None, **options: Any) -> UsageReader:
    return UsageReader(
        options.pop("provider", "openai"), "gpt-4o", 42, content_type=ctype, content_encoding=encoding, **options
    )


def run(r: UsageReader, parts: Sequence[bytes], complete: bool = True) -> Any:
    """Feeds every part (checking each comes back unchanged); the usage or the UsageError."""
    for part in parts:
        assert r.feed(part) == part
    try:
        usage = r.finish(complete)
    except nt.UsageError as error:
        assert str(error)
        return error
    assert_sane(usage)
    return usage


def assert_sane(usage: nt.Usage) -> None:
    for count in usage[:4]:
        assert type(count) is int and 0 <= count <= 2**53
    assert usage.cached_input_tokens <= usage.input_tokens and usage.reasoning_tokens <= usage.output_tokens
    assert isinstance(usage.exact, bool)


def chunks(data: bytes, size: int = 65536) -> List[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def peak_memory(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- poisoned usage ---------------------------------------------------------------------------

BAD_COUNTS = [
    "-1",
    '"10"',
    "1.5",
    "3.0",  # a float, even a whole one
    "1e3",
    "NaN",
    "Infinity",
    "-Infinity",
    "true",
    "false",
    "9007199254740993",  # 2**53 + 1
    "1" + "0" * 5000,  # past Python's int-parsing limit
    "[]",
    "{}",
    "null",  # a required count that is null is missing
]

# (provider, content type, template): {} is where a required count goes.
TEMPLATES = [
    (
        "openai",
        "application/json",
        '{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":{},"completion_tokens":2}}',
    ),
    (
        "openai",
        "application/json",
        '{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":{}}}',
    ),
    ("openai", "application/json", '{"object":"list","data":[],"usage":{"prompt_tokens":{},"total_tokens":1}}'),
    ("openai", "application/json", '{"object":"response","output":[],"usage":{"input_tokens":{},"output_tokens":1}}'),
    ("anthropic", "application/json", '{"type":"message","content":[],"usage":{"input_tokens":1,"output_tokens":{}}}'),
    (
        "openai",
        "text/event-stream",
        'data: {"choices":[],"usage":{"prompt_tokens":{},"completion_tokens":1}}\n\ndata: [DONE]\n\n',
    ),
    ("openai", "text/event-stream", 'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":{}}}\n\n'),
    (
        "openai",
        "text/event-stream",
        'data: {"type":"response.completed","response":{"usage":{"input_tokens":1,"output_tokens":{}}}}\n\n',
    ),
    (
        "anthropic",
        "text/event-stream",
        'data: {"type":"message_start","message":{"usage":{"input_tokens":{},"output_tokens":1}}}\n\n'
        'data: {"type":"message_delta","usage":{"output_tokens":5}}\n\n',
    ),
    (
        "anthropic",
        "text/event-stream",
        'data: {"type":"message_start","message":{"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
        'data: {"type":"message_delta","usage":{"output_tokens":{}}}\n\n',
    ),
]


@pytest.mark.parametrize("bad", BAD_COUNTS)
@pytest.mark.parametrize(("provider", "ctype", "template"), TEMPLATES)
def test_poisoned_counts_raise_usage_error(provider, ctype, template, bad):
    body = template.replace("{}", bad, 1).encode()
    for complete in (True, False):
        for parts in ([body], chunks(body, 7)):
            result = run(reader(ctype, provider=provider), parts, complete)
            assert isinstance(result, nt.UsageError), (body[:200], result)


@pytest.mark.parametrize(
    ("ctype", "body", "why"),
    [
        ("application/json", '{"choices":[],"usage":5}', "usage must be an object"),
        ("application/json", '{"choices":[],"usage":"lots"}', "usage must be an object"),
        ("application/json", '{"choices":[],"usage":[1,2]}', "usage must be an object"),
        ("application/json", '{"choices":[],"usage":{}}', "prompt_tokens is missing"),
        ("application/json", '{"choices":[],"usage":null}', "no 'usage'"),
        ("application/json", '{"choices":[]}', "no 'usage'"),
        (
            "application/json",
            '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":6}}}',
            "exceed",
        ),
        (
            "application/json",
            '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"completion_tokens_details":{"reasoning_tokens":2}}}',
            "exceed",
        ),
        (
            "application/json",
            '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":[1]}}',
            "must be an object",
        ),
        (
            "application/json",
            '{"choices":[],"usage":{"prompt_tokens":9007199254740992,"completion_tokens":1}}',
            "more than 2\\*\\*53",
        ),
        ("application/json", '{"data":[],"usage":{"prompt_tokens":9,"total_tokens":3}}', "less than"),
        ("application/json", "[1, 2]", "not a JSON object"),
        ("application/json", "<html>502 Bad Gateway</html>", "not a JSON object"),
        (
            "application/json",
            '{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}} trailing',
            "after the end",
        ),
        ("application/json", '{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}]', "do not match"),
        ("application/json", '{"usage" {"prompt_tokens":1}}', "malformed"),
        ("application/json", '{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1', "ended before"),
        (
            "text/event-stream",
            'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,}}\n\n',
            "not valid JSON",
        ),
        ("text/event-stream", 'data: {"choices":[],"usage":"x"}\n\n', "usage must be an object"),
        (
            "text/event-stream",
            'data: {"type":"message_delta","usage":{"output_tokens":5}}\n\n',
            "input_tokens is missing",
        ),
    ],
)
def test_malformed_usage_is_named(ctype, body, why):
    provider = "anthropic" if "message_delta" in body else "openai"
    result = run(reader(ctype, provider=provider), [body.encode()])
    assert isinstance(result, nt.UsageError) and re.search(why, str(result)), str(result)


def test_a_poisoned_event_is_not_outvoted_by_a_later_good_one():
    body = (
        b'data: {"choices":[],"usage":{"prompt_tokens":-5,"completion_tokens":1}}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
    )
    assert isinstance(run(reader("text/event-stream"), [body]), nt.UsageError)


# --- nested garbage -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b', "usage": {"prompt_tokens": 1, "completion_tokens": 1}}',
        b'{"choices": [' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b'], "usage": {"prompt_tokens": 1}}',
        b"[" * 1_000_000,
        b'{"a":' * 1_000_000,
        b'{"a":['
        + b"[]," * 3_000_000
        + b'[]], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}',  # too many steps
        b"{" + b'"k":1,' * 1_000_000 + b'"usage": {"prompt_tokens": 1, "completion_tokens": 1}}',
    ],
    ids=["deep-usage", "deep-sibling", "deep-objects", "deep-top", "deep-keys", "wide", "many-members"],
)
def test_nested_garbage_in_json_raises_usage_error(body):
    result = run(reader(), chunks(body))
    assert isinstance(result, nt.UsageError)
    assert isinstance(run(reader(None), chunks(body, 4096)), nt.UsageError)
    if b"[[[[" in body or b'{"a":{"a":' in body:  # too deep for json.loads as well
        with pytest.raises(nt.UsageError):
            nt.extract_usage(body)


@pytest.mark.parametrize("size", [1000, 50_000, 300_000])
def test_nested_garbage_in_events(size):
    usage_event = b'data: {"usage": ' + b"[" * size + b"]" * size + b"}\n\n"
    assert isinstance(run(reader("text/event-stream"), chunks(usage_event, 5000)), nt.UsageError)
    # Deep garbage that carries no usage is just not read; the text before it counts.
    garbage = b'data: {"choices": ' + b"[" * size + b"]" * size + b"}\n\n"
    text = b'data: {"choices":[{"delta":{"content":"Hello world"}}]}\n\n'
    usage = run(reader("text/event-stream"), chunks(text + garbage, 5000))
    assert usage == nt.Usage(42, 2, exact=False)
    stream = nt.UsageStream("openai")
    stream.feed(text + garbage)
    assert stream.finish() == nt.Usage(0, 2, exact=False) and stream.errors <= 1


# --- decompression bombs ------------------------------------------------------------------------

BOMB_BODY = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1},"x":"'  # then 100 MB of "a"
BOMB_SIZE = 100 * MB


def _bomb(compress: Callable[[Any], Any], finish: Callable[[Any], bytes], obj: Any, head: bytes) -> bytes:
    out = [compress(obj, head)]
    block = b"a" * MB
    for _ in range(BOMB_SIZE // MB):
        out.append(compress(obj, block))
    out.append(finish(obj))
    return b"".join(out)


@pytest.fixture(scope="module")
def bombs():
    def gz(wbits: int) -> bytes:
        return _bomb(
            lambda c, b: c.compress(b), lambda c: c.flush(), zlib.compressobj(9, zlib.DEFLATED, wbits), BOMB_BODY
        )

    made = {
        "gzip": gz(31),
        "deflate": gz(15),
        "deflate-raw": gz(-15),
        "br": _bomb(lambda c, b: c.process(b), lambda c: c.finish(), brotli.Compressor(quality=5), BOMB_BODY),
        "zstd": _bomb(
            lambda c, b: c.compress(b), lambda c: c.flush(), zstandard.ZstdCompressor(level=3).compressobj(), BOMB_BODY
        ),
    }
    made["gzip, gzip"] = gzip.compress(made["gzip"], 9)
    made["zstd, br"] = brotli.compress(made["zstd"])
    for data in made.values():
        assert len(data) < BOMB_SIZE // 100
    return made


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw", "br", "zstd", "gzip, gzip", "zstd, br"])
def test_decompression_bombs_stop_at_the_budget(bombs, coding):
    bomb = bombs[coding]
    header = "deflate" if coding == "deflate-raw" else coding
    results: List[Any] = []
    for ctype in ("application/json", "text/event-stream"):
        peak = peak_memory(lambda: results.append(run(reader(ctype, header), chunks(bomb, 16384))))  # noqa: B023
        assert peak < 4 * MB, f"{coding} {ctype}: peak {peak} bytes"
    for result in results:
        assert isinstance(result, nt.UsageError)
    assert "decompression bomb" in str(results[0])
    # A small body compressed as well passes under the same budget.
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}, "x": "a" * 1000}).encode()
    encoded = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress, "br": brotli.compress}.get(coding)
    if encoded is not None:
        assert run(reader("application/json", coding, max_decoded_bytes=65536), [encoded(body)]) == nt.Usage(3, 4)


def test_a_bomb_in_the_decoded_forwarding_mode_ends_the_response(bombs):
    r = reader("text/event-stream", "gzip", strip_usage_chunk=True)
    assert r.forward_decoded
    with pytest.raises(nt.UsageError, match="decompression bomb"):
        for part in chunks(bombs["gzip"], 16384):
            out = r.feed(part)
            assert len(out) <= DEFAULT_MAX_DECODED_BYTES + 256 * 16384
    with pytest.raises(nt.UsageError):
        r.feed(b"more")
    with pytest.raises(nt.UsageError):
        r.finish(False)


def test_max_decoded_bytes_is_the_allowance():
    body = json.dumps(
        {"choices": [], "x": "a" * 300_000, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    ).encode()
    encoded = gzip.compress(body, 9)  # ~1000x: past 64 KiB + 256 per encoded byte
    result = run(reader("application/json", "gzip", max_decoded_bytes=65536), [encoded])
    assert isinstance(result, nt.UsageError) and "decompression bomb" in str(result)
    assert run(reader("application/json", "gzip"), [encoded]) == nt.Usage(3, 4)


# --- lines and bodies that never end --------------------------------------------------------------


@pytest.mark.parametrize(
    ("ctype", "head"),
    [
        ("text/event-stream", b"data: "),
        ("text/event-stream", b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1},"x":"'),
        ("text/event-stream", b": a comment "),
        ("text/event-stream", b"event: "),
        ("application/json", b'{"choices":[],"x":"'),
        ("application/json", b'{"choices":[],"x":' + b"[" * 500),
        (None, b"data: "),
    ],
)
@pytest.mark.parametrize("strip", [False, True])
def test_a_line_that_never_ends_costs_bounded_memory(ctype, head, strip):
    body = head + b"x" * (20 * MB)
    parts = chunks(body)
    r = reader(ctype, strip_usage_chunk=strip)
    forwarded = hashlib.sha256()

    def feed_all() -> None:
        for part in parts:
            forwarded.update(r.feed(part))

    assert peak_memory(feed_all) < 2 * MB + 2 * 65536
    forwarded.update(r.flush())
    assert forwarded.digest() == hashlib.sha256(body).digest()
    for complete in (True, False):
        try:
            assert_sane(r.finish(complete))
        except nt.UsageError:
            pass


def test_many_small_events_cost_no_memory_beyond_the_text_kept():
    event = b'data: {"choices":[{"delta":{"content":" hello"}}]}\n\n'
    parts = chunks(event * 200_000)  # 10 MB of text deltas, a token each
    r = reader("text/event-stream")
    assert peak_memory(lambda: [r.feed(p) for p in parts]) < 2 * MB
    usage = r.finish(False)
    assert usage.input_tokens == 42 and 150_000 < usage.output_tokens < 250_000 and not usage.exact


# --- content codings: unknown, stacked, lying ------------------------------------------------------

GOOD = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
GOOD_SSE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize(
    ("encoding", "why"),
    [
        ("compress", "unsupported content-encoding 'compress'"),
        ("aes128gcm", "unsupported"),
        ("gzip, x-custom", "unsupported content-encoding 'x-custom'"),
        ("gzip, gzip, gzip, gzip, gzip", "more than 4 content codings"),
        ("gzip", "cannot decode the gzip body"),  # says gzip, is not
        ("deflate", "cannot decode the deflate body"),
        ("br", "cannot decode the br body"),
        ("zstd", "cannot decode the zstd body"),
    ],
)
def test_unknown_or_lying_codings_are_no_usage(encoding, why):
    for ctype, body in (("application/json", GOOD), ("text/event-stream", GOOD_SSE)):
        result = run(reader(ctype, encoding), [body])
        assert isinstance(result, nt.UsageError) and why in str(result), str(result)
    # Nothing is stripped from a stream that cannot be decoded: it passes unchanged.
    r = reader("text/event-stream", "compress", strip_usage_chunk=True)
    assert not r.strip_usage_chunk and r.feed(GOOD_SSE) == GOOD_SSE


@pytest.mark.parametrize("header", ["identity", "IDENTITY", " , identity ,, ", "", "GZip", "gzip;q=1"])
def test_codings_are_read_leniently_where_harmless(header):
    body = gzip.compress(GOOD) if header.strip().lower() == "gzip" else GOOD
    result = run(reader("application/json", header), [body])
    if header == "gzip;q=1":  # parameters are no part of a coding name
        assert isinstance(result, nt.UsageError)
    else:
        assert result == nt.Usage(3, 4)


def test_truncated_and_trailing_compressed_data():
    encoded = gzip.compress(GOOD)
    assert isinstance(run(reader("application/json", "gzip"), [encoded[:-12]]), nt.UsageError)  # cut: no end
    # Bytes after the end of the compressed stream are ignored, as httpx does.
    assert run(reader("application/json", "gzip"), [encoded + b"garbage"]) == nt.Usage(3, 4)
    z = zstandard.ZstdCompressor()
    frames = z.compress(GOOD[:10]) + z.compress(GOOD[10:])  # two frames, as httpx accepts
    assert run(reader("application/json", "zstd"), [frames]) == nt.Usage(3, 4)
    # A zstd frame asking for a 128 MiB window is refused (RFC 9659 allows 8 MB).
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    big_window = zstandard.ZstdCompressor(compression_params=params).compressobj()
    wide = big_window.compress(GOOD) + big_window.flush()
    assert isinstance(run(reader("application/json", "zstd"), [wide]), nt.UsageError)


# --- generated: any bytes, any JSON ---------------------------------------------------------------

CTYPES = ["application/json", "text/event-stream", None, "text/html"]
CODINGS = [None, "gzip", "deflate", "br", "zstd", "gzip, br"]
ENCODERS = {
    None: lambda b: b,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
    "gzip, br": lambda b: brotli.compress(gzip.compress(b)),
}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["usage", "prompt_tokens", "message_start", "response.completed"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "usage",
                    "choices",
                    "type",
                    "message",
                    "response",
                    "prompt_tokens",
                    "completion_tokens",
                    "input_tokens",
                    "output_tokens",
                    "total_tokens",
                    "delta",
                    "content",
                    "x",
                    "output",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


def split(data: bytes, cuts: List[int]) -> List[bytes]:
    cuts = sorted(c % (len(data) + 1) for c in cuts)
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@SETTINGS
@given(
    st.lists(st.binary(max_size=60) | st.sampled_from([b"data: ", b"\n\n", b"\r\n", b"\r", b'{"usage":', b"[DONE]"])),
    st.sampled_from(CTYPES),
    st.sampled_from(CODINGS),
    st.sampled_from(["openai", "anthropic", None]),
    st.booleans(),
)
def test_any_bytes_forwarded_unchanged_and_only_usage_error(parts, ctype, coding, provider, complete):
    # Raw bytes under a coding: mostly undecodable, which is the point.
    result = run(reader(ctype, coding, provider=provider), parts, complete)
    assert isinstance(result, (nt.Usage, nt.UsageError))


@SETTINGS
@given(
    st.lists(
        st.binary(max_size=60)
        | st.sampled_from([b"data: ", b"\n\n", b"\r\n", b"\r", b'{"choices":[],"usage":', b"[DONE]"])
    ),
    st.sampled_from(CODINGS),
)
def test_stripping_any_bytes_raises_nothing_but_usage_error(parts, coding):
    r = reader("text/event-stream", coding, strip_usage_chunk=True)
    try:
        for part in split(ENCODERS[coding](b"".join(parts)), [len(p) for p in parts]):
            r.feed(part)
        r.flush()
        assert_sane(r.finish(False))
    except nt.UsageError:
        pass


@SETTINGS
@given(
    json_values,
    st.sampled_from(CODINGS),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.sampled_from(["openai", "anthropic", None]),
)
def test_any_json_in_bodies_and_events(doc, coding, cuts, provider):
    text = json.dumps(doc).encode()
    for ctype, body in (
        ("application/json", text),
        ("text/event-stream", b"data: " + text + b"\n\ndata: [DONE]\n\n"),
        ("text/event-stream", b'data: {"type":"message_start","message":{"usage":' + text + b"}}\n\n"),
        ("text/event-stream", b'data: {"choices":[],"usage":' + text + b"}\n\n"),
    ):
        encoded = ENCODERS[coding](body)
        result = run(reader(ctype, coding, provider=provider), split(encoded, cuts))
        assert isinstance(result, (nt.Usage, nt.UsageError))


usage_values = (
    st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": st.integers(0, 2**54) | st.none() | st.floats(allow_nan=True) | st.text(max_size=3),
            "completion_tokens": st.integers(0, 2**54) | st.none() | st.booleans(),
            "total_tokens": st.integers(-5, 2**54),
            "input_tokens": st.integers(-5, 100),
            "output_tokens": st.integers(0, 100),
            "prompt_tokens_details": st.none()
            | st.fixed_dictionaries({}, optional={"cached_tokens": st.integers(0, 200)}),
        },
    )
    | json_values
)


@SETTINGS
@given(st.data())
def test_the_scanner_reads_what_json_loads_reads(data):
    """The top-level usage read from bytes split anywhere, with any whitespace, is the
    one json.loads finds (or both refuse it)."""
    members = data.draw(
        st.dictionaries(st.text(max_size=6) | st.sampled_from(["choices", "output", "data"]), json_values, max_size=5)
    )
    members["usage"] = data.draw(usage_values)
    order = data.draw(st.permutations(list(members)))
    doc = {k: members[k] for k in order}
    text = json.dumps(
        doc,
        indent=data.draw(st.sampled_from([None, 1, "\t"])),
        ensure_ascii=data.draw(st.booleans()),
        separators=data.draw(st.sampled_from([None, (",", ":"), (" , ", " : ")])),
    ).encode()
    try:
        usage = doc["usage"]
        if usage is None:
            raise nt.UsageError("no usage")
        expected: Any = _usage_of(usage, _openai_format(usage), any(k in doc for k in ("choices", "output", "content")))
    except nt.UsageError:
        expected = nt.UsageError
    result = run(reader(), split(text, data.draw(st.lists(st.integers(0, 10**6), max_size=10))))
    assert result == expected or (expected is nt.UsageError and isinstance(result, nt.UsageError)), (text[:300], result)


@SETTINGS
@given(
    st.lists(st.text(max_size=12), min_size=1, max_size=6),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.lists(st.integers(0, 10_000), max_size=10),
    st.booleans(),
)
def test_strip_removes_exactly_the_usage_chunk(texts, eol, cuts, comment):
    def event(doc: Any) -> bytes:
        return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}{eol}{eol}".encode()

    content = b"".join(event({"choices": [{"delta": {"content": t}}], "usage": None}) for t in texts)
    if comment:
        content += f": keep-alive{eol}{eol}".encode()
    usage = event({"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    stream = content + usage + event("[DONE]")
    r = reader("text/event-stream", strip_usage_chunk=True)
    out = b"".join(r.feed(p) for p in split(stream, cuts)) + r.flush()
    assert out == content + event("[DONE]")
    assert r.finish() == nt.Usage(7, 3)


# --- upstream rate-limit headers ------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["-5", "-0.5e3", "1e16", "1e400", "nan", "inf", "", "many", "0x10"])
def test_upstream_limit_counts_that_are_garbage_read_as_unknown(bad):
    limits = nt.parse_rate_limit_headers(
        {
            "x-ratelimit-remaining-tokens": bad,
            "x-ratelimit-limit-tokens": bad,
            "anthropic-ratelimit-requests-remaining": bad,
        }
    )
    assert limits.tokens is not None and limits.tokens.remaining is None and limits.tokens.limit is None
    assert limits.requests is not None and limits.requests.remaining is None


@pytest.mark.parametrize("bad", ["1" * 400 + "h", "9" * 310 + "s"])
def test_upstream_durations_that_overflow_are_refused(bad):
    with pytest.raises(ValueError, match="out of range"):
        nt.parse_go_duration(bad)
    limits = nt.parse_rate_limit_headers({"x-ratelimit-remaining-tokens": "5", "x-ratelimit-reset-tokens": bad})
    assert limits.tokens is not None and limits.tokens.remaining == 5 and limits.tokens.reset is None
