"""Token usage from provider responses: JSON bodies and server-sent-event streams."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

__all__ = ["Usage", "UsageError", "UsageStream", "detect_provider", "extract_usage"]


class UsageError(ValueError):
    """A response body that carries no usage we can read."""


class Usage(NamedTuple):
    """Tokens a call really used. ``input_tokens`` includes cached input
    (``cached_input_tokens`` says how much of it was read from cache); ``exact`` is
    False when the numbers were estimated (a stream that ended without usage)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    exact: bool = True

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _int(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise UsageError(f"{what} must be a non-negative number, got {value!r}")
    return int(value)


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


def _usage_of(usage: Dict[str, Any], provider: str) -> Usage:
    if not isinstance(usage, dict):
        raise UsageError(f"usage must be an object, got {type(usage).__name__}")
    if provider == "openai":
        details = usage.get("prompt_tokens_details") or {}
        out_details = usage.get("completion_tokens_details") or {}
        return Usage(
            _int(usage.get("prompt_tokens"), "usage.prompt_tokens"),
            _int(usage.get("completion_tokens"), "usage.completion_tokens"),
            _int(details.get("cached_tokens"), "usage.prompt_tokens_details.cached_tokens"),
            _int(out_details.get("reasoning_tokens"), "usage.completion_tokens_details.reasoning_tokens"),
        )
    if provider == "openai-responses":
        details = usage.get("input_tokens_details") or {}
        out_details = usage.get("output_tokens_details") or {}
        return Usage(
            _int(usage.get("input_tokens"), "usage.input_tokens"),
            _int(usage.get("output_tokens"), "usage.output_tokens"),
            _int(details.get("cached_tokens"), "usage.input_tokens_details.cached_tokens"),
            _int(out_details.get("reasoning_tokens"), "usage.output_tokens_details.reasoning_tokens"),
        )
    # Anthropic: input_tokens excludes cache reads and writes; the total input is all three.
    read = _int(usage.get("cache_read_input_tokens"), "usage.cache_read_input_tokens")
    written = _int(usage.get("cache_creation_input_tokens"), "usage.cache_creation_input_tokens")
    return Usage(
        _int(usage.get("input_tokens"), "usage.input_tokens") + read + written,
        _int(usage.get("output_tokens"), "usage.output_tokens"),
        read,
    )


def extract_usage(body: Any, provider: Optional[str] = None) -> Usage:
    """The usage of a non-streamed response (a parsed JSON dict, or its bytes/str).

    OpenAI Chat Completions (``usage.prompt_tokens``...), Responses
    (``usage.input_tokens``...) and Anthropic Messages (``usage.input_tokens`` plus cache
    reads and writes). The provider is detected from the body when not given.
    """
    provider = _check_provider(provider)
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError as error:
            raise UsageError(f"the response is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise UsageError(f"the response must be a JSON object, got {type(body).__name__}")
    provider = provider or detect_provider(body)
    if provider == "openai-responses" and isinstance(body.get("response"), dict):
        body = body["response"]
    usage = body.get("usage")
    if usage is None:
        raise UsageError("the response has no 'usage'")
    return _usage_of(usage, provider)


class UsageStream:
    """Reads usage from a server-sent-event stream as it passes through.

    Feed it the raw bytes in whatever chunks they arrive (a chunk may end anywhere, even
    inside a UTF-8 character); it never buffers more than one unfinished event.

    - OpenAI Chat Completions: the last chunk's ``usage`` (sent when the request has
      ``stream_options: {"include_usage": true}``).
    - OpenAI Responses: ``response.completed`` (or ``.incomplete``/``.failed``).
    - Anthropic: input counts from ``message_start``, output from the latest
      ``message_delta`` (cumulative: the latest wins, nothing is summed).

    ``usage`` is None until known. ``finish()`` returns the usage at the end of the
    stream; when the stream ended without any, it falls back to counting the streamed
    text (tiktoken for OpenAI models, the Anthropic estimator otherwise), flagged
    ``exact=False``, with ``input_tokens`` from ``input_estimate``.
    """

    def __init__(self, provider: Optional[str] = None, model: Optional[str] = None, input_estimate: int = 0) -> None:
        self.provider = _check_provider(provider)
        self.model = model
        self.input_estimate = input_estimate
        self.done = False
        self.errors = 0
        self._buffer = b""
        self._text: List[str] = []
        self._usage: Optional[Usage] = None
        self._anthropic: Dict[str, int] = {}

    @property
    def usage(self) -> Optional[Usage]:
        return self._usage

    def feed(self, chunk: bytes) -> Optional[Usage]:
        """Takes the next bytes of the stream; returns the usage once known."""
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"chunk must be bytes, got {type(chunk).__name__}")
        self._buffer += bytes(chunk)
        while True:
            cut = _event_end(self._buffer)
            if cut is None:
                break
            raw, self._buffer = self._buffer[: cut[0]], self._buffer[cut[1] :]
            self._event(raw)
        return self._usage

    def _event(self, raw: bytes) -> None:
        data_lines = []
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("data:"):
                data_lines.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
        if not data_lines:
            return
        data = "\n".join(data_lines)
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            self.errors += 1
            return
        if not isinstance(event, dict):
            self.errors += 1
            return
        if self.provider is None:
            try:
                self.provider = detect_provider(event)
            except UsageError:
                return
        try:
            self._read(event)
        except (UsageError, AttributeError, TypeError):
            self.errors += 1

    def _read(self, event: Dict[str, Any]) -> None:
        if self.provider == "openai":
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    self._text.append(delta["content"])
            if isinstance(event.get("usage"), dict):
                self._usage = _usage_of(event["usage"], "openai")
        elif self.provider == "openai-responses":
            kind = event.get("type")
            if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
                self._text.append(event["delta"])
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                response = event.get("response") or {}
                if isinstance(response.get("usage"), dict):
                    self._usage = _usage_of(response["usage"], "openai-responses")
                self.done = True
        else:
            kind = event.get("type")
            if kind == "message_start":
                usage = (event.get("message") or {}).get("usage") or {}
                self._anthropic = {k: v for k, v in usage.items() if isinstance(v, int)}
                self._usage = _usage_of(self._anthropic, "anthropic")
            elif kind == "message_delta":
                # Cumulative counts: the latest replaces, never adds.
                self._anthropic.update({k: v for k, v in (event.get("usage") or {}).items() if isinstance(v, int)})
                self._usage = _usage_of(self._anthropic, "anthropic")
            elif kind == "content_block_delta":
                delta = event.get("delta") or {}
                if isinstance(delta.get("text"), str):
                    self._text.append(delta["text"])
            elif kind == "message_stop":
                self.done = True

    def finish(self) -> Usage:
        """The usage at the end of the stream: reported, or estimated from the text."""
        if self._buffer.strip():
            self._event(self._buffer)
            self._buffer = b""
        if self._usage is not None:
            return self._usage
        text = "".join(self._text)
        if self.provider == "anthropic":
            from ._count import anthropic_estimator

            output = math.ceil(len(text) / anthropic_estimator.CHARS_PER_TOKEN * anthropic_estimator.factor(self.model))
        else:
            from ._count import count_tokens

            output = count_tokens(text, self.model)
        return Usage(self.input_estimate, output, exact=False)


def _event_end(buffer: bytes) -> Optional[Tuple[int, int]]:
    """(end of the first complete event, start of the next) in an SSE byte buffer."""
    best = None
    for sep in (b"\r\n\r\n", b"\n\n", b"\r\r"):
        i = buffer.find(sep)
        if i != -1 and (best is None or i < best[0]):
            best = (i, i + len(sep))
    return best
