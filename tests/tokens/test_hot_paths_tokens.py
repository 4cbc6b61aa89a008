"""The shortcuts the per-request token code takes for the common shapes must answer
exactly what the general code answers, for those shapes and for every hostile variant
of them (the shortcut then hands over to the general code).

- ``_usage_of``: plain OpenAI counts are read in a few steps; the general reading
  (``_usage_of_any``) is the reference, results and error messages alike;
- ``_small_document``: a body starting with "{" is handed to json's scanner directly;
  ``json.loads`` is the reference;
- ``count_request_tokens``: a message of a known role and a string content is counted
  in one step; the same body with its messages as a dict subclass (which always takes
  the general road) is the reference;
- ``UsageReader``: a response without Content-Encoding skips the coding set-up, and
  Content-Type values are remembered in a bounded table.
"""

from __future__ import annotations

import gzip
import json
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_limits.tokens import Usage, UsageError, _count, _response, count_request_tokens
from nexus_limits.tokens._response import UsageReader
from nexus_limits.tokens._usage import MAX_REPORTED_TOKENS, _usage_of, _usage_of_any


def _answer(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return ("ok", call(*args, **kwargs))
    except Exception as error:  # the type and message are part of the answer
        return (type(error).__name__, str(error))


# --- _usage_of --------------------------------------------------------------------------

_COUNTS = st.one_of(
    st.none(),
    st.integers(min_value=-3, max_value=50),
    st.sampled_from([0, MAX_REPORTED_TOKENS, MAX_REPORTED_TOKENS + 1, 2**63, -(2**53), 10**400]),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["3", "", [], {}, 3.0]),
)
_DETAIL_NAMES = ["cached_tokens", "reasoning_tokens", "audio_tokens", "accepted_prediction_tokens"]
_DETAILS = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(_DETAIL_NAMES), _COUNTS, max_size=3),
    st.sampled_from([[], "x", 3, True]),
)
_USAGE_NAMES = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
]
_USAGES = st.one_of(
    st.dictionaries(
        st.sampled_from([*_USAGE_NAMES, "prompt_tokens_details", "completion_tokens_details"]),
        _COUNTS,
        max_size=6,
    ).flatmap(
        lambda counts: st.fixed_dictionaries(
            {},
            optional={
                "prompt_tokens_details": _DETAILS,
                "completion_tokens_details": _DETAILS,
                "input_tokens_details": _DETAILS,
                "output_tokens_details": _DETAILS,
            },
        ).map(lambda details: {**counts, **details})
    ),
    st.sampled_from([None, [], "usage", 3, True]),
)


@settings(max_examples=1500, deadline=None)
@given(
    usage=_USAGES,
    provider=st.sampled_from(["openai", "openai-responses", "anthropic"]),
    require_output=st.booleans(),
)
def test_usage_fast_reading_answers_as_the_general_one(usage: Any, provider: str, require_output: bool) -> None:
    assert _answer(_usage_of, usage, provider, require_output) == _answer(
        _usage_of_any, usage, provider, require_output
    )


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        {
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 9, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 3, "audio_tokens": 0},
        },
        {"prompt_tokens": MAX_REPORTED_TOKENS, "completion_tokens": 0},
        {"prompt_tokens": MAX_REPORTED_TOKENS, "completion_tokens": 1},  # the sum is too big
        {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 10}},
        {"prompt_tokens": 9, "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": 4}},
        {"prompt_tokens": 9, "completion_tokens": True},
        {"prompt_tokens": 9.0, "completion_tokens": 3},
        {"prompt_tokens": -1, "completion_tokens": 3},
        {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": -1}},
        {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": []},
    ],
)
def test_usage_edges_answer_as_the_general_reading(usage: Dict[str, Any]) -> None:
    for provider in ("openai", "openai-responses", "anthropic"):
        fast = _answer(_usage_of, usage, provider)
        assert fast == _answer(_usage_of_any, usage, provider, True)
        if fast[0] == "ok":
            assert type(fast[1]) is Usage


def test_a_plain_usage_is_a_usage_with_its_fields() -> None:
    usage = _usage_of({"prompt_tokens": 9, "completion_tokens": 3}, "openai")
    assert usage == Usage(9, 3) and usage.total_tokens == 12 and usage.exact is True
    assert usage._replace(exact=False) == Usage(9, 3, exact=False)


# --- _small_document ---------------------------------------------------------------------


def _reference_document(body: bytes) -> Optional[Dict[str, Any]]:
    if body.count(b"{") + body.count(b"[") >= 512:
        return None
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return doc if type(doc) is dict else None


@pytest.mark.parametrize(
    "body",
    [
        b'{"usage": {"prompt_tokens": 1}}',
        b'{"usage": 1} ',
        b'{"usage": 1}\r\n\t ',
        b' {"usage": 1}',
        b'{"usage": 1} {"usage": 2}',
        b'{"usage": 1}x',
        b'{"usage": 1}}',
        b'{"usage": 1',
        b"{",
        b"{}",
        b"",
        b"[]",
        b'"{"',
        b"\xef\xbb\xbf{}",
        b'{"a": NaN, "b": Infinity, "c": -Infinity}',
        b'{"a": "\xff"}',
        b'{"a": "\\ud800"}',
        b'{"a": 1, "a": 2}',
        b'{"a": 1e400, "b": 12345678901234567890123}',
        b'{"a": "x\ty"}',  # a raw control character: strict json refuses it
        b"{" * 600,
        b'{"a":' * 300 + b"1" + b"}" * 300,
    ],
)
def test_small_document_is_what_json_loads_reads(body: bytes) -> None:
    assert _response._small_document(body) == _reference_document(body)


@settings(max_examples=400, deadline=None)
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=12,
    ),
    tail=st.sampled_from(["", " ", "\n", "x", "}", "]", ",", "{}"]),
)
def test_small_document_matches_json_loads_on_any_value(doc: Any, tail: str) -> None:
    body = (json.dumps(doc) + tail).encode()
    assert _response._small_document(body) == _reference_document(body)


def test_the_json_scanner_keeps_no_strings_between_calls() -> None:
    # json's C scanner memoises keys while it reads a document; it must forget them after.
    first = _response._small_document(b'{"usage": {"prompt_tokens": 1}}')
    second = _response._small_document(b'{"usage": {"prompt_tokens": 2}}')
    assert first == {"usage": {"prompt_tokens": 1}} and second == {"usage": {"prompt_tokens": 2}}


# --- count_request_tokens ------------------------------------------------------------------


class _Message(dict):  # type: ignore[type-arg]
    """A message the plain-message shortcut leaves to the general code."""


def _general(body: Dict[str, Any]) -> Dict[str, Any]:
    messages = body.get("messages")
    if isinstance(messages, list):
        return {**body, "messages": [_Message(m) if type(m) is dict else m for m in messages]}
    return body


_ROLE = st.sampled_from(["user", "system", "assistant", "developer", "tool", "function", "User", "", "bot"])
_CONTENT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "<|endoftext|>", "\ud800", "héllo wörld", "🙂" * 5]),
    st.none(),
    st.integers(),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2),
)
_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": _ROLE, "content": _CONTENT}),
    st.fixed_dictionaries({"content": _CONTENT, "role": _ROLE}),
    st.fixed_dictionaries({"role": _ROLE, "content": _CONTENT, "name": st.text(max_size=5)}),
    st.fixed_dictionaries({"role": st.one_of(_ROLE, st.integers(), st.none()), "content": _CONTENT}),
    st.fixed_dictionaries({"role": _ROLE}),
    st.fixed_dictionaries({"role": _ROLE, "tool_call_id": st.text(max_size=5)}),
    st.sampled_from([None, "user", 3, []]),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(_MESSAGE, max_size=4),
    model=st.sampled_from(["gpt-4o-mini", "gpt-4", "gpt-3.5-turbo", "text-davinci-003", "davinci", "unknown", None]),
)
def test_plain_messages_count_as_the_general_code_counts(messages: List[Any], model: Optional[str]) -> None:
    body: Dict[str, Any] = {"messages": messages}
    if model is not None:
        body["model"] = model
    assert _answer(count_request_tokens, body) == _answer(count_request_tokens, _general(body))


def test_long_contents_past_the_piece_and_the_budget_count_as_the_general_code() -> None:
    piece = _count.PIECE_CHARS
    for body in (
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "a" * piece}]},
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "ab " * (piece // 3 + 1)}]},
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (piece + 1)}]},
    ):
        assert count_request_tokens(body) == count_request_tokens(_general(body))


def test_the_exact_budget_is_spent_on_roles_and_contents_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small budget stands for MAX_EXACT_CHARS: the messages around its edge (the role
    # counts towards it too) are extrapolated exactly as the general code does.
    monkeypatch.setattr(_count, "MAX_EXACT_CHARS", 30)
    answers = set()
    for n in range(0, 40):
        for first in (
            {"role": "user", "content": "wo " * (n // 3) + "w" * (n % 3)},
            {"content": "w" * n, "role": "user"},
        ):
            body = {"model": "gpt-4o", "messages": [first, {"role": "assistant", "content": "Sure thing"}]}
            fast = count_request_tokens(body)
            assert fast == count_request_tokens(_general(body))
            answers.add(fast.exact)
    assert answers == {True, False}


def test_the_model_table_is_bounded_and_still_answers_past_its_bound() -> None:
    body: Dict[str, Any] = {"messages": [{"role": "user", "content": "Say hello"}]}
    expected = {
        "gpt-4o": count_request_tokens({**body, "model": "gpt-4o"}),
        "other": count_request_tokens({**body, "model": "no-such-model"}),
    }
    for i in range(_count._ENCODINGS_MAX + 50):
        count = count_request_tokens({**body, "model": f"no-such-model-{i}"})
        assert count.tokens == expected["other"].tokens and count.exact is False
        count = count_request_tokens({**body, "model": f"gpt-4o-{i}"})
        assert count.tokens == expected["gpt-4o"].tokens and count.exact is True
    assert len(_count._ENCODINGS) <= _count._ENCODINGS_MAX
    long_name = "gpt-4o-" + "x" * 100_000
    assert count_request_tokens({**body, "model": long_name}).tokens == expected["gpt-4o"].tokens
    assert long_name not in _count._ENCODINGS


def test_wrong_shapes_still_name_the_field() -> None:
    for body, field in (
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": 3, "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}, "x"]}, "messages[1]"),
    ):
        with pytest.raises(_count.RequestBodyError) as caught:
            count_request_tokens(body)
        assert caught.value.field == field


# --- UsageReader -----------------------------------------------------------------------------

BODY = json.dumps(
    {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
).encode()


def _read(
    body: bytes, content_type: Any, encoding: Any = None, provider: Optional[str] = "openai", chunk: Any = bytes
) -> Any:
    reader = UsageReader(provider, "gpt-4o", 5, content_type=content_type, content_encoding=encoding)
    forwarded = reader.feed(chunk(body))
    assert forwarded == body
    assert reader.flush() == b""
    return _answer(reader.finish)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        b"application/json",
        "Application/JSON; charset=utf-8",
        b"application/problem+json",
        "text/json",
        "text/event-stream",
        b"text/event-stream; charset=utf-8",
        "text/plain",
        "",
        None,
        bytearray(b"application/json"),
    ],
)
def test_no_content_encoding_reads_as_identity(content_type: Any) -> None:
    for body in (BODY, b"data: " + BODY + b"\n\ndata: [DONE]\n\n", b'{"usage": {"prompt_tokens": "x"}}', b"nonsense"):
        for provider in ("openai", "openai-responses", "anthropic", None):
            plain = _read(body, content_type, None, provider)
            assert plain == _read(body, content_type, "identity", provider)
            assert plain == _read(body, content_type, None, provider, chunk=bytearray)
            assert plain == _read(body, content_type, None, provider, chunk=memoryview)


def test_a_plain_json_answer_is_read_and_kept() -> None:
    reader = UsageReader("openai", "gpt-4o", 5, content_type="application/json", content_encoding=None)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"10")]
    forwarded = reader.forwarded_headers(headers)
    assert forwarded == headers and forwarded is not headers
    assert reader.feed(BODY) is BODY
    assert reader.finish() == Usage(9, 3) and reader.finish() == Usage(9, 3)
    assert reader.feed(b"more") == b"more"  # after finish: passed on, not read


def test_an_error_is_raised_again_by_a_second_finish() -> None:
    reader = UsageReader("openai", "gpt-4o", 5, content_type="application/json", content_encoding=None)
    reader.feed(b'{"choices": [], "usage": {"prompt_tokens": -1}}')
    with pytest.raises(UsageError, match="usage.prompt_tokens must be a non-negative integer") as first:
        reader.finish()
    with pytest.raises(UsageError) as second:
        reader.finish()
    assert second.value is first.value


def test_the_content_type_table_is_bounded() -> None:
    for i in range(_response._MODES_MAX + 100):
        assert _read(BODY, f"application/x-{i}+json") == ("ok", Usage(9, 3))
        assert _read(BODY, f"text/x-{i}".encode()) == ("ok", Usage(9, 3))  # sniffed as JSON
    assert len(_response._MODES) <= _response._MODES_MAX
    huge = "application/json;" + "x" * 10_000
    assert _read(BODY, huge) == ("ok", Usage(9, 3))
    assert huge not in _response._MODES


def test_a_content_type_of_the_wrong_type_fails_as_before() -> None:
    for value in (3, ["application/json"], {"a": 1}):
        with pytest.raises(AttributeError):
            UsageReader("openai", "gpt-4o", 5, content_type=value, content_encoding=None)


def test_compressed_answers_still_take_the_decoding_road() -> None:
    encoded = gzip.compress(BODY)
    reader = UsageReader("openai", "gpt-4o", 5, content_type="application/json", content_encoding="gzip")
    assert reader.feed(encoded) == encoded
    assert reader.finish() == Usage(9, 3)
