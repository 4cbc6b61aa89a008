"""UsageReader reads a small uncompressed JSON body with one ``json.loads`` instead of
scanning it: the answer (the usage, or the UsageError and its reason) must be exactly
the scanner's, for well-formed bodies and hostile ones alike.

The scanner's answer is obtained from the same bytes taking the other roads: padded
past the 64 KiB the fast path holds, and gzip-encoded (decoded bodies are always
scanned)."""

from __future__ import annotations

import gzip
import json
import math
from typing import Any, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nexus_limits.tokens as nt
from nexus_limits.tokens._response import UsageReader

PAD = b" " * (65 * 1024)  # whitespace after the object: still the same JSON document


def outcome(
    body: bytes,
    *,
    provider: Optional[str] = "openai",
    encoding: Optional[str] = None,
    split: int = 0,
    complete: bool = True,
) -> Any:
    reader = UsageReader(provider, "gpt-4o", 11, content_type="application/json", content_encoding=encoding)
    parts: List[bytes] = [body[i : i + split] for i in range(0, len(body), split)] if split else [body]
    for part in parts:
        assert reader.feed(part) == part  # forwarded unchanged
    assert reader.flush() == b""
    try:
        return reader.finish(complete)
    except nt.UsageError as error:
        return ("UsageError", str(error))


def assert_same_as_scanner(body: bytes, provider: Optional[str] = "openai", complete: bool = True) -> Any:
    fast = outcome(body, provider=provider, complete=complete)
    scanned = outcome(body + PAD, provider=provider, complete=complete)
    assert fast == scanned, (body[:200], fast, scanned)
    if not body.endswith(b" "):
        zipped = outcome(gzip.compress(body), provider=provider, encoding="gzip", complete=complete)
        assert fast == zipped, (body[:200], fast, zipped)
    for split in (1, 7):
        if len(body) < 4000:
            assert outcome(body, provider=provider, split=split, complete=complete) == fast
    return fast


CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Héllo 👍"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}


def test_a_small_body_is_read():
    assert assert_same_as_scanner(json.dumps(CHAT).encode()) == nt.Usage(9, 3)


def test_a_body_fed_byte_by_byte_and_past_the_holding_limit_is_read():
    big = dict(CHAT, choices=[{"index": 0, "message": {"role": "assistant", "content": "x" * 200_000}}])
    body = json.dumps(big).encode()
    assert outcome(body, split=4096) == nt.Usage(9, 3)
    assert outcome(body, split=70_000) == nt.Usage(9, 3)


HOSTILE = [
    b"",
    b"   ",
    b"{",
    b"}",
    b"[]",
    b'"usage"',
    b"null",
    b"{}",
    b'{"usage": null}',
    b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}',  # cut
    b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}{}',  # two documents
    b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}} x',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "usage": {"prompt_tokens": 5, "completion_tokens": 6}}',
    b'{"usage": {"prompt_tokens": 5, "completion_tokens": 6}, "usage": "nope"}',
    b'{"\\u0075sage": {"prompt_tokens": 3, "completion_tokens": 4}, "choices": []}',  # an escaped key
    b'{"us\\u0061ge": {"prompt_tokens": 3, "completion_tokens": 4}, "\\ud800": 1}',  # a lone surrogate key
    b'{"usage": {"prompt_tokens": NaN, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": Infinity, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": -1, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 1.5, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": true, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 9007199254740993, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 1e400, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": ' + b"9" * 5000 + b', "completion_tokens": 1}}',  # too many digits
    b'{"x": ' + b"9" * 5000 + b', "usage": {"prompt_tokens": 1, "completion_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": tru}',  # a bad scalar elsewhere
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": "\x01"}',  # a raw control character
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": "\xff\xfe"}',  # not UTF-8
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": "\xed\xa0\x80"}',  # an encoded surrogate
    b'\xef\xbb\xbf{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": []}',  # a byte-order mark
    '{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}'.encode("utf-16-le"),
    '{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}'.encode("utf-32"),
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": [1, 2,]}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": [1 2]}',
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": [}',
    b'{"usage" {"prompt_tokens": 1}}',
    b'{"usage": {"prompt_tokens": 1}, , "choices": []}',
    b'{"choices": [], "usage": [1, 2]}',
    b'{"choices": [], "usage": {"input_tokens": 4, "output_tokens": 5}}',
    b'{"type": "message", "content": [], "usage": {"input_tokens": 4, "output_tokens": 5}}',
    b'{"usage": {"prompt_tokens": 4}}',  # embeddings: no output expected
    b'{"choices": [], "usage": {"prompt_tokens": 4}}',  # a generation without output tokens
]


@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize("provider", ["openai", "anthropic", None])
def test_hostile_bodies_get_the_scanners_answer(body, provider):
    assert_same_as_scanner(body, provider)
    assert_same_as_scanner(body, provider, complete=False)


@pytest.mark.parametrize("depth", [100, 254, 255, 256, 300, 510, 511, 512, 513, 900, 2000])
def test_nesting_near_the_scanners_bound_gets_its_answer(depth):
    usage = b'"usage": {"prompt_tokens": 1, "completion_tokens": 1}'
    deep_list = b'{"choices": ' + b"[" * depth + b"]" * depth + b", " + usage + b"}"
    deep_obj = b'{"choices": [' + b'{"a":' * depth + b"1" + b"}" * depth + b"], " + usage + b"}"
    deep_usage = b'{"choices": [], "usage": ' + b"[" * depth + b"]" * depth + b"}"
    for body in (deep_list, deep_obj, deep_usage):
        assert_same_as_scanner(body)


def test_brackets_inside_strings_only_send_the_body_to_the_scanner():
    body = json.dumps(dict(CHAT, note="[{" * 600)).encode()
    assert assert_same_as_scanner(body) == nt.Usage(9, 3)


# --- any JSON document -------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
counts = st.one_of(
    st.integers(min_value=-3, max_value=2**54),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
usages = st.one_of(
    values,
    st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": counts,
            "completion_tokens": counts,
            "input_tokens": counts,
            "output_tokens": counts,
            "total_tokens": counts,
            "prompt_tokens_details": st.one_of(values, st.fixed_dictionaries({"cached_tokens": counts})),
            "cache_read_input_tokens": counts,
        },
    ),
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "usage": usages,
        "choices": values,
        "content": values,
        "output": values,
        "object": st.sampled_from(["chat.completion", "list", "response", "text_completion"]) | values,
        "type": st.sampled_from(["message", "response"]) | values,
        "other": values,
    },
)


def _dumps(doc: Any, indent: Optional[int], ascii_only: bool) -> bytes:
    # json.dumps writes NaN and Infinity as json.loads reads them (not strict JSON, but
    # what Python servers send).
    return json.dumps(doc, indent=indent, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=documents,
    indent=st.sampled_from([None, 0, 2]),
    ascii_only=st.booleans(),
    provider=st.sampled_from(["openai", "openai-responses", "anthropic", None]),
)
def test_any_document_gets_the_scanners_answer(doc, indent, ascii_only, provider):
    body = _dumps(doc, indent, ascii_only)
    got = assert_same_as_scanner(body, provider)
    if isinstance(got, nt.Usage):
        for n in (got.input_tokens, got.output_tokens):
            assert isinstance(n, int) and not isinstance(n, bool) and 0 <= n and math.isfinite(n)


@settings(max_examples=200, deadline=None)
@given(doc=documents, cut=st.integers(min_value=0, max_value=400))
def test_any_cut_document_gets_the_scanners_answer(doc, cut):
    body = _dumps(doc, None, True)
    assert_same_as_scanner(body[: min(cut, len(body))], complete=False)
    assert_same_as_scanner(body[: min(cut, len(body))], complete=True)
