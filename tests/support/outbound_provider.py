"""A fake LLM provider that ENFORCES its own rate limits, for the outbound tests.

A real ASGI app (serve it with :func:`serve`, under real uvicorn) speaking OpenAI's Chat
Completions and Embeddings and Anthropic's Messages, JSON and server-sent events, in
the shapes the official SDKs parse. Every model has limits per ``window`` seconds, kept
as continuously refilled token buckets, as the providers describe theirs:

- OpenAI models: ``requests`` and ``tokens``. A request is charged at admission, one
  request and its input tokens (counted exactly, with the library's tiktoken counter)
  plus its output cap (``max_completion_tokens`` / ``max_tokens``) — OpenAI counts the
  cap against the limit, whatever the answer uses — or, without a cap, the output it
  is about to produce. Nothing is refunded.
- Anthropic models: ``requests``, ``input_tokens`` and ``output_tokens``. The input is
  counted with the provider's own tokenizer (:func:`claude_tokens`, words and
  punctuation: no client can reproduce it exactly); the output limit is charged
  ``max_tokens`` at admission and adjusted to the real output when the answer ends.

A request that does not fit is answered 429 in the provider's error format, with
``retry-after`` (whole seconds, rounded up, as both providers send it) and the
rate-limit headers. Every answer carries the real header formats:
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (resets as Go durations such
as ``1.5s`` or ``6m0s``) or ``anthropic-ratelimit-{requests,input-tokens,
output-tokens,tokens}-{limit,remaining,reset}`` (resets as RFC 3339 times).

For tests: ``admitted`` / ``refused`` count answers per model, ``consume`` spends quota
as another member of the organisation would, ``headers=False`` makes a provider that
sends no rate-limit headers, ``latency`` delays every answer, ``stream_gap`` spaces
the events of a stream.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import math
import re
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from nexus_limits.tokens import count_request_tokens

__all__ = ["Bucket", "OutboundProvider", "claude_tokens", "go_duration", "serve"]

_WORD = re.compile(r"\w+|[^\w\s]")


def claude_tokens(body: Dict[str, Any]) -> int:
    """The fake Claude tokenizer: one token per word or punctuation mark of every text
    (system, messages, tool results), 4 per message and 3 per request."""
    texts: List[str] = []

    def add(content: Any) -> None:
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for block in content:
                if isinstance(block, dict):
                    if isinstance(block.get("text"), str):
                        texts.append(block["text"])
                    elif block.get("type") == "tool_result":
                        add(block.get("content"))

    add(body.get("system"))
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    for m in messages:
        if isinstance(m, dict):
            add(m.get("content"))
    return sum(len(_WORD.findall(t)) for t in texts) + 4 * len(messages) + 3


def go_duration(seconds: float) -> str:
    """Seconds as Go prints a time.Duration, the format of OpenAI's reset headers."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class Bucket:
    """A token bucket of ``limit`` units refilled over ``window`` seconds; starts full."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.rate = limit / window
        self.used = 0.0
        self.at = time.monotonic()

    def _refill(self, now: float) -> None:
        self.used = max(0.0, self.used - (now - self.at) * self.rate)
        self.at = now

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` fits (0: now; inf: never)."""
        self._refill(now)
        if cost > self.limit:
            return math.inf
        return max(0.0, (self.used + cost - self.limit) / self.rate)

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        self.used += cost

    def give(self, units: float, now: float) -> None:
        self._refill(now)
        self.used = max(0.0, self.used - units)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self.limit - self.used + 1e-9))

    def reset(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        return self.used / self.rate


_OPENAI_DIMS = ("requests", "tokens")
_ANTHROPIC_DIMS = ("requests", "input_tokens", "output_tokens")


class OutboundProvider:
    """The ASGI app. ``limits`` maps a model to its limits per ``window`` seconds, e.g.
    ``{"gpt-4o": {"requests": 20, "tokens": 4000}, "claude-x": {"requests": 20,
    "input_tokens": 2000, "output_tokens": 800}}``; a model not listed gets ``default``
    (OpenAI keys for OpenAI routes, Anthropic keys for /v1/messages), None: unlimited.
    ``output_tokens``: the output each answer produces (capped by the request's cap),
    or a function of the request body."""

    def __init__(
        self,
        limits: Optional[Dict[str, Dict[str, int]]] = None,
        *,
        window: float = 2.0,
        default: Optional[Dict[str, int]] = None,
        output_tokens: Any = 20,
        headers: bool = True,
        latency: float = 0.0,
        stream_gap: float = 0.0,
    ) -> None:
        self.window = window
        self.limits = dict(limits or {})
        self.default = default
        self.output_tokens = output_tokens
        self.send_headers = headers
        self.latency = latency
        self.stream_gap = stream_gap
        self._buckets: Dict[Tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()
        self.admitted: Dict[str, int] = {}
        self.refused: Dict[str, int] = {}
        # (monotonic time, model, charges) of every admitted request, for tests.
        self.log: List[Tuple[float, str, Dict[str, int]]] = []
        self.refused_at: List[float] = []
        self.first_admitted: Optional[float] = None
        self.last_answered: Optional[float] = None

    # --- for tests --------------------------------------------------------------------
    def total_refused(self) -> int:
        with self._lock:
            return sum(self.refused.values())

    def total_admitted(self) -> int:
        with self._lock:
            return sum(self.admitted.values())

    def consume(self, model: str, dim: str, units: int) -> None:
        """Spend ``units`` of ``model``'s ``dim`` limit, as another client of the same
        organisation would (the bucket may go below empty)."""
        with self._lock:
            bucket = self._bucket(model, dim, anthropic=dim in ("input_tokens", "output_tokens"))
            assert bucket is not None, f"{model} has no {dim} limit"
            bucket.take(units, time.monotonic())

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()
            self.admitted.clear()
            self.refused.clear()
            self.log.clear()
            self.refused_at.clear()
            self.first_admitted = self.last_answered = None

    # --- limits -----------------------------------------------------------------------
    def _limits_of(self, model: str) -> Optional[Dict[str, int]]:
        return self.limits.get(model, self.default)

    def _bucket(self, model: str, dim: str, anthropic: bool) -> Optional[Bucket]:
        limits = self._limits_of(model)
        if limits is None or dim not in limits:
            return None
        bucket = self._buckets.get((model, dim))
        if bucket is None:
            bucket = self._buckets[(model, dim)] = Bucket(int(limits[dim]), self.window)
        return bucket

    def _charges(self, path: str, body: Dict[str, Any], output: int) -> Dict[str, int]:
        if path == "/v1/messages":
            cap = body.get("max_tokens")
            return {
                "requests": 1,
                "input_tokens": claude_tokens(body),
                "output_tokens": int(cap) if isinstance(cap, int) else output,
            }
        count = count_request_tokens(body).tokens
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        return {"requests": 1, "tokens": count + (int(cap) if isinstance(cap, int) else output)}

    def _admit(self, model: str, anthropic: bool, charges: Dict[str, int]) -> Tuple[float, str]:
        """(0, "") when admitted (and charged), else (seconds to wait, the limit's name)."""
        now = time.monotonic()
        with self._lock:
            worst, which = 0.0, ""
            for dim, cost in charges.items():
                bucket = self._bucket(model, dim, anthropic)
                if bucket is not None:
                    wait = bucket.wait(cost, now)
                    if wait > worst:
                        worst, which = wait, dim
            if worst > 0:
                self.refused[model] = self.refused.get(model, 0) + 1
                self.refused_at.append(now)
                return worst, which
            for dim, cost in charges.items():
                bucket = self._bucket(model, dim, anthropic)
                if bucket is not None:
                    bucket.take(cost, now)
            self.admitted[model] = self.admitted.get(model, 0) + 1
            self.log.append((now, model, dict(charges)))
            if self.first_admitted is None:
                self.first_admitted = now
            return 0.0, ""

    def _refund_output(self, model: str, units: int) -> None:
        with self._lock:
            bucket = self._bucket(model, "output_tokens", True)
            if bucket is not None and units > 0:
                bucket.give(units, time.monotonic())

    def _rate_headers(self, model: str, anthropic: bool) -> List[Tuple[str, str]]:
        if not self.send_headers:
            return []
        now = time.monotonic()
        out: List[Tuple[str, str]] = []
        with self._lock:
            if anthropic:
                wall = _dt.datetime.now(_dt.timezone.utc)
                states = {}
                for dim in _ANTHROPIC_DIMS:
                    bucket = self._bucket(model, dim, True)
                    if bucket is None:
                        continue
                    states[dim] = (bucket.limit, bucket.remaining(now), bucket.reset(now))
                tokens = [states[d] for d in ("input_tokens", "output_tokens") if d in states]
                if tokens:
                    # "tokens": the most restrictive of the two, as Anthropic reports it.
                    states["tokens"] = min(tokens, key=lambda s: s[1])
                for dim, (limit, remaining, reset) in states.items():
                    name = dim.replace("_", "-")
                    # RFC 3339, whole seconds rounded up: when the limit is fully restored.
                    when = (wall + _dt.timedelta(seconds=math.ceil(reset))).replace(microsecond=0)
                    out += [
                        (f"anthropic-ratelimit-{name}-limit", str(limit)),
                        (f"anthropic-ratelimit-{name}-remaining", str(remaining)),
                        (f"anthropic-ratelimit-{name}-reset", when.isoformat().replace("+00:00", "Z")),
                    ]
            else:
                for dim in _OPENAI_DIMS:
                    bucket = self._bucket(model, dim, False)
                    if bucket is None:
                        continue
                    out += [
                        (f"x-ratelimit-limit-{dim}", str(bucket.limit)),
                        (f"x-ratelimit-remaining-{dim}", str(bucket.remaining(now))),
                        (f"x-ratelimit-reset-{dim}", go_duration(bucket.reset(now))),
                    ]
        return out

    # --- the app ----------------------------------------------------------------------
    async def __call__(self, scope: Dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        anthropic = path == "/v1/messages"
        if scope["method"] != "POST" or path not in ("/v1/chat/completions", "/v1/embeddings", "/v1/messages"):
            await self._error(send, anthropic, 404, f"no route {scope['method']} {path}", [])
            return
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            await self._error(send, anthropic, 400, "the body must be a JSON object", [])
            return
        model = str(body.get("model") or "")
        if path == "/v1/embeddings":
            output = 0
        elif callable(self.output_tokens):
            output = int(self.output_tokens(body))
        else:
            output = int(self.output_tokens)
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(cap, int):
            output = min(output, cap)
        charges = self._charges(path, body, output)
        wait, which = self._admit(model, anthropic, charges)
        if wait > 0:
            retry = "60" if math.isinf(wait) else str(max(1, math.ceil(wait)))
            kind = which.replace("_", " ")
            await self._error(
                send,
                anthropic,
                429,
                f"Rate limit reached for {model} on {kind}: please try again in {retry}s.",
                [("retry-after", retry), *self._rate_headers(model, anthropic)],
                kind=which,
            )
            return
        if self.latency:
            await asyncio.sleep(self.latency)
        refunded = []

        def generated() -> None:
            """The answer is complete: Anthropic adjusts its output limit to the real
            output (before the last bytes leave, as the usage they carry is final)."""
            if anthropic and not refunded:
                refunded.append(True)
                self._refund_output(model, charges["output_tokens"] - output)

        try:
            if body.get("stream"):
                await self._stream(send, path, model, body, charges, output, generated)
            else:
                await self._json(send, path, model, body, charges, output, generated)
        finally:
            generated()
            self.last_answered = time.monotonic()

    async def _start(self, send: Callable[..., Any], status: int, ctype: str, extra: List[Tuple[str, str]]) -> None:
        headers = [("content-type", ctype), *extra]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers],
            }
        )

    async def _error(
        self,
        send: Callable[..., Any],
        anthropic: bool,
        status: int,
        message: str,
        headers: List[Tuple[str, str]],
        kind: str = "",
    ) -> None:
        if anthropic:
            etype = {429: "rate_limit_error", 404: "not_found_error"}.get(status, "invalid_request_error")
            doc: Dict[str, Any] = {"type": "error", "error": {"type": etype, "message": message}}
        else:
            code = "rate_limit_exceeded" if status == 429 else None
            doc = {"error": {"message": message, "type": kind or "invalid_request_error", "param": None, "code": code}}
        data = json.dumps(doc).encode()
        await self._start(send, status, "application/json", [("content-length", str(len(data))), *headers])
        await send({"type": "http.response.body", "body": data})

    async def _json(
        self,
        send: Callable[..., Any],
        path: str,
        model: str,
        body: Dict[str, Any],
        charges: Dict[str, int],
        output: int,
        generated: Callable[[], None],
    ) -> None:
        anthropic = path == "/v1/messages"
        if anthropic:
            inp = charges["input_tokens"]
            doc: Dict[str, Any] = {
                "id": f"msg_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": _text(output)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": inp,
                    "output_tokens": output,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            }
        elif path == "/v1/embeddings":
            inp = charges["tokens"]
            doc = {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
                "model": model,
                "usage": {"prompt_tokens": inp, "total_tokens": inp},
            }
        else:
            inp = count_request_tokens(body).tokens
            doc = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": 1_750_000_000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _text(output), "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": inp, "completion_tokens": output, "total_tokens": inp + output},
            }
        data = json.dumps(doc).encode()
        headers = [("content-length", str(len(data))), *self._rate_headers(model, anthropic)]
        await self._start(send, 200, "application/json", headers)
        generated()
        await send({"type": "http.response.body", "body": data})

    async def _stream(
        self,
        send: Callable[..., Any],
        path: str,
        model: str,
        body: Dict[str, Any],
        charges: Dict[str, int],
        output: int,
        generated: Callable[[], None],
    ) -> None:
        anthropic = path == "/v1/messages"
        await self._start(
            send,
            200,
            "text/event-stream; charset=utf-8",
            [("cache-control", "no-cache"), *self._rate_headers(model, anthropic)],
        )
        if anthropic:
            events = self._anthropic_events(model, charges["input_tokens"], output)
        else:
            events = self._openai_events(model, body, output)
        for n, event in enumerate(events):
            if n == len(events) - 2:  # before the final usage (message_delta / usage chunk)
                generated()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            if self.stream_gap:
                await asyncio.sleep(self.stream_gap)
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _openai_events(model: str, body: Dict[str, Any], output: int) -> List[bytes]:
        options = body.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": 1, "model": model}
        extra = {"usage": None} if include else {}

        def chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> bytes:
            doc = {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(doc)}\n\n".encode()

        out = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"content": "ok "}) for _ in range(min(output, 5))]
        out.append(chunk({}, "stop"))
        if include:
            inp = count_request_tokens(body).tokens
            usage = {"prompt_tokens": inp, "completion_tokens": output, "total_tokens": inp + output}
            out.append(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        out.append(b"data: [DONE]\n\n")
        return out

    @staticmethod
    def _anthropic_events(model: str, inp: int, output: int) -> List[bytes]:
        def event(kind: str, doc: Dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **doc})}\n\n".encode()

        start = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": inp,
                "output_tokens": 1,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        out = [event("message_start", {"message": start})]
        out.append(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
        out += [
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "ok "}})
            for _ in range(min(output, 5))
        ]
        out.append(event("content_block_stop", {"index": 0}))
        out.append(
            event(
                "message_delta",
                {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": output}},
            )
        )
        out.append(event("message_stop", {}))
        return out


def _text(tokens: int) -> str:
    return "ok " * min(tokens, 50)


def serve(app: Any) -> Any:
    """An ASGIServer (tests/support/servers.py) running ``app`` under uvicorn on loopback."""
    from support.servers import ASGIServer

    return ASGIServer(app)
