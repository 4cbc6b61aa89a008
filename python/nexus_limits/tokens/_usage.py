"""Token usage from provider responses: JSON bodies and server-sent-event streams.

The byte-level reading (compressed bodies, streams, bounded memory) lives in
:mod:`nexus_limits.tokens._response` (:class:`~nexus_limits.tokens._response.UsageReader`);
this module holds the :class:`Usage` record, the validation every reported count goes
through, and the older entry points :func:`extract_usage` and :class:`UsageStream`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional

if TYPE_CHECKING:
    from ._response import _SseCore

__all__ = ["MAX_REPORTED_TOKENS", "Usage", "UsageError", "UsageStream", "detect_provider", "extract_usage"]

# The largest count believed: beyond 2**53 a JSON number is no longer exact in most
# decoders (JavaScript, float-based ones), so such a count is garbage, not usage.
MAX_REPORTED_TOKENS = 2**53


class UsageError(ValueError):
    """A response that carries no usage we can trust (missing, malformed, unreadable)."""


class Usage(NamedTuple):
    """Tokens a call really used. ``input_tokens`` includes cached input
    (``cached_input_tokens`` says how much of it was read from cache) and input written
    to the cache (``cache_write_tokens``: Anthropic's ``cache_creation_input_tokens``,
    priced above plain input); ``exact`` is False when the numbers were estimated (a
    stream that ended without usage)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    exact: bool = True
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _count(value: Any, what: str, required: bool = False) -> int:
    """One reported count: a JSON integer in [0, 2**53]. Floats (even ``3.0``), strings,
    booleans, NaN and negative numbers are refused; null counts as absent."""
    if value is None:
        if required:
            raise UsageError(f"{what} is missing")
        return 0
    if type(value) is not int:  # bool is an int subclass: refused too
        raise UsageError(f"{what} must be a non-negative integer, got {_short(value)}")
    if value < 0 or value > MAX_REPORTED_TOKENS:
        raise UsageError(f"{what} must be a non-negative integer up to 2**53, got {_short(value)}")
    return value


def _details(usage: Dict[str, Any], name: str) -> Dict[str, Any]:
    value = usage.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"usage.{name} must be an object, got {type(value).__name__}")
    return value


def _output(usage: Dict[str, Any], name: str, input_name: str, input_tokens: int, required: bool) -> int:
    """The output count; without it, ``total_tokens`` minus the input (embeddings
    report only the total); without either, 0 unless the body is a generation."""
    if usage.get(name) is not None:
        return _count(usage[name], f"usage.{name}")
    if usage.get("total_tokens") is not None:
        total = _count(usage["total_tokens"], "usage.total_tokens")
        if total < input_tokens:
            raise UsageError(f"usage.total_tokens ({total}) is less than usage.{input_name} ({input_tokens})")
        return total - input_tokens
    if required:
        raise UsageError(f"usage.{name} is missing")
    return 0


# Builds a Usage without the Python-level __new__ of a NamedTuple (the same object).
_new_usage: Any = tuple.__new__
# The names a fast read looks for, per provider: input, output, input details and its
# cached count, output details and its reasoning count.
_FAST_NAMES = {
    "openai": (
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "cached_tokens",
        "completion_tokens_details",
        "reasoning_tokens",
    ),
    "openai-responses": (
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
        "cached_tokens",
        "output_tokens_details",
        "reasoning_tokens",
    ),
}


def _fast_detail(details: Any, name: str) -> int:
    """A count in a details object, or -1 when it is not a plain valid one (the general
    reading then decides, raising what it raises)."""
    if details is None:
        return 0
    if type(details) is not dict:
        return -1
    value = details.get(name)
    if value is None:
        return 0
    if type(value) is not int or value > MAX_REPORTED_TOKENS:
        return -1
    return value  # a negative one is -1 or below: not plain either


def _usage_of(usage: Any, provider: str, require_output: bool = True) -> Usage:
    """Validated :class:`Usage` from a provider's ``usage`` object. ``provider`` is
    ``"openai"`` (Chat Completions, legacy completions, embeddings),
    ``"openai-responses"`` or ``"anthropic"``. Raises UsageError, nothing else."""
    # Every request reads one usage: the common shape (plain counts, in range, details
    # plain or absent) is read here in a few steps; anything else (errors included)
    # by the general reading below.
    names = _FAST_NAMES.get(provider)
    if names is not None and type(usage) is dict:
        get = usage.get
        input_tokens = get(names[0])
        output_tokens = get(names[1])
        if (
            type(input_tokens) is int
            and type(output_tokens) is int
            and 0 <= input_tokens <= MAX_REPORTED_TOKENS
            and 0 <= output_tokens <= MAX_REPORTED_TOKENS - input_tokens
        ):
            cached = _fast_detail(get(names[2]), names[3])
            reasoning = _fast_detail(get(names[4]), names[5])
            if 0 <= cached <= input_tokens and 0 <= reasoning <= output_tokens:
                return _new_usage(Usage, (input_tokens, output_tokens, cached, reasoning, True, 0))  # type: ignore[no-any-return]
    return _usage_of_any(usage, provider, require_output)


def _usage_of_any(usage: Any, provider: str, require_output: bool) -> Usage:
    if not isinstance(usage, dict):
        raise UsageError(f"usage must be an object, got {type(usage).__name__}")
    written = 0  # OpenAI reports no cache writes (its cache is written for free)
    if provider == "openai":
        input_tokens = _count(usage.get("prompt_tokens"), "usage.prompt_tokens", required=True)
        output_tokens = _output(usage, "completion_tokens", "prompt_tokens", input_tokens, require_output)
        cached = _count(
            _details(usage, "prompt_tokens_details").get("cached_tokens"), "usage.prompt_tokens_details.cached_tokens"
        )
        reasoning = _count(
            _details(usage, "completion_tokens_details").get("reasoning_tokens"),
            "usage.completion_tokens_details.reasoning_tokens",
        )
    elif provider == "openai-responses":
        input_tokens = _count(usage.get("input_tokens"), "usage.input_tokens", required=True)
        output_tokens = _output(usage, "output_tokens", "input_tokens", input_tokens, require_output)
        cached = _count(
            _details(usage, "input_tokens_details").get("cached_tokens"), "usage.input_tokens_details.cached_tokens"
        )
        reasoning = _count(
            _details(usage, "output_tokens_details").get("reasoning_tokens"),
            "usage.output_tokens_details.reasoning_tokens",
        )
    else:
        # Anthropic: input_tokens excludes cache reads and writes; the total input is all three.
        plain = _count(usage.get("input_tokens"), "usage.input_tokens", required=True)
        cached = _count(usage.get("cache_read_input_tokens"), "usage.cache_read_input_tokens")
        written = _count(usage.get("cache_creation_input_tokens"), "usage.cache_creation_input_tokens")
        input_tokens = plain + cached + written
        output_tokens = _output(usage, "output_tokens", "input_tokens", plain, require_output)
        reasoning = _count(
            _details(usage, "output_tokens_details").get("thinking_tokens"),
            "usage.output_tokens_details.thinking_tokens",
        )
    if cached > input_tokens:
        raise UsageError(f"cached input tokens ({cached}) exceed the input tokens ({input_tokens})")
    if reasoning > output_tokens:
        raise UsageError(f"reasoning tokens ({reasoning}) exceed the output tokens ({output_tokens})")
    if input_tokens + output_tokens > MAX_REPORTED_TOKENS:
        raise UsageError("the reported tokens add up to more than 2**53")
    return _new_usage(Usage, (input_tokens, output_tokens, cached, reasoning, True, written))  # type: ignore[no-any-return]


def detect_provider(body: Dict[str, Any]) -> str:
    """``"openai"`` (Chat Completions), ``"openai-responses"`` or ``"anthropic"``, from the
    shape of a response body or stream event."""
    usage = body.get("usage")
    kind = body.get("type", "")
    obj = body.get("object", "")
    if kind == "message" or (isinstance(kind, str) and kind.startswith(("message_", "content_block"))):
        return "anthropic"
    if obj == "response" or (isinstance(kind, str) and kind.startswith("response.")):
        return "openai-responses"
    if isinstance(usage, dict) and "prompt_tokens" in usage:
        return "openai"
    if isinstance(obj, str) and obj.startswith("chat.completion"):
        return "openai"
    if isinstance(usage, dict) and "cache_read_input_tokens" in usage:
        return "anthropic"
    if isinstance(usage, dict) and "input_tokens" in usage:
        return "openai-responses"
    raise UsageError("cannot tell the provider from this body; pass provider=")


_PROVIDERS = ("openai", "openai-responses", "anthropic")


def _check_provider(provider: Optional[str]) -> Optional[str]:
    if provider is None:
        return None
    if provider == "openai-chat":
        return "openai"
    if provider not in _PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(_PROVIDERS)}, got {provider!r}")
    return provider


# Top-level members that only a generation (not an embeddings list) carries: its usage
# must then report the output too.
_GENERATION_KEYS = ("choices", "output", "content")


def extract_usage(body: Any, provider: Optional[str] = None) -> Usage:
    """The usage of a non-streamed response (a parsed JSON dict, or its bytes/str).

    OpenAI Chat Completions (``usage.prompt_tokens``...), Responses
    (``usage.input_tokens``...), embeddings (``prompt_tokens`` and ``total_tokens``) and
    Anthropic Messages (``usage.input_tokens`` plus cache reads and writes). The provider
    is detected from the body when not given. Every count must be an integer between 0
    and 2**53; a generation (a body with ``choices``, ``output`` or ``content``) must
    report its output. Anything else raises :class:`UsageError`, never another error.
    For raw response bytes (compressed or not, streamed or not) use
    :class:`~nexus_limits.tokens._response.UsageReader`.
    """
    provider = _check_provider(provider)
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise UsageError(f"the response is not valid JSON: {_short(str(error))}") from None
    if not isinstance(body, dict):
        raise UsageError(f"the response must be a JSON object, got {type(body).__name__}")
    provider = provider or detect_provider(body)
    if provider == "openai-responses" and isinstance(body.get("response"), dict):
        body = body["response"]
    usage = body.get("usage")
    if usage is None:
        raise UsageError("the response has no 'usage'")
    return _usage_of(usage, provider, require_output=any(k in body for k in _GENERATION_KEYS))


class UsageStream:
    """Reads usage from an uncompressed server-sent-event stream as it passes through.

    Feed it the raw bytes in whatever chunks they arrive (a chunk may end anywhere, even
    inside a UTF-8 character); it keeps at most one unfinished event (big events are
    scanned, not buffered).

    - OpenAI Chat Completions: the last chunk's ``usage`` (sent when the request has
      ``stream_options: {"include_usage": true}``).
    - OpenAI Responses: ``response.completed`` (or ``.incomplete``/``.failed``).
    - Anthropic: input counts from ``message_start``, output from the latest
      ``message_delta`` (cumulative: the latest wins, nothing is summed).

    ``usage`` is None until known. ``finish()`` returns the usage at the end of the
    stream and never raises; when the stream ended without its final usage (or its
    usage was malformed: counted in ``errors``), it falls back to counting the streamed
    text (tiktoken for OpenAI models, the Anthropic estimator otherwise), flagged
    ``exact=False``, with ``input_tokens`` from ``input_estimate`` (Anthropic: from
    ``message_start`` when it came). :class:`~nexus_limits.tokens._response.UsageReader`
    does the same for compressed streams and JSON bodies, and raises instead of
    guessing when the usage is malformed.
    """

    def __init__(self, provider: Optional[str] = None, model: Optional[str] = None, input_estimate: int = 0) -> None:
        from ._response import _SseCore

        self.model = model
        self.input_estimate = input_estimate
        self._core: _SseCore = _SseCore(_check_provider(provider), model, input_estimate, parse_all=True)

    @property
    def provider(self) -> Optional[str]:
        """The provider given, or the one detected from the events (None until known)."""
        return self._core.provider

    @property
    def done(self) -> bool:
        """The stream's end marker came (``[DONE]``, ``message_stop``, ``response.completed``)."""
        return self._core.done

    @property
    def errors(self) -> int:
        """Events that could not be read (not JSON, not an object, malformed usage)."""
        return self._core.errors

    @property
    def usage(self) -> Optional[Usage]:
        return self._core.usage

    def feed(self, chunk: bytes) -> Optional[Usage]:
        """Takes the next bytes of the stream; returns the usage once known."""
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"chunk must be bytes, got {type(chunk).__name__}")
        self._core.feed(bytes(chunk))
        return self._core.usage

    def finish(self) -> Usage:
        """The usage at the end of the stream: reported, or estimated from the text."""
        return self._core.finish(strict=False)
