"""Counting the tokens of text and of request bodies."""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any, Dict, NamedTuple, Optional, Tuple

from ._encodings import encoding_for_model, get_encoding
from ._images import anthropic_image_tokens, image_size, openai_image_tokens

__all__ = [
    "AnthropicEstimator",
    "OutputEstimate",
    "TokenCount",
    "anthropic_estimator",
    "count_request_tokens",
    "count_tokens",
]

# The encoding used for models we do not know: the counts are then estimates.
FALLBACK_ENCODING = "o200k_base"
# OpenAI cookbook (num_tokens_from_messages): every message costs 3 tokens of framing,
# a name 1 more, and every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# OpenAI cookbook (num_tokens_for_tools): per function, property and enum item.
_TOOL_CONSTANTS = {
    # encoding: (func_init, prop_init, prop_key, enum_init, enum_item, func_end)
    "o200k_base": (7, 3, 3, -3, 3, 12),
    "o200k_harmony": (7, 3, 3, -3, 3, 12),
    "cl100k_base": (10, 3, 3, -3, 3, 12),
}


class TokenCount(NamedTuple):
    """The tokens of a request. ``exact`` is True only when every part was counted with
    the model's own tiktoken encoding and OpenAI's documented rules; estimates (unknown
    models, Anthropic, images of unknown size, tool calls) say False."""

    tokens: int
    exact: bool
    provider: str
    model: Optional[str]


_model_encodings: Dict[Optional[str], Tuple[Any, bool]] = {}


def _encoding(model: Optional[str]) -> Tuple[Any, bool]:
    """(tiktoken encoding, known model) for an OpenAI model name."""
    cached = _model_encodings.get(model)
    if cached is None:
        name = encoding_for_model(model)
        cached = (get_encoding(name or FALLBACK_ENCODING), name is not None)
        _model_encodings[model] = cached
    return cached


def count_tokens(text: str, model: Optional[str] = "gpt-4o") -> int:
    """Tokens of ``text`` for an OpenAI ``model`` (exact with tiktoken, offline).

    Text is counted as ordinary text: special-token strings such as ``<|endoftext|>``
    are just characters and never raise. An unknown model is counted with o200k_base
    (an estimate; ``count_request_tokens`` flags it as one).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    encoding, _ = _encoding(model)
    return len(encoding.encode_ordinary(text))


class _Counter:
    """Adds up one request's tokens, remembering whether anything was estimated."""

    __slots__ = ("encoding", "exact", "tokens")

    def __init__(self, encoding: Any, exact: bool) -> None:
        self.encoding = encoding
        self.exact = exact
        self.tokens = 0

    def text(self, value: Any) -> None:
        if isinstance(value, str):
            self.tokens += len(self.encoding.encode_ordinary(value))
        elif value is not None:
            self.tokens += len(self.encoding.encode_ordinary(json.dumps(value, ensure_ascii=False)))
            self.exact = False

    def image(self, part: Dict[str, Any], url_key: str = "image_url") -> None:
        spec = part.get(url_key)
        detail = part.get("detail", "auto")
        if isinstance(spec, dict):
            detail = spec.get("detail", detail)
            spec = spec.get("url")
        tokens, exact = openai_image_tokens(image_size(spec) if isinstance(spec, str) else None, str(detail))
        self.tokens += tokens
        self.exact = self.exact and exact

    def content(self, content: Any) -> None:
        if isinstance(content, str) or content is None:
            self.text(content)
            return
        if not isinstance(content, list):
            self.text(content)
            return
        for part in content:
            if not isinstance(part, dict):
                self.text(part)
                continue
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                self.text(part.get("text", ""))
            elif kind in ("image_url", "input_image"):
                self.image(part)
            elif kind == "refusal":
                self.text(part.get("refusal", ""))
            else:  # audio, files...: no documented rule
                self.text({k: v for k, v in part.items() if k != "type"})
                self.exact = False

    def message(self, message: Any) -> None:
        if not isinstance(message, dict):
            raise ValueError(f"every message must be an object, got {type(message).__name__}")
        self.tokens += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                self.content(value)
            elif key == "tool_calls":
                for call in value or ():
                    fn = call.get("function", {}) if isinstance(call, dict) else {}
                    self.text(fn.get("name", ""))
                    self.text(fn.get("arguments", ""))
                self.exact = False
            elif key == "name":
                self.text(value)
                self.tokens += TOKENS_PER_NAME
            elif isinstance(value, str):
                self.text(value)

    def tools(self, tools: Any) -> None:
        if not tools:
            return
        constants = _TOOL_CONSTANTS.get(self.encoding.name)
        if constants is None:
            self.exact = False
            constants = _TOOL_CONSTANTS["cl100k_base"]
        func_init, prop_init, prop_key, enum_init, enum_item, func_end = constants
        for tool in tools:
            fn = tool.get("function", tool) if isinstance(tool, dict) else {}
            if not isinstance(fn, dict) or "name" not in fn:
                self.text(tool)
                continue
            self.tokens += func_init
            desc = str(fn.get("description", "")).removesuffix(".")
            self.text(f"{fn['name']}:{desc}")
            props = (fn.get("parameters") or {}).get("properties") or {}
            if props:
                self.tokens += prop_init
                for name, prop in props.items():
                    prop = prop if isinstance(prop, dict) else {}
                    self.tokens += prop_key
                    if "enum" in prop:
                        self.tokens += enum_init
                        for item in prop["enum"]:
                            self.tokens += enum_item
                            self.text(str(item))
                    pdesc = str(prop.get("description", "")).removesuffix(".")
                    self.text(f"{name}:{prop.get('type', '')}:{pdesc}")
        self.tokens += func_end


def _openai(body: Dict[str, Any], model: Optional[str]) -> TokenCount:
    encoding, known = _encoding(model)
    c = _Counter(encoding, known)
    if "messages" in body:  # Chat Completions
        messages = body["messages"]
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        for message in messages:
            c.message(message)
        c.tokens += REPLY_PRIMING
        c.tools(body.get("tools") or [{"function": f} for f in body.get("functions") or ()])
    elif "input" in body and not (model or "").startswith("text-embedding"):  # Responses API
        c.exact = False  # the framing of Responses items is not documented; chat's is used
        if body.get("instructions"):
            c.message({"role": "system", "content": body["instructions"]})
        items = body["input"]
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list):
            raise ValueError("'input' must be a string or a list")
        for item in items:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                c.message({"content": item.get("output", "")})
            elif isinstance(item, dict) and item.get("type") == "function_call":
                c.message({"content": f"{item.get('name', '')}{item.get('arguments', '')}"})
            else:
                c.message(item if isinstance(item, dict) else {"content": item})
        c.tokens += REPLY_PRIMING
        c.tools(body.get("tools"))
    elif "input" in body or "prompt" in body:  # embeddings, legacy completions
        value = body.get("input", body.get("prompt"))
        for piece in value if isinstance(value, list) else [value]:
            if isinstance(piece, list):  # already tokens
                c.tokens += len(piece)
            else:
                c.text(piece)
    else:
        raise ValueError("an OpenAI request body needs 'messages', 'input' or 'prompt'")
    return TokenCount(c.tokens, c.exact, "openai", model)


_FAMILY = re.compile(r"(-\d{8}|-latest|@\d{8})$")


def model_family(model: Optional[str]) -> str:
    """``claude-3-5-sonnet-20241022`` -> ``claude-3-5-sonnet``."""
    return _FAMILY.sub("", (model or "").strip().lower()) or "default"


class AnthropicEstimator:
    """Estimates Claude request tokens, and learns from the real counts.

    No tokenizer is public for Claude 3 and later, so the estimate is
    ``ceil((chars / 3.5 + 4 per message + 3 + tools) * factor)``: text characters
    (tool definitions and tool inputs as JSON) over 3.5, 4 tokens of framing per message
    and 3 per request, 346 tokens when tools are defined (Anthropic's tool-use system
    prompt), images by Anthropic's rule (width x height / 750). ``factor`` starts at
    ``initial_factor`` for every model family and moves towards the ratio of actual to
    estimated input tokens each time usage is observed (an exponential moving average
    with weight ``alpha``), so estimates converge on what the model really counts.
    """

    CHARS_PER_TOKEN = 3.5
    PER_MESSAGE = 4
    PER_REQUEST = 3
    TOOLS_OVERHEAD = 346

    def __init__(self, initial_factor: float = 1.0, alpha: float = 0.1) -> None:
        if not (math.isfinite(initial_factor) and initial_factor > 0):
            raise ValueError(f"initial_factor must be a positive number, got {initial_factor!r}")
        if not (0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.initial_factor = initial_factor
        self.alpha = alpha
        self._factors: Dict[str, float] = {}
        self._samples: Dict[str, int] = {}
        self._lock = threading.Lock()

    def factor(self, model: Optional[str]) -> float:
        return self._factors.get(model_family(model), self.initial_factor)

    def samples(self, model: Optional[str]) -> int:
        return self._samples.get(model_family(model), 0)

    def base(self, body: Dict[str, Any]) -> int:
        """The uncalibrated estimate of a Messages body."""
        chars = 0
        images = 0
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("an Anthropic request body needs a 'messages' list")

        def add(content: Any) -> None:
            nonlocal chars, images
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for block in content:
                    if isinstance(block, dict) and block.get("type") == "image":
                        source = block.get("source") or {}
                        size = None
                        if source.get("type") == "base64":
                            size = image_size(f"data:{source.get('media_type', '')};base64,{source.get('data', '')}")
                        images += anthropic_image_tokens(size)
                    elif isinstance(block, dict) and block.get("type") == "text":
                        chars += len(str(block.get("text", "")))
                    elif isinstance(block, dict) and block.get("type") == "tool_result":
                        add(block.get("content"))
                    elif isinstance(block, dict):
                        chars += len(json.dumps({k: v for k, v in block.items() if k != "type"}, ensure_ascii=False))
                    else:
                        add(block)
            elif content is not None:
                chars += len(json.dumps(content, ensure_ascii=False))

        add(body.get("system"))
        for message in messages:
            if not isinstance(message, dict):
                raise ValueError(f"every message must be an object, got {type(message).__name__}")
            add(message.get("content"))
        tools = body.get("tools") or []
        if tools:
            chars += len(json.dumps(tools, ensure_ascii=False))
        overhead = self.PER_MESSAGE * len(messages) + self.PER_REQUEST + (self.TOOLS_OVERHEAD if tools else 0)
        return math.ceil(chars / self.CHARS_PER_TOKEN) + overhead + images

    def estimate(self, body: Dict[str, Any], model: Optional[str] = None) -> int:
        model = model or body.get("model")
        return math.ceil(self.base(body) * self.factor(model))

    def observe(self, model: Optional[str], base_estimate: int, actual_input_tokens: int) -> float:
        """Learn from one settled request: ``base_estimate`` is ``base(body)``, the other
        the input tokens the response reported. Returns the family's new factor."""
        if base_estimate <= 0 or actual_input_tokens < 0:
            return self.factor(model)
        ratio = min(max(actual_input_tokens / base_estimate, 0.25), 4.0)
        family = model_family(model)
        with self._lock:
            n = self._samples.get(family, 0)
            old = self._factors.get(family, self.initial_factor)
            # The first few samples weigh more, so a fresh family converges quickly.
            weight = max(self.alpha, 1.0 / (n + 1))
            self._factors[family] = old + weight * (ratio - old)
            self._samples[family] = n + 1
            return self._factors[family]


anthropic_estimator = AnthropicEstimator()


def count_request_tokens(body: Any, provider: str = "openai", model: Optional[str] = None) -> TokenCount:
    """Input tokens of a request body: OpenAI Chat Completions, Responses, Embeddings and
    Completions (exact with tiktoken where OpenAI documents the rules), or Anthropic
    Messages (an estimate, calibrated by :data:`anthropic_estimator`)."""
    if not isinstance(body, dict):
        raise TypeError(f"body must be a dict (the parsed JSON request), got {type(body).__name__}")
    model = model or body.get("model")
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    if provider == "openai":
        return _openai(body, model)
    if provider == "anthropic":
        return TokenCount(anthropic_estimator.estimate(body, model), False, "anthropic", model)
    raise ValueError(f"provider must be 'openai' or 'anthropic', got {provider!r}")


class OutputEstimate:
    """How many output tokens to reserve for a request before it runs.

    The request's own cap when it has one (``max_completion_tokens``, ``max_tokens``,
    ``max_output_tokens``); otherwise the default for its model — the longest matching
    prefix in ``per_model`` — or ``default``.

    >>> est = OutputEstimate(default=1024, per_model={"gpt-4o-mini": 512})
    >>> est({"model": "gpt-4o-mini-2024-07-18", "messages": []})
    512
    >>> est({"model": "gpt-4o", "max_tokens": 50})
    50
    """

    CAPS = ("max_completion_tokens", "max_output_tokens", "max_tokens")

    def __init__(self, default: int = 1024, per_model: Optional[Dict[str, int]] = None) -> None:
        for name, value in [("default", default), *((f"per_model[{k!r}]", v) for k, v in (per_model or {}).items())]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.default = default
        self.per_model = dict(sorted((per_model or {}).items(), key=lambda kv: -len(kv[0])))

    def __call__(self, body: Dict[str, Any]) -> int:
        if not isinstance(body, dict):
            raise TypeError(f"body must be a dict, got {type(body).__name__}")
        for cap in self.CAPS:
            value = body.get(cap)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{cap} must be a non-negative integer, got {value!r}")
                return value
        model = str(body.get("model") or "").lower()
        for prefix, value in self.per_model.items():
            if model.startswith(prefix.lower()):
                return value
        return self.default
