"""ASGI middleware for LLM routes: token budgets that reserve before the call and
settle from the response, streams included.

    from nexus_limits.adapters.llm import LLMLimitMiddleware

    budget = nl.TokenLimiter(requests="500/minute", tokens="30000/minute", concurrency=8)
    app = LLMLimitMiddleware(app, limiter=budget, key="bearer")

For each request to an LLM path (``/v1/chat/completions``, ``/v1/responses``,
``/v1/completions``, ``/v1/embeddings``: OpenAI; ``/v1/messages``: Anthropic):

1. the body is read once and handed to the app unchanged — except that an OpenAI
   streaming chat request gets ``stream_options.include_usage = true`` (when
   ``include_usage``), so that the stream reports its usage;
2. its input tokens are counted (exact with tiktoken for OpenAI models, estimated for
   Claude) and its output estimated (``max_tokens``-style caps, else ``output``);
3. ``reserve`` runs; a refusal is a 429 with the OpenAI-style ``x-ratelimit-*``
   headers, ``retry-after`` and a problem+json body;
4. the response passes through as it comes (streams are never buffered); its usage
   is read from the JSON body or the SSE events as they pass;
5. at the end the reservation settles at the real usage; an upstream error (status
   >= 400) or an exception cancels it (full refund); a client that goes away
   mid-stream settles it at what was streamed so far. Anthropic's real input counts
   calibrate the estimator.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..budget import Reservation
from ..tokens import OutputEstimate, UsageStream, anthropic_estimator, count_request_tokens, extract_usage
from ..tokens._usage import UsageError
from ._common import PROBLEM_TYPE, KeyFunc, parse_key_spec, problem
from .asgi import Message, Receive, Scope, Send, _raw, request_of

__all__ = ["LLMLimitMiddleware"]

OPENAI_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")
ANTHROPIC_PATHS = ("/v1/messages",)


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _call(owner: Any, fn: Any, *args: Any) -> Any:
    """Calls a limiter or reservation method without blocking the loop: coroutines are
    awaited; a synchronous Redis backend runs in a worker thread; in-process is direct."""
    if type(owner).__module__.startswith("nexus_limits.redis") and not inspect.iscoroutinefunction(fn):
        return await asyncio.to_thread(fn, *args)
    return await _maybe(fn(*args))


class LLMLimitMiddleware:
    """Token budgets for an OpenAI- or Anthropic-compatible ASGI app (or proxy).

    ``limiter``: a :class:`nexus_limits.TokenLimiter` (in-process, or from
    ``nexus_limits.redis`` / ``nexus_limits.redis.asyncio``). ``key``: as for the other
    middleware. ``output``: an :class:`~nexus_limits.tokens.OutputEstimate` for
    requests without a cap. ``openai_paths`` / ``anthropic_paths``: which paths are LLM
    calls (other paths pass through). ``trusted_proxies`` as for ``key="ip"``.
    """

    def __init__(
        self,
        app: Any,
        limiter: Any = None,
        key: Any = "bearer",
        *,
        spend: Any = None,
        output: Optional[OutputEstimate] = None,
        include_usage: bool = True,
        openai_paths: Sequence[str] = OPENAI_PATHS,
        anthropic_paths: Sequence[str] = ANTHROPIC_PATHS,
        trusted_proxies: Sequence[str] = (),
        metrics: Any = None,
        metrics_labels: Tuple[str, str] = ("llm", ""),
    ) -> None:
        if limiter is None and spend is None:
            raise ValueError("give a TokenLimiter (limiter=), a SpendLimiter (spend=) or both")
        if limiter is not None and not callable(getattr(limiter, "reserve", None)):
            raise TypeError(f"limiter must be a TokenLimiter, got {type(limiter).__name__}")
        if spend is not None and not callable(getattr(spend, "estimate", None)):
            raise TypeError(f"spend must be a SpendLimiter, got {type(spend).__name__}")
        self.app = app
        self.limiter = limiter
        self.spend = spend
        self.key_func: KeyFunc = parse_key_spec(key, trusted_proxies)
        self.output = output if output is not None else OutputEstimate()
        self.include_usage = include_usage
        self.paths = {p: "openai" for p in openai_paths}
        self.paths.update({p: "anthropic" for p in anthropic_paths})
        if metrics is not None and not callable(getattr(metrics, "observe", None)):
            raise TypeError(f"metrics must be a nexus_limits.metrics.Metrics, got {type(metrics).__name__}")
        self.metrics = metrics
        # (limiter, tier) labels; the route label is the request's path (one of `paths`).
        self.metrics_labels = metrics_labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        provider = self.paths.get(scope.get("path", "")) if scope["type"] == "http" else None
        if provider is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        try:
            body = json.loads(raw or b"null")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            count = count_request_tokens(body, provider=provider)
        except (ValueError, TypeError) as error:
            await _reply(send, 400, [PROBLEM_TYPE], problem(400, "Bad Request", f"invalid request body: {error}"))
            return
        key = self.key_func(request_of(scope))
        if key is None:
            await _reply(send, 401, [PROBLEM_TYPE], problem(401, "Unauthorized", "no client key in the request"))
            return
        if provider == "openai" and body.get("stream") and "messages" in body and self.include_usage:
            options = body.get("stream_options")
            if not isinstance(options, dict) or not options.get("include_usage"):
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                raw = json.dumps(body).encode()
        output = self.output.for_key(body, key) if hasattr(self.output, "for_key") else self.output(body)
        estimate = count.tokens + output
        reservation: Optional[Reservation] = None
        if self.limiter is not None:
            started = time.perf_counter()
            reservation = await _call(self.limiter, self.limiter.reserve, key, estimate)
            if self.metrics is not None:
                name, tier = self.metrics_labels
                self.metrics.observe(name, tier, scope["path"], time.perf_counter() - started, reservation.decision)
            if not reservation.allowed:
                tokens = reservation.tokens
                detail = (
                    "token budget exhausted" if tokens is not None and not tokens.allowed else "rate limit exceeded"
                )
                headers = [PROBLEM_TYPE, *reservation.headers().items()]
                await _reply(send, 429, headers, problem(429, "Too Many Requests", detail, {"estimate": estimate}))
                return
        spent = None
        if self.spend is not None:
            try:
                spent = await _call(self.spend, self.spend.reserve, key, body.get("model"), count.tokens, output)
            except KeyError as error:  # UnknownModel: no price and no default
                if reservation is not None:
                    await _call(self.limiter, reservation.cancel)
                await _reply(send, 400, [PROBLEM_TYPE], problem(400, "Bad Request", str(error)))
                return
            if not spent.allowed:
                if reservation is not None:
                    await _call(self.limiter, reservation.cancel)
                headers = [PROBLEM_TYPE, *spent.headers().items()]
                await _reply(send, 429, headers, problem(429, "Too Many Requests", spent.detail(), {"budget": "spend"}))
                return
        both = _Both(reservation, spent, key, self)
        await self._forward(scope, receive, send, raw, provider, body, count.tokens, both)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw: bytes,
        provider: str,
        body: Dict[str, Any],
        input_estimate: int,
        reservation: _Both,
    ) -> None:
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        state: Dict[str, Any] = {"status": 200, "sse": False, "chunks": [], "done": False}
        stream = UsageStream(None, model=body.get("model"), input_estimate=input_estimate)
        extra = _raw(list(reservation.headers().items()))

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = int(message.get("status", 200))
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.split(b";")[0].strip() == b"text/event-stream":
                        state["sse"] = True
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            elif message["type"] == "http.response.body" and state["status"] < 400:
                chunk = message.get("body", b"")
                if state["sse"]:
                    stream.feed(chunk)
                else:
                    state["chunks"].append(chunk)
                if not message.get("more_body", False):
                    state["done"] = True
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except (OSError, asyncio.CancelledError):
            await self._finish(reservation, provider, body, state, stream, client_gone=True)
            raise
        except BaseException:
            await reservation.cancel()
            raise
        await self._finish(reservation, provider, body, state, stream, client_gone=not state["done"])

    async def _finish(
        self,
        reservation: _Both,
        provider: str,
        body: Dict[str, Any],
        state: Dict[str, Any],
        stream: UsageStream,
        client_gone: bool,
    ) -> None:
        if state["status"] >= 400:
            await reservation.cancel()
            return
        try:
            if state["sse"] or client_gone:
                usage = stream.finish()
            else:
                usage = extract_usage(b"".join(state["chunks"]), None)
        except UsageError:
            return  # nothing readable: the reservation settles at its estimate
        await reservation.settle(usage, body.get("model"))
        if provider == "anthropic" and usage.exact:
            base = anthropic_estimator.base(body)
            anthropic_estimator.observe(body.get("model"), base, usage.input_tokens)


class _Both:
    """The token reservation and the spend reservation of one call, settled together."""

    def __init__(self, tokens: Optional[Reservation], spend: Any, key: Any, owner: LLMLimitMiddleware) -> None:
        self.tokens = tokens
        self.spend = spend
        self.key = key
        self.owner = owner

    def headers(self) -> Dict[str, str]:
        out: Dict[str, str] = {}
        if self.tokens is not None:
            out.update(self.tokens.headers())
        if self.spend is not None:
            out.update(self.spend.headers())
        return out

    async def cancel(self) -> None:
        if self.tokens is not None:
            await _call(self.owner.limiter, self.tokens.cancel)
        if self.spend is not None:
            await _call(self.owner.spend, self.spend.cancel)

    async def settle(self, usage: Any, model: Optional[str]) -> None:
        if self.tokens is not None:
            await _call(self.owner.limiter, self.tokens.settle, usage.total_tokens)
        if self.spend is not None:
            await _call(self.owner.spend, self.spend.settle, usage)
        if usage.exact and hasattr(self.owner.output, "observe"):
            self.owner.output.observe(self.key, model, usage.output_tokens)


async def _read_body(receive: Receive) -> bytes:
    parts: List[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _reply(send: Send, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _raw(headers)})
    await send({"type": "http.response.body", "body": body})
