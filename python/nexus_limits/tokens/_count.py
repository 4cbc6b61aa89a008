"""Counting the tokens of text and of request bodies."""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ._encodings import encoding_for_model, get_encoding
from ._images import anthropic_image_tokens, image_size, openai_image_tokens

__all__ = [
    "MAX_EXACT_CHARS",
    "MAX_TOKENS",
    "AnthropicEstimator",
    "OutputEstimate",
    "RequestBodyError",
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
    models, Anthropic, images of unknown size, tool calls, text beyond
    ``MAX_EXACT_CHARS``) say False."""

    tokens: int
    exact: bool
    provider: str
    model: Optional[str]


class RequestBodyError(ValueError):
    """A request body whose shape cannot be read: a field of the wrong type (``messages``
    not a list, a content part that is not an object, ``model`` not a string...) or a
    body nested too deeply.

    ``field`` names the part, as a path into the body (``"messages[2].content[0].text"``;
    ``"body"`` for the whole); ``str(error)`` is a one-line sentence naming it, fit for a
    400 answer."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _wrong(field: str, expected: str, value: Any) -> RequestBodyError:
    return RequestBodyError(field, f"'{field}' must be {expected}, got {_kind(value)}")


def _optional_str(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _wrong(field, "a string", value)
    return value


# How much text one request may have counted exactly with tiktoken (about 0.3 s of
# encoding on one core); the rest is extrapolated at the rate seen so far, so the time
# spent counting is bounded whatever the body.
MAX_EXACT_CHARS = 1_000_000
# The least tokens per character assumed when extrapolating (English runs about 0.25).
MIN_TOKENS_PER_CHAR = 0.25
# Longer text is encoded in pieces of about this many characters: tiktoken releases the
# GIL while it encodes, but holds it to build the list of tokens it returns, so one call
# on a whole 5 MB text would stop every other thread for 0.1 s.
PIECE_CHARS = 65_536


def _cut(text: str, start: int, end: int) -> Optional[int]:
    """A place to split ``text`` in the second half of ``(start, end)`` that changes no
    token: before a single space between two non-space characters (every encoding's
    pre-tokeniser starts a new piece there). None when there is none."""
    low = start + (end - start) // 2
    i = text.rfind(" ", low, end)
    while i > low:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", low, i)
    return None


def _encoded_length(encoding: Any, text: str, piece: Optional[int] = None) -> Tuple[int, bool]:
    """(tokens, exact) of ``text``, encoded ``piece`` characters (``PIECE_CHARS``) at a
    time. Not exact only when a piece had to be cut where no space allowed it."""
    piece = piece or PIECE_CHARS
    if len(text) <= piece:
        return len(encoding.encode_ordinary(text)), True
    tokens = 0
    exact = True
    start = 0
    while start < len(text):
        end = min(start + piece, len(text))
        if end < len(text):
            cut = _cut(text, start, end)
            if cut is None:
                exact = False
            else:
                end = cut
        tokens += len(encoding.encode_ordinary(text[start:end]))
        start = end
    return tokens, exact


# Model name -> (encoding, known model), for the few names real traffic uses. A client
# chooses the name, so the table is bounded: past _ENCODINGS_MAX names (or for a long
# name), the answer is worked out again each time.
_ENCODINGS: Dict[str, Tuple[Any, bool]] = {}
_ENCODINGS_MAX = 256
_ENCODINGS_LOCK = threading.Lock()


def _encoding(model: Optional[str]) -> Tuple[Any, bool]:
    """(tiktoken encoding, known model) for an OpenAI model name. The encodings
    themselves are built once each."""
    found = _ENCODINGS.get(model) if type(model) is str else None
    if found is not None:
        return found
    name = encoding_for_model(model)
    found = (get_encoding(name or FALLBACK_ENCODING), name is not None)
    if type(model) is str and len(model) <= 256 and len(_ENCODINGS) < _ENCODINGS_MAX:
        with _ENCODINGS_LOCK:
            if len(_ENCODINGS) < _ENCODINGS_MAX:
                _ENCODINGS[model] = found
    return found


# The roles messages have, whose tokens are counted once per encoding (a message's role
# is one of these in nearly every request).
_ROLES = ("system", "user", "assistant", "developer", "tool", "function")
_ROLE_TOKENS: Dict[str, Dict[str, int]] = {}


def _role_tokens(encoding: Any) -> Dict[str, int]:
    roles = _ROLE_TOKENS.get(encoding.name)
    if roles is None:
        roles = _ROLE_TOKENS[encoding.name] = {role: len(encoding.encode_ordinary(role)) for role in _ROLES}
    return roles


def count_tokens(text: str, model: Optional[str] = "gpt-4o") -> int:
    """Tokens of ``text`` for an OpenAI ``model`` (exact with tiktoken, offline).

    Text is counted as ordinary text: special-token strings such as ``<|endoftext|>``
    are just characters and never raise. An unknown model is counted with o200k_base
    (an estimate; ``count_request_tokens`` flags it as one).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    encoding, _ = _encoding(model)
    return len(encoding.encode_ordinary(text))


class _Counter:
    """Adds up one request's tokens, remembering whether anything was estimated.

    At most ``MAX_EXACT_CHARS`` characters are encoded; longer text is extrapolated."""

    __slots__ = ("budget", "encoding", "exact", "seen_chars", "seen_tokens", "tokens")

    def __init__(self, encoding: Any, exact: bool) -> None:
        self.encoding = encoding
        self.exact = exact
        self.tokens = 0
        self.budget = MAX_EXACT_CHARS
        self.seen_chars = 0
        self.seen_tokens = 0

    def text(self, value: str) -> None:
        if not value:
            return
        n = len(value)
        if n <= self.budget and n <= PIECE_CHARS:  # within budget, in one piece: exact
            tokens = len(self.encoding.encode_ordinary(value))
            self.tokens += tokens
            self.budget -= n
            self.seen_chars += n
            self.seen_tokens += tokens
            return
        head = value if len(value) <= self.budget else value[: self.budget]
        if head:
            n, exact = _encoded_length(self.encoding, head)
            self.exact = self.exact and exact
            self.tokens += n
            self.budget -= len(head)
            self.seen_chars += len(head)
            self.seen_tokens += n
        rest = len(value) - len(head)
        if rest:
            rate = max(self.seen_tokens / self.seen_chars if self.seen_chars else 0.0, MIN_TOKENS_PER_CHAR)
            self.tokens += math.ceil(rest * rate)
            self.exact = False

    def json(self, value: Any) -> None:
        """Something without a documented rule, counted as its JSON text: an estimate."""
        if value is not None:
            self.text(json.dumps(value, ensure_ascii=False))
            self.exact = False

    def image(self, part: Dict[str, Any], field: str) -> None:
        spec = part.get("image_url")
        detail = part.get("detail")
        url: Any = spec
        if isinstance(spec, dict):
            url = spec.get("url")
            detail = spec.get("detail", detail)
            field = f"{field}.image_url"
        elif spec is not None and not isinstance(spec, str):
            raise _wrong(f"{field}.image_url", "a string or an object", spec)
        if url is not None and not isinstance(url, str):
            raise _wrong(f"{field}.url", "a string", url)
        detail = _optional_str(detail, f"{field}.detail") or "auto"
        tokens, exact = openai_image_tokens(image_size(url) if url else None, detail)
        self.tokens += tokens
        self.exact = self.exact and exact

    def content(self, content: Any, field: str) -> None:
        if content is None:
            return
        if isinstance(content, str):
            self.text(content)
            return
        if not isinstance(content, list):
            raise _wrong(field, "a string, an array of content parts or null", content)
        for i, part in enumerate(content):
            where = f"{field}[{i}]"
            if not isinstance(part, dict):
                raise _wrong(where, "an object (a content part)", part)
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                self.text(_optional_str(part.get("text"), f"{where}.text"))
            elif kind in ("image_url", "input_image"):
                self.image(part, where)
            elif kind == "refusal":
                self.text(_optional_str(part.get("refusal"), f"{where}.refusal"))
            else:  # audio, files...: no documented rule
                self.json({k: v for k, v in part.items() if k != "type"})

    def tool_calls(self, calls: Any, field: str) -> None:
        if calls is None:
            return
        if not isinstance(calls, list):
            raise _wrong(field, "an array", calls)
        for i, call in enumerate(calls):
            if not isinstance(call, dict):
                raise _wrong(f"{field}[{i}]", "an object", call)
            fn = call.get("function")
            if fn is None:
                self.json(call)
                continue
            if not isinstance(fn, dict):
                raise _wrong(f"{field}[{i}].function", "an object", fn)
            self.text(_optional_str(fn.get("name"), f"{field}[{i}].function.name"))
            self.text(_optional_str(fn.get("arguments"), f"{field}[{i}].function.arguments"))
        self.exact = False

    def plain_message(self, message: Dict[str, Any], roles: Dict[str, int]) -> bool:
        """Counts a message that is only a known ``role`` and a string ``content`` that
        fits the budget in one piece (most messages), as :meth:`message` would; False
        (nothing counted) for any other message."""
        if len(message) != 2:
            return False
        role = message.get("role")
        content = message.get("content")
        if type(role) is not str or type(content) is not str:
            return False
        role_tokens = roles.get(role)
        n = len(content)
        if role_tokens is None or n > PIECE_CHARS or n + len(role) > self.budget:
            return False
        tokens = role_tokens + (len(self.encoding.encode_ordinary(content)) if n else 0)
        self.tokens += TOKENS_PER_MESSAGE + tokens
        self.budget -= n + len(role)
        self.seen_chars += n + len(role)
        self.seen_tokens += tokens
        return True

    def message(self, message: Any, field: str) -> None:
        if not isinstance(message, dict):
            raise _wrong(field, "an object (a message)", message)
        self.tokens += TOKENS_PER_MESSAGE
        for key, value in message.items():
            where = f"{field}.{key}"
            if key == "content":
                self.content(value, where)
            elif key == "tool_calls":
                self.tool_calls(value, where)
            elif key == "name":
                self.text(_optional_str(value, where))
                self.tokens += TOKENS_PER_NAME
            elif key == "role":
                self.text(_optional_str(value, where))
            elif isinstance(value, str):
                self.text(value)
            else:
                self.json(value)

    def tools(self, tools: Any, field: str) -> None:
        if tools is None:
            return
        if not isinstance(tools, list):
            raise _wrong(field, "an array", tools)
        if not tools:
            return
        constants = _TOOL_CONSTANTS.get(self.encoding.name)
        if constants is None:
            self.exact = False
            constants = _TOOL_CONSTANTS["cl100k_base"]
        func_init, prop_init, prop_key, enum_init, enum_item, func_end = constants
        for i, tool in enumerate(tools):
            where = f"{field}[{i}]"
            if not isinstance(tool, dict):
                raise _wrong(where, "an object (a tool)", tool)
            fn = tool.get("function", tool)
            if not isinstance(fn, dict):
                raise _wrong(f"{where}.function", "an object", fn)
            if "name" not in fn:  # a built-in tool (web search...): no documented rule
                self.json(tool)
                continue
            name = _optional_str(fn.get("name"), f"{where}.name")
            self.tokens += func_init
            desc = _optional_str(fn.get("description"), f"{where}.description").removesuffix(".")
            self.text(f"{name}:{desc}")
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            if params is not None and not isinstance(params, dict):
                self.json(params)  # not a JSON schema: counted as text
            if isinstance(props, dict) and props:
                self.tokens += prop_init
                for pname, prop in props.items():
                    self.tokens += prop_key
                    if not isinstance(prop, dict):
                        self.json({pname: prop})
                        continue
                    enum = prop.get("enum")
                    if isinstance(enum, list):
                        self.tokens += enum_init
                        for item in enum:
                            self.tokens += enum_item
                            self.text(item if isinstance(item, str) else json.dumps(item, ensure_ascii=False))
                    elif enum is not None:
                        self.json(enum)
                    ptype = prop.get("type", "")
                    ptype = ptype if isinstance(ptype, str) else json.dumps(ptype, ensure_ascii=False)
                    pdesc = prop.get("description", "")
                    pdesc = pdesc if isinstance(pdesc, str) else json.dumps(pdesc, ensure_ascii=False)
                    self.text(f"{pname}:{ptype}:{pdesc.removesuffix('.')}")
            elif props is not None and not isinstance(props, dict):
                self.json(props)
        self.tokens += func_end


def _prompt(c: _Counter, value: Any, field: str) -> None:
    """Embeddings' ``input`` or Completions' ``prompt``: text, token ids, or arrays of them."""
    if isinstance(value, str):
        c.text(value)
        return
    if not isinstance(value, list):
        raise _wrong(field, "a string or an array", value)
    for i, piece in enumerate(value):
        if isinstance(piece, str):
            c.text(piece)
        elif isinstance(piece, int) and not isinstance(piece, bool):
            c.tokens += 1  # already a token id
        elif isinstance(piece, list):
            for j, token in enumerate(piece):
                if isinstance(token, bool) or not isinstance(token, int):
                    raise _wrong(f"{field}[{i}][{j}]", "an integer (a token id)", token)
            c.tokens += len(piece)
        else:
            raise _wrong(f"{field}[{i}]", "a string, a token id or an array of token ids", piece)


def _openai(body: Dict[str, Any], model: Optional[str]) -> TokenCount:
    encoding, known = _encoding(model)
    c = _Counter(encoding, known)
    if "messages" in body:  # Chat Completions
        messages = body["messages"]
        if not isinstance(messages, list):
            raise _wrong("messages", "a list", messages)
        roles = _role_tokens(encoding)
        for i, message in enumerate(messages):
            if type(message) is not dict or not c.plain_message(message, roles):
                c.message(message, f"messages[{i}]")
        c.tokens += REPLY_PRIMING
        functions = body.get("functions")
        if functions is not None and not isinstance(functions, list):
            raise _wrong("functions", "an array", functions)
        tools = body.get("tools")
        if tools is None and functions:
            for i, fn in enumerate(functions):
                if not isinstance(fn, dict):
                    raise _wrong(f"functions[{i}]", "an object", fn)
            tools = [{"function": f} for f in functions]
        if tools is not None:
            c.tools(tools, "tools")
    elif "input" in body and not (model or "").startswith("text-embedding"):  # Responses API
        c.exact = False  # the framing of Responses items is not documented; chat's is used
        instructions = _optional_str(body.get("instructions"), "instructions")
        if instructions:
            c.message({"role": "system", "content": instructions}, "instructions")
        items = body["input"]
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list):
            raise _wrong("input", "a string or a list", items)
        for i, item in enumerate(items):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise _wrong(where, "an object (an input item)", item)
            kind = item.get("type")
            if kind == "function_call_output":
                output = item.get("output")
                c.tokens += TOKENS_PER_MESSAGE
                if output is None or isinstance(output, (str, list)):
                    c.content(output, f"{where}.output")
                else:
                    c.json(output)
            elif kind == "function_call":
                name = _optional_str(item.get("name"), f"{where}.name")
                arguments = _optional_str(item.get("arguments"), f"{where}.arguments")
                c.message({"content": f"{name}{arguments}"}, where)
            else:
                c.message(item, where)
        c.tokens += REPLY_PRIMING
        c.tools(body.get("tools"), "tools")
    elif "input" in body or "prompt" in body:  # embeddings, legacy completions
        field = "input" if "input" in body else "prompt"
        _prompt(c, body[field], field)
    else:
        raise RequestBodyError("body", "an OpenAI request body needs 'messages', 'input' or 'prompt'")
    return _new_count(TokenCount, (c.tokens, c.exact, "openai", model))  # type: ignore[no-any-return]


# Builds a TokenCount without the Python-level __new__ of a NamedTuple (the same object).
_new_count: Any = tuple.__new__


_FAMILY = re.compile(r"(-\d{8}|-latest|@\d{8})$")
# Longer model names share one family: the calibration tables are keyed by family, and
# a client chooses the name.
MAX_FAMILY_LENGTH = 100


def model_family(model: Optional[str]) -> str:
    """``claude-3-5-sonnet-20241022`` -> ``claude-3-5-sonnet``. Names longer than
    ``MAX_FAMILY_LENGTH`` characters are all the family ``"other"``."""
    if model is not None and len(model) > MAX_FAMILY_LENGTH * 2:
        return "other"
    family = _FAMILY.sub("", (model or "").strip().lower()) or "default"
    return family if len(family) <= MAX_FAMILY_LENGTH else "other"


class AnthropicEstimator:
    """Estimates Claude request tokens, and learns from the real counts.

    No tokenizer is public for Claude 3 and later, so the estimate is
    ``ceil((chars / 3.5 + 4 per message + 3 + tools) * factor)``: text characters
    (tool definitions and tool inputs as JSON) over 3.5, 4 tokens of framing per message
    and 3 per request, 346 tokens when tools are defined (Anthropic's tool-use system
    prompt), images by Anthropic's rule (width x height / 750).

    Calibration. Every model family has a shared ``factor``, starting at
    ``initial_factor``, and every key seen has a factor of its own for that family:

    - ``observe(model, base, actual)`` (no key: a caller you trust) moves the shared
      factor towards ``actual / base`` (a moving average with weight ``alpha``; the
      first samples weigh more, so a fresh family converges quickly);
    - ``observe(model, base, actual, key=k)`` (what the LLM middleware does with the
      usage of ``k``'s responses) moves ``k``'s own factor the same way, kept within
      ``key_spread`` times the shared one either side, and moves the shared factor by
      at most ``max_step`` per sample and ``max_shift`` in all. However absurd the usage
      reported for one key, the estimates of every other key move by at most
      ``max_shift`` (times the base estimate).

    ``estimate(body, key=k)`` uses ``k``'s factor once it has one, else the shared one.
    Every ratio is clipped to [0.25, 4]. Memory is bounded: ``max_families`` families
    and ``max_keys`` (family, key) factors, the least recently used dropped first (a key
    dropped this way starts again with its own budget of ``max_shift``).
    """

    CHARS_PER_TOKEN = 3.5
    PER_MESSAGE = 4
    PER_REQUEST = 3
    TOOLS_OVERHEAD = 346
    MIN_RATIO = 0.25
    MAX_RATIO = 4.0

    def __init__(
        self,
        initial_factor: float = 1.0,
        alpha: float = 0.1,
        *,
        max_step: float = 0.01,
        max_shift: float = 0.05,
        key_spread: float = 2.0,
        max_keys: int = 10_000,
        max_families: int = 256,
    ) -> None:
        for name, value in (("initial_factor", initial_factor), ("key_spread", key_spread)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if key_spread < 1:
            raise ValueError(f"key_spread must be at least 1, got {key_spread!r}")
        if not isinstance(alpha, (int, float)) or not (0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        for name, value in (("max_step", max_step), ("max_shift", max_shift)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, count in (("max_keys", max_keys), ("max_families", max_families)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an int >= 1, got {count!r}")
        self.initial_factor = float(initial_factor)
        self.alpha = float(alpha)
        self.max_step = float(max_step)
        self.max_shift = float(max_shift)
        self.key_spread = float(key_spread)
        self.max_keys = max_keys
        self.max_families = max_families
        # family -> [factor, samples]
        self._families: OrderedDict[str, List[float]] = OrderedDict()
        # (family, key) -> [factor, samples, shift of the shared factor this key caused]
        self._keys: OrderedDict[Tuple[str, Any], List[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _bounded(self, own: float, shared: float) -> float:
        return min(max(own, shared / self.key_spread), shared * self.key_spread)

    def factor(self, model: Optional[str], key: Any = None) -> float:
        """The factor estimates use: ``key``'s own when it has one, else the family's."""
        family = model_family(model)
        with self._lock:
            entry = self._families.get(family)
            shared = entry[0] if entry is not None else self.initial_factor
            if key is None:
                return shared
            own = self._keys.get((family, key))
            return shared if own is None else self._bounded(own[0], shared)

    def samples(self, model: Optional[str], key: Any = None) -> int:
        """Observations learnt for the family (or for ``key`` on it)."""
        family = model_family(model)
        with self._lock:
            entry = self._families.get(family) if key is None else self._keys.get((family, key))
            return 0 if entry is None else int(entry[1])

    def base(self, body: Dict[str, Any]) -> int:
        """The uncalibrated estimate of a Messages body. Raises :class:`RequestBodyError`
        for a body whose shape is wrong (``messages`` not a list of objects...)."""
        if not isinstance(body, dict):
            raise TypeError(f"body must be a dict (the parsed JSON request), got {type(body).__name__}")
        chars = 0
        images = 0
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise RequestBodyError(
                "messages", f"an Anthropic request body needs a 'messages' list, got {_kind(messages)}"
            )

        def add(content: Any, field: str) -> None:
            nonlocal chars, images
            if content is None:
                return
            if isinstance(content, str):
                chars += len(content)
                return
            if not isinstance(content, list):
                raise _wrong(field, "a string or an array of content blocks", content)
            for i, block in enumerate(content):
                where = f"{field}[{i}]"
                if not isinstance(block, dict):
                    raise _wrong(where, "an object (a content block)", block)
                kind = block.get("type")
                if kind == "image":
                    source = block.get("source")
                    if source is not None and not isinstance(source, dict):
                        raise _wrong(f"{where}.source", "an object", source)
                    size = None
                    if source is not None and source.get("type") == "base64":
                        media = _optional_str(source.get("media_type"), f"{where}.source.media_type")
                        data = _optional_str(source.get("data"), f"{where}.source.data")
                        size = image_size(f"data:{media};base64,{data}")
                    images += anthropic_image_tokens(size)
                elif kind == "text":
                    chars += len(_optional_str(block.get("text"), f"{where}.text"))
                elif kind == "tool_result":
                    add(block.get("content"), f"{where}.content")
                else:
                    chars += len(json.dumps({k: v for k, v in block.items() if k != "type"}, ensure_ascii=False))

        add(body.get("system"), "system")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _wrong(f"messages[{i}]", "an object (a message)", message)
            add(message.get("content"), f"messages[{i}].content")
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise _wrong("tools", "an array", tools)
            for i, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise _wrong(f"tools[{i}]", "an object (a tool)", tool)
            if tools:
                chars += len(json.dumps(tools, ensure_ascii=False))
        overhead = self.PER_MESSAGE * len(messages) + self.PER_REQUEST + (self.TOOLS_OVERHEAD if tools else 0)
        return math.ceil(chars / self.CHARS_PER_TOKEN) + overhead + images

    def estimate(self, body: Dict[str, Any], model: Optional[str] = None, key: Any = None) -> int:
        if model is None:
            model = body.get("model") if isinstance(body, dict) else None
            if model is not None and not isinstance(model, str):
                raise _wrong("model", "a string", model)
        return math.ceil(self.base(body) * self.factor(model, key))

    def observe(self, model: Optional[str], base_estimate: int, actual_input_tokens: int, key: Any = None) -> float:
        """Learn from one settled request: ``base_estimate`` is ``base(body)``, the other
        the input tokens the response reported; ``key`` whose request it was (None: a
        trusted sample for the whole family). Returns the factor ``key`` (or the family)
        now has. Nonsense (a non-positive estimate, a negative, non-integer or
        non-finite count) teaches nothing."""
        for value in (base_estimate, actual_input_tokens):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return self.factor(model, key)
        if base_estimate <= 0 or actual_input_tokens < 0:
            return self.factor(model, key)
        ratio = min(max(actual_input_tokens / base_estimate, self.MIN_RATIO), self.MAX_RATIO)
        family = model_family(model)
        with self._lock:
            shared = self._families.pop(family, None) or [self.initial_factor, 0.0]
            self._families[family] = shared
            while len(self._families) > self.max_families:
                self._families.popitem(last=False)
            if key is None:
                weight = max(self.alpha, 1.0 / (shared[1] + 1))
                shared[0] += weight * (ratio - shared[0])
                shared[1] += 1
                return shared[0]
            own = self._keys.pop((family, key), None) or [shared[0], 0.0, 0.0]
            self._keys[(family, key)] = own
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            weight = max(self.alpha, 1.0 / (own[1] + 1))
            own[0] = self._bounded(own[0] + weight * (ratio - own[0]), shared[0])
            own[1] += 1
            # The shared factor: a small step, within what this key may still move it.
            step = min(max(self.alpha * (ratio - shared[0]), -self.max_step), self.max_step)
            step = min(max(step, -self.max_shift - own[2]), self.max_shift - own[2])
            shared[0] += step
            own[2] += step
            shared[1] += 1
            return self._bounded(own[0], shared[0])


anthropic_estimator = AnthropicEstimator()


def count_request_tokens(
    body: Any, provider: str = "openai", model: Optional[str] = None, key: Any = None
) -> TokenCount:
    """Input tokens of a request body: OpenAI Chat Completions, Responses, Embeddings and
    Completions (exact with tiktoken where OpenAI documents the rules), or Anthropic
    Messages (an estimate, calibrated by :data:`anthropic_estimator`, with ``key``'s own
    factor when given).

    Whatever JSON value it is given, it returns a count or raises one of:

    - ``TypeError``: ``body`` is not a dict;
    - ``ValueError``: ``provider`` is not ``"openai"`` or ``"anthropic"``;
    - :class:`RequestBodyError` (a ``ValueError``): the body's shape is wrong — a field
      of the wrong type (``model`` not a string, ``messages`` not a list of objects, a
      content part or tool that is not an object...), or nesting too deep to walk.
      ``error.field`` names the field.

    The time it takes is bounded: at most ``MAX_EXACT_CHARS`` characters are encoded
    with tiktoken; the rest is extrapolated (the count is then not ``exact``).
    """
    if not isinstance(body, dict):
        raise TypeError(f"body must be a dict (the parsed JSON request), got {type(body).__name__}")
    if provider not in ("openai", "anthropic"):
        raise ValueError(f"provider must be 'openai' or 'anthropic', got {provider!r}")
    if model is None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _wrong("model", "a string", model)
    elif not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    try:
        if provider == "openai":
            return _openai(body, model)
        return TokenCount(anthropic_estimator.estimate(body, model, key), False, "anthropic", model)
    except RecursionError:
        raise RequestBodyError("body", "the body is nested too deeply to read") from None


# The largest count any backend holds exactly (Lua numbers are doubles): 2**53 - 1.
MAX_TOKENS = 2**53 - 1


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

    @staticmethod
    def cap(body: Dict[str, Any], name: str) -> int:
        """The request's ``name`` cap (``max_tokens``...), checked: a non-negative integer
        no larger than ``MAX_TOKENS``, else :class:`RequestBodyError`."""
        value = body.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            shown = repr(value) if isinstance(value, (int, float)) else _kind(value)
            raise RequestBodyError(name, f"'{name}' must be a non-negative integer, got {shown}")
        if value > MAX_TOKENS:
            shown = str(value) if value < 10**30 else "a larger number"
            raise RequestBodyError(name, f"'{name}' must be at most {MAX_TOKENS}, got {shown}")
        return value

    def __call__(self, body: Dict[str, Any]) -> int:
        if not isinstance(body, dict):
            raise TypeError(f"body must be a dict, got {type(body).__name__}")
        for cap in self.CAPS:
            value = body.get(cap)
            if value is not None:
                return self.cap(body, cap)
        model = body.get("model")
        model = model.lower() if isinstance(model, str) else ""
        for prefix, value in self.per_model.items():
            if model.startswith(prefix.lower()):
                return value
        return self.default
