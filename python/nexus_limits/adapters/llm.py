"""ASGI middleware for LLM routes: token budgets that reserve before the call and
settle from the response, streams included.

    from nexus_limits.adapters.llm import LLMLimitMiddleware

    budget = nl.TokenLimiter(requests="500/minute", tokens="30000/minute", concurrency=8)
    app = LLMLimitMiddleware(app, limiter=budget, key="bearer")

For each request to an LLM path (``POST /v1/chat/completions``, ``/v1/responses``,
``/v1/completions``, ``/v1/embeddings``: OpenAI; ``/v1/messages``: Anthropic), judged
on the normalised target (:func:`~nexus_limits.adapters.normalize_target`):

1. a key that could not be admitted whatever its body (request limit reached, every
   concurrent place taken, tokens in debt) is refused before its body is read;
2. the body is read (at most ``max_body`` bytes), checked and handed to the app
   unchanged — except that an OpenAI streaming chat or completions request gets
   ``stream_options.include_usage = true`` (when ``include_usage``), so that the
   stream reports its usage; the usage-only chunk this adds is removed from what the
   client receives when it did not ask for it;
3. its input tokens are counted (exact with tiktoken for OpenAI models, estimated for
   Claude; large bodies are counted in a worker thread) and its output estimated
   (``max_tokens``-style caps, else ``output``);
4. ``reserve`` runs; a refusal is a 429 in the provider's own error format, naming the
   budget that ran out and when it frees up, with ``retry-after`` and
   ``retry-after-ms`` (and ``x-should-retry: false`` when waiting cannot help);
5. the response passes through as it comes (streams are never buffered), with the
   gateway's ``x-ratelimit-*`` headers replacing the app's; its usage is read from the
   JSON body or the SSE events as they pass;
6. at the end the reservation settles at the real usage; an upstream that refuses
   the call (4xx) has it settled at no tokens (it still counts as a request), an
   upstream failure (5xx) cancels it (full refund). A client that goes away — before the upstream
   answered, mid-stream, during a long non-streamed call — has the app cancelled at
   once and the reservation settled at what was delivered; so does a stream the
   upstream cut. Usage the upstream reports that cannot be trusted settles at the
   estimate. Anthropic's real input counts calibrate the estimator, per key.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import statistics
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from ..budget import Reservation
from ..errors import BadRequest
from ..tokens import OutputEstimate, anthropic_estimator, count_request_tokens
from ..tokens._count import MAX_TOKENS, RequestBodyError, TokenCount
from ..tokens._encodings import warm_encodings
from ..tokens._response import UsageReader
from ..tokens._usage import Usage, UsageError
from ._common import KeyFunc, parse_key_spec, problem
from ._target import normalize_target
from .asgi import Message, Receive, Scope, Send, _raw, request_of, target_of

__all__ = ["LLMLimitMiddleware"]

log = logging.getLogger("nexus_limits.llm")

OPENAI_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")
ANTHROPIC_PATHS = ("/v1/messages",)

# Anthropic refuses requests above 32 MB; so does this middleware by default.
MAX_BODY = 32 * 2**20
# Bodies larger than this are parsed and counted in a worker thread, so that one big
# request does not stall every other client of the event loop.
INLINE_BYTES = 64 * 1024
# Set once the encodings most requests need are built (see warm_encodings).
_warm = threading.Event()
# A client chooses the model name; the gateway refuses absurd ones.
MAX_MODEL_LENGTH = 256
# Retry-After for a concurrency refusal: the median time leases are really held,
# clamped to this range (seconds); the first refusals, with no hold seen yet, say the
# lower bound.
RETRY_RANGE = (1.0, 30.0)
_HOLDS_KEPT = 64


# Whether a limiter type is a synchronous Redis one (its calls go to a worker thread).
_REDIS_TYPES: Dict[type, bool] = {}


def _in_process(owner: Any) -> bool:
    """True for the in-process TokenLimiter and SpendLimiter (exactly those types): their
    methods return at once and never an awaitable, so they are called directly."""
    from ..budget import SpendLimiter, TokenLimiter

    return type(owner) in (TokenLimiter, SpendLimiter)


async def _call(owner: Any, fn: Any, *args: Any) -> Any:
    """Calls a limiter or reservation method without blocking the loop: coroutines are
    awaited; a synchronous Redis backend runs in a worker thread; in-process is direct."""
    kind = type(owner)
    redis = _REDIS_TYPES.get(kind)
    if redis is None:
        redis = _REDIS_TYPES[kind] = kind.__module__.startswith("nexus_limits.redis")
    if redis and not inspect.iscoroutinefunction(fn):
        return await asyncio.to_thread(fn, *args)
    value = fn(*args)
    return await value if inspect.isawaitable(value) else value


class _Holds:
    """How long recent concurrency leases were held: a refusal's Retry-After."""

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self.seconds: Deque[float] = deque(maxlen=_HOLDS_KEPT)

    def add(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            self.seconds.append(seconds)

    def wait(self) -> float:
        typical = statistics.median(self.seconds) if self.seconds else self.low
        return min(max(typical, self.low), self.high)


class _Format:
    """How refusals are written: ``"openai"``, ``"anthropic"`` or ``"problem"``; worked
    out from the request's ``Accept`` only when a refusal is written (most requests
    never need it)."""

    __slots__ = ("_kind", "_provider", "_scope")

    def __init__(self, kind: Optional[str], scope: Optional[Scope] = None, provider: Optional[str] = None) -> None:
        self._kind = kind
        self._scope = scope
        self._provider = provider

    @staticmethod
    def of(scope: Scope, provider: Optional[str]) -> _Format:
        return _Format(None, scope, provider)

    @property
    def kind(self) -> str:
        if self._kind is None:
            self._kind = self._provider or "problem"
            for name, value in (self._scope or {}).get("headers") or ():
                if name.lower() == b"accept":
                    for item in value.split(b","):
                        if item.split(b";")[0].strip().lower() == b"application/problem+json":
                            self._kind = "problem"
        return self._kind


_TITLES = {400: "Bad Request", 401: "Unauthorized", 413: "Content Too Large", 429: "Too Many Requests"}
_OPENAI_TYPES = {429: "rate_limit_exceeded"}
_ANTHROPIC_TYPES = {401: "authentication_error", 413: "request_too_large", 429: "rate_limit_error"}


def _error_body(
    fmt: _Format,
    status: int,
    message: str,
    *,
    code: Optional[str] = None,
    param: Optional[str] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Tuple[List[Tuple[str, str]], bytes]:
    """(headers, body) of a refusal in the client's format: OpenAI's ``{"error": {...}}``
    (so the SDK's ``e.code``/``e.type``/``e.param`` are set), Anthropic's ``{"type":
    "error", "error": {...}}``, or ``application/problem+json``."""
    if fmt.kind == "openai":
        doc: Dict[str, Any] = {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
        doc.update(extra or {})
        return [("content-type", "application/json")], json.dumps({"error": doc}).encode()
    if fmt.kind == "anthropic":
        inner = {"type": _ANTHROPIC_TYPES.get(status, "invalid_request_error"), "message": message}
        return [("content-type", "application/json")], json.dumps({"type": "error", "error": inner}).encode()
    more = dict(extra or {})
    if param is not None:
        more["param"] = param
    if code is not None:
        more["code"] = code
    return [("content-type", "application/problem+json")], problem(status, _TITLES.get(status, "Error"), message, more)


async def _reply(send: Send, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
    headers = [*headers, ("content-length", str(len(body)))]
    await send({"type": "http.response.start", "status": status, "headers": _raw(headers)})
    await send({"type": "http.response.body", "body": body})


async def _refuse(
    send: Send,
    fmt: _Format,
    status: int,
    message: str,
    *,
    code: Optional[str] = None,
    param: Optional[str] = None,
    headers: Sequence[Tuple[str, str]] = (),
    extra: Optional[Dict[str, Any]] = None,
) -> None:
    base, body = _error_body(fmt, status, message, code=code, param=param, extra=extra)
    await _reply(send, status, [*base, *headers], body)


class _TooLarge(Exception):
    pass


class _Cut(Exception):
    """Raised into the app when its response cannot be forwarded further (a compressed
    stream, decoded to strip the usage chunk, that cannot be decoded)."""


class _Resumed:
    """Awaiting it goes on with a coroutine that was started by hand and suspended on
    ``first`` (what it yielded): the rest of the coroutine, as ``await`` would have run it."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Any:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as error:
                try:
                    value = coro.throw(error)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro: Any, first: Any) -> Any:
    return await _Resumed(coro, first)


async def _protected(coro: Any) -> None:
    """``await asyncio.shield(coro)``, without a task when ``coro`` ends without ever
    waiting (an in-process limiter's settle): cancellation reaches a coroutine only
    where it waits, so one that never does needs no shield. One that waits goes on in a
    shielded task from where it stopped."""
    try:
        first = coro.send(None)
    except StopIteration:
        return
    await asyncio.shield(asyncio.ensure_future(_resume(coro, first)))


async def _read_body(receive: Receive, limit: int) -> Optional[bytes]:
    """The whole request body; None when the client went away first. Raises _TooLarge
    past ``limit`` bytes, without reading further."""
    parts: List[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _refuse_constant(name: str) -> Any:
    raise RequestBodyError("body", f"{name} is not a JSON number")


def _unique(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """An object whose members' names are all different. Two members of one name are
    refused: this middleware would judge the last (``"model"``, a cap, ``"stream"``...)
    where an upstream may act on the first, and charge (or price) a call other than the
    one made."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: Set[str] = set()
        for name, _ in pairs:
            if name in seen:
                field = name if len(name) <= 64 else name[:64] + "..."
                raise RequestBodyError(field, f"the member {field!r} appears twice in one object")
            seen.add(name)
    return out


# json.loads(raw, parse_constant=...) builds a decoder per call; this one is built once.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique)


def _loads(raw: bytes) -> Any:
    """``json.loads(raw, parse_constant=_refuse_constant)``, the encoding detected as
    json.loads detects it (UTF-8, -16 or -32, a UTF-8 BOM dropped), with a member named
    twice in one object refused (RequestBodyError)."""
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def _rewritten(scope: Scope, size: int) -> Scope:
    """``scope`` for a body the middleware rewrote (``size`` bytes) to ask for the usage
    chunk: its content-length, and ``accept-encoding: identity`` so that the stream the
    usage chunk is removed from comes uncompressed."""
    drop = (b"content-length", b"accept-encoding")
    headers = [(k, v) for k, v in scope.get("headers") or () if k.lower() not in drop]
    headers += [(b"content-length", str(size).encode()), (b"accept-encoding", b"identity")]
    return {**scope, "headers": headers}


class _Judged(NamedTuple):
    body: Dict[str, Any]
    raw: bytes
    counted: TokenCount
    output: int
    estimate: int
    strip: bool
    base: int  # Anthropic: the uncalibrated estimate, to calibrate with


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))} ms"
    seconds = math.ceil(seconds)
    if seconds < 120:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


# How often the cancellation of an app whose client went away is repeated while the
# app goes on (it swallowed the last one).
_RECANCEL = 0.02

# A scope extension a server may offer (the gateway's does): a callable that takes a
# callback to run when the client's connection is lost, and returns a callable that
# forgets it. With it, no task has to wait on receive() to see a client go away.
ON_DISCONNECT = "nexus_limits.on_disconnect"

# A scope entry an outer layer that has already judged the request (the gateway) may
# set: ``((method, path), key)``, the normalised target and the client's key as this
# middleware's own ``key`` would find them, so that neither is worked out twice. Only
# code that builds the scope can set it (a client cannot).
GIVEN = "nexus_limits.given"


def _nothing() -> None:
    pass


class _Client:
    """The app's view of the client: the body (``first``, a message already read, then
    the rest as it comes), then ``http.disconnect`` as soon as the client is seen to go
    away.

    Once the body is complete, the client is watched: through the server's
    ``ON_DISCONNECT`` extension when it has one, else by a task waiting on the server's
    ``receive()``. When the client is gone, ``on_gone`` runs (it cancels the app)."""

    def __init__(self, receive: Receive, first: Optional[Message], scope: Scope) -> None:
        self._receive = receive
        self._first = first
        self._watch: Optional[asyncio.Future[Any]] = None
        self._forget: Optional[Callable[[], None]] = None
        extensions = scope.get("extensions")
        self._hook: Any = extensions.get(ON_DISCONNECT) if extensions else None
        self._on_gone: Callable[[], None] = _nothing
        self._gone: Optional[asyncio.Event] = None
        if first is not None and not first.get("more_body", False):
            self.watch()

    @property
    def gone(self) -> asyncio.Event:
        if self._gone is None:
            self._gone = asyncio.Event()
        return self._gone

    def watch(self) -> None:
        if self._watch is not None or self._forget is not None or (self._gone is not None and self._gone.is_set()):
            return
        if self._hook is not None:
            self._forget = self._hook(self._left)
        else:
            self._watch = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        message = await self._receive()
        # Anything but a disconnect after a complete body is not ASGI: stop watching.
        if message.get("type") == "http.disconnect":
            self._left()

    def _left(self) -> None:
        if not self.gone.is_set():
            self.gone.set()
            self._on_gone()

    async def receive(self) -> Message:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._watch is None and self._forget is None:
            message = await self._receive()
            if message.get("type") == "http.disconnect":
                self._left()
            elif not message.get("more_body", False):
                self.watch()
            return message
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def stop(self) -> None:
        if self._forget is not None:
            forget, self._forget = self._forget, None
            forget()
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()


class _Run:
    """What happened to one call: the response's status, whether it was delivered in
    full, whether the client left or the app failed."""

    __slots__ = (
        "app_failed",
        "client_gone",
        "cut",
        "done",
        "reader",
        "reader_failed",
        "sent",
        "settled",
        "started",
        "status",
    )

    def __init__(self) -> None:
        self.status = 0
        self.started = False
        self.done = False
        self.client_gone = False
        self.app_failed = False
        self.cut = False
        self.reader: Any = None
        self.reader_failed = False
        self.sent = 0
        self.settled = False


async def _run_app(app: Any, scope: Scope, client: _Client, send: Send, run: _Run) -> None:
    """Runs the app, cancelled when the client goes away; re-raises what the app raised
    (unless the client had gone).

    On Python 3.11+ the app runs in this task, which the client's going away cancels
    (those cancellations are counted and taken back with Task.uncancel: they never
    leave here); before 3.11, in a task of its own.

    A cancellation the app swallows (asyncio.wait_for in Python < 3.12 does when what it
    waits for completes at the same moment) is repeated every _RECANCEL seconds until
    the app ends."""
    current = asyncio.current_task()
    if current is None or not hasattr(current, "uncancel"):
        await _run_app_task(app, scope, client, send, run)
        return
    task: Any = current
    ours = 0  # cancellations requested here
    running = True

    def gone() -> None:
        nonlocal ours
        if running and not run.done:
            run.client_gone = True
            ours += 1
            # Delivered at this task's next step, which is inside the app: the task is
            # waiting in it (this runs from another callback, never from this task).
            task.cancel()
            asyncio.get_running_loop().call_later(_RECANCEL, gone)

    client._on_gone = gone
    try:
        await app(scope, client.receive, send)
    except asyncio.CancelledError:
        if not ours:
            run.client_gone = True  # cancelled from outside (the server)
            raise
    except Exception as error:
        if run.client_gone or isinstance(error, _Cut):
            return
        run.app_failed = True
        raise
    finally:
        running = False
        client._on_gone = _nothing
        client.stop()
    if ours:
        left = task.cancelling()
        for _ in range(ours):
            left = task.uncancel()
        if left > 0:
            raise asyncio.CancelledError()  # cancelled from outside as well


async def _run_app_task(app: Any, scope: Scope, client: _Client, send: Send, run: _Run) -> None:
    """_run_app with the app in a task of its own (Python < 3.11)."""
    task = asyncio.ensure_future(app(scope, client.receive, send))
    loop = asyncio.get_running_loop()

    def gone() -> None:
        if not run.done and not task.done():
            run.client_gone = True
            task.cancel()
            loop.call_later(_RECANCEL, gone)

    client._on_gone = gone
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        run.client_gone = True
        task.cancel()
        raise
    finally:
        client.stop()
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        if run.client_gone or isinstance(error, _Cut):
            return
        run.app_failed = True
        raise error


class LLMLimitMiddleware:
    """Token budgets for an OpenAI- or Anthropic-compatible ASGI app (or proxy).

    ``limiter``: a :class:`nexus_limits.TokenLimiter` (in-process, or from
    ``nexus_limits.redis`` / ``nexus_limits.redis.asyncio``). ``spend``: a
    :class:`~nexus_limits.spend.SpendLimiter`. ``key``: as for the other middleware
    (``"bearer"``, ``"header:<name>"``, a list of them, or a callable). ``output``: an
    :class:`~nexus_limits.tokens.OutputEstimate` for requests without a cap.
    ``openai_paths`` / ``anthropic_paths``: which POST paths are LLM calls.
    ``trusted_proxies``, ``forwarded_header`` and ``ipv6_prefix`` as for ``key="ip"``.

    ``meter_all``: every other request (any path, any method) is charged one request
    and 0 tokens, and holds a concurrency place while it runs, so that no route to the
    app is unmetered (needs ``limiter``). ``max_body``: the largest request body read
    (413 above). ``max_retry_after``: a refusal whose wait is longer than this (or that
    can never be admitted) says ``x-should-retry: false``. ``retry_after_range``: the
    bounds of the Retry-After of a concurrency refusal, which is the median time
    recent calls held their place.

    ``queue``: a :class:`~nexus_limits.fair.FairQueue` over ``limiter``: an LLM call the
    limiter would refuse waits, up to the queue's timeout, for its turn in
    weighted-fair order across keys, instead of an immediate 429 (a 429 with
    Retry-After when it cannot be admitted in time; nothing, when the client leaves
    while it waits).

    Every request the middleware cannot judge gets a 4xx naming the problem (a target
    that is not a plain path, a body that is not a JSON object, a field of the wrong
    type, a cap that is negative, fractional or above 2^53 - 1...), in the provider's
    error format, or ``application/problem+json`` when the client's ``Accept`` asks
    for it.
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
        forwarded_header: str = "x-forwarded-for",
        ipv6_prefix: int = 64,
        metrics: Any = None,
        metrics_labels: Tuple[str, str] = ("llm", ""),
        meter_all: bool = False,
        max_body: int = MAX_BODY,
        max_retry_after: float = 60.0,
        retry_after_range: Tuple[float, float] = RETRY_RANGE,
        queue: Any = None,
    ) -> None:
        if limiter is None and spend is None:
            raise ValueError("give a TokenLimiter (limiter=), a SpendLimiter (spend=) or both")
        if limiter is not None and not callable(getattr(limiter, "reserve", None)):
            raise TypeError(f"limiter must be a TokenLimiter, got {type(limiter).__name__}")
        if spend is not None and not callable(getattr(spend, "estimate", None)):
            raise TypeError(f"spend must be a SpendLimiter, got {type(spend).__name__}")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ValueError(f"max_body must be a positive int (bytes), got {max_body!r}")
        if not isinstance(max_retry_after, (int, float)) or not max_retry_after > 0:
            raise ValueError(f"max_retry_after must be a positive number of seconds, got {max_retry_after!r}")
        low, high = retry_after_range
        if not (0 < low <= high < math.inf):
            raise ValueError(f"retry_after_range must be (low, high) with 0 < low <= high, got {retry_after_range!r}")
        if queue is not None and (limiter is None or getattr(queue, "limiter", None) is not limiter):
            raise ValueError("queue must be a nexus_limits.fair.FairQueue over this middleware's limiter")
        if meter_all and limiter is None:
            raise ValueError("meter_all needs a TokenLimiter (limiter=) to charge the requests to")
        self.app = app
        self.limiter = limiter
        self.spend = spend
        self.queue = queue
        self.key_func: KeyFunc = parse_key_spec(
            key, trusted_proxies, forwarded_header=forwarded_header, ipv6_prefix=ipv6_prefix
        )
        self.output = output if output is not None else OutputEstimate()
        self.include_usage = include_usage
        self.paths = {normalize_target("POST", p)[1]: "openai" for p in openai_paths}
        self.paths.update({normalize_target("POST", p)[1]: "anthropic" for p in anthropic_paths})
        if metrics is not None and not callable(getattr(metrics, "observe", None)):
            raise TypeError(f"metrics must be a nexus_limits.metrics.Metrics, got {type(metrics).__name__}")
        self.metrics = metrics
        # (limiter, tier) labels; the route label is the request's path (one of `paths`),
        # or "other" for the requests meter_all charges.
        self.metrics_labels = metrics_labels
        self.meter_all = meter_all
        self.max_body = max_body
        self.max_retry_after = float(max_retry_after)
        self.holds = _Holds(float(low), float(high))
        # In-process backends are called directly, not through _call.
        self._direct = limiter is not None and _in_process(limiter)
        self._direct_spend = spend is not None and _in_process(spend)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = scope.get(GIVEN)
        if given is not None:
            method, path = given[0]
        else:
            try:
                method, path = target_of(scope)
            except BadRequest as error:
                await _refuse(send, _Format("problem"), 400, str(error))
                return
        provider = self.paths.get(path) if method == "POST" else None
        if provider is not None:
            await self._llm(scope, receive, send, provider, path)
        elif self.meter_all:
            await self._metered(scope, receive, send, (method, path))
        else:
            await self.app(scope, receive, send)

    def _key(self, scope: Scope, target: Tuple[str, str]) -> Any:
        given = scope.get(GIVEN)
        if given is not None:
            return given[1]
        return self.key_func(request_of(scope, target))

    def _observe(self, route: str, started: float, decision: Any) -> None:
        if self.metrics is not None:
            name, tier = self.metrics_labels
            self.metrics.observe(name, tier, route, time.perf_counter() - started, decision)

    # -- refusals ---------------------------------------------------------------------

    def _waits(self, reservation: Reservation) -> List[Tuple[str, float, str]]:
        """(budget, seconds until it frees up, sentence) for each limit that refused."""
        out: List[Tuple[str, float, str]] = []
        limiter = self.limiter
        estimate = reservation.estimate
        for name, d, rate in (
            ("requests", reservation.requests, getattr(limiter, "requests", None)),
            ("tokens", reservation.tokens, getattr(limiter, "tokens", None)),
            ("daily_tokens", reservation.daily_tokens, getattr(limiter, "daily_tokens", None)),
        ):
            if d is None or d.allowed:
                continue
            wait = float(d.retry_after)
            what = "request limit" if name == "requests" else "token limit" if name == "tokens" else "daily token limit"
            limit = f"{what} {rate}" if rate is not None else what
            if name == "requests":
                out.append((name, wait, f"{limit} reached; the next request is allowed in {_duration(wait)}"))
            elif not estimate:  # a peek: the key is in debt
                out.append((name, wait, f"{limit}: no tokens are left for this key; some free up in {_duration(wait)}"))
            elif math.isinf(wait):
                out.append(
                    (
                        name,
                        wait,
                        f"{limit}: this request's estimated {estimate} tokens are more than the limit holds,"
                        " so it can never be admitted; lower max_tokens or shorten the prompt",
                    )
                )
            else:
                out.append(
                    (
                        name,
                        wait,
                        f"{limit}: this request needs an estimated {estimate} tokens and {d.remaining} are left;"
                        f" enough frees up in {_duration(wait)}",
                    )
                )
        c = reservation.concurrency
        if c is not None and not c.allowed:
            wait = self.holds.wait()
            # A reservation over several levels (the gateway's teams) names the level
            # whose places are taken; a plain one is this key's.
            describe = getattr(reservation, "describe", None)
            words = describe("concurrency") if callable(describe) else None
            held = f"{c.limit} requests of {words.split(' of ', 1)[-1]}" if words else f"{c.limit} requests of this key"
            out.append(
                (
                    "concurrency",
                    wait,
                    f"concurrency limit {c.limit}: {held} are in flight;"
                    f" a place usually frees up within {_duration(wait)}",
                )
            )
        return out

    def _retry_headers(self, wait: float) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        if math.isfinite(wait):
            out.append(("retry-after", str(max(1, math.ceil(wait)))))
            out.append(("retry-after-ms", str(max(1, math.ceil(wait * 1000)))))
        if not math.isfinite(wait) or wait > self.max_retry_after:
            out.append(("x-should-retry", "false"))
        return out

    async def _refuse_reservation(self, send: Send, fmt: _Format, reservation: Reservation) -> None:
        waits = self._waits(reservation)
        if not waits:  # refused by nothing we can name (a full store)
            waits = [("requests", float(reservation.retry_after), "rate limit exceeded")]
        budget, wait, _ = max(waits, key=lambda w: w[1])
        message = "; ".join(sentence for _, _, sentence in waits)
        headers = [
            (k, v) for k, v in reservation.headers().items() if k.lower() not in ("retry-after", "retry-after-ms")
        ]
        extra: Dict[str, Any] = {"budget": budget, "retry_after": None if math.isinf(wait) else round(wait, 3)}
        if reservation.estimate:
            extra["estimate"] = reservation.estimate
        policy = getattr(reservation, "policy", None)
        if isinstance(policy, str):  # a hierarchy's refusing quota, "team.requests"
            extra["policy"] = policy
        await _refuse(
            send,
            fmt,
            429,
            message,
            code="rate_limit_exceeded",
            headers=[*headers, *self._retry_headers(wait)],
            extra=extra,
        )

    # -- requests that are not LLM calls ----------------------------------------------

    async def _metered(self, scope: Scope, receive: Receive, send: Send, target: Tuple[str, str]) -> None:
        fmt = _Format.of(scope, None)
        try:
            key = self._key(scope, target)
        except BadRequest as error:
            await _refuse(send, fmt, 400, str(error))
            return
        if key is None:
            await _refuse(send, fmt, 401, "no client key in the request")
            return
        started = time.perf_counter()
        reservation = await _call(self.limiter, self.limiter.reserve, key, 0)
        self._observe("other", started, reservation.decision)
        if not reservation.allowed:
            await self._refuse_reservation(send, fmt, reservation)
            return
        admitted = time.monotonic()
        first: Optional[Message] = None
        if not _has_body(scope):
            # Nothing to stream to the app: read the empty body now, so that the watch for
            # the client going away starts at once.
            first = await receive()
            if first["type"] == "http.disconnect":
                await self._release(reservation, admitted, _Run())
                return
        run = _Run()
        client = _Client(receive, first, scope)
        extra = _raw(list(reservation.headers().items()))

        async def relay(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _replace_headers(message, extra)
                run.started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                run.done = True
                await _protected(self._release(reservation, admitted, run))
            await send(message)

        try:
            await _run_app(self.app, scope, client, relay, run)
        finally:
            if not run.settled:
                await _protected(self._release(reservation, admitted, run))

    async def _release(self, reservation: Reservation, admitted: float, run: _Run) -> None:
        """Ends a metered request: its request stays charged, its lease ends."""
        if run.settled:
            return
        run.settled = True
        await _guarded(_call(self.limiter, reservation.settle, 0))
        if reservation.concurrency is not None:
            self.holds.add(time.monotonic() - admitted)

    # -- LLM calls --------------------------------------------------------------------

    def _judge_warming(self, raw: bytes, provider: str, key: Any) -> _Judged:
        """``_judge`` in a worker thread, building the common encodings first if needed."""
        if not _warm.is_set():
            warm_encodings()
            _warm.set()
        return self._judge(raw, provider, key)

    def _judge(self, raw: bytes, provider: str, key: Any) -> _Judged:
        """Parses, checks and counts a request body. Raises RequestBodyError (naming the
        field) or another ValueError/TypeError for a body that cannot be judged."""
        if not raw.strip():
            raise RequestBodyError("body", "the body is empty; it must be a JSON object")
        try:
            body = _loads(raw)
        except RecursionError:
            raise RequestBodyError("body", "the body is nested too deeply to read") from None
        except RequestBodyError:
            raise
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, too many digits
            raise RequestBodyError("body", f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            kind = type(body).__name__
            kind = {"list": "an array", "str": "a string", "NoneType": "null", "bool": "a boolean"}.get(
                kind, "a number"
            )
            raise RequestBodyError("body", f"the body must be a JSON object, got {kind}")
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise RequestBodyError("model", "'model' must be a string")
            if len(model) > MAX_MODEL_LENGTH:
                raise RequestBodyError("model", f"'model' is longer than {MAX_MODEL_LENGTH} characters")
        for cap in OutputEstimate.CAPS:
            if body.get(cap) is not None:
                OutputEstimate.cap(body, cap)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise RequestBodyError("stream", "'stream' must be a boolean")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestBodyError("stream_options", "'stream_options' must be an object")
        count = count_request_tokens(body, provider=provider, key=key)
        base = anthropic_estimator.base(body) if provider == "anthropic" else 0
        output = self.output.for_key(body, key) if hasattr(self.output, "for_key") else self.output(body)
        estimate = min(count.tokens + output, MAX_TOKENS)
        strip = False
        if provider == "openai" and stream and ("messages" in body or "prompt" in body) and self.include_usage:
            if not (options or {}).get("include_usage"):
                body["stream_options"] = {**(options or {}), "include_usage": True}
                raw = json.dumps(body).encode()
                strip = True
        return _Judged(body, raw, count, output, estimate, strip, base)

    async def _llm(self, scope: Scope, receive: Receive, send: Send, provider: str, path: str) -> None:
        fmt = _Format.of(scope, provider)
        try:
            key = self._key(scope, ("POST", path))
        except BadRequest as error:
            await _refuse(send, fmt, 400, str(error))
            return
        if key is None:
            await _refuse(send, fmt, 401, "no client key in the request", code="invalid_api_key")
            return
        peek = getattr(self.limiter, "peek", None)
        if callable(peek) and self.queue is None:  # a queued request may wait instead
            # Decided by the request limit, the concurrency limit or a token debt: the
            # body cannot change the answer, so it is not read.
            early = peek(key) if self._direct else await _call(self.limiter, peek, key)
            if not early.allowed:
                self._observe(path, time.perf_counter(), early.decision)
                await self._refuse_reservation(send, fmt, early)
                return
        try:
            raw = await _read_body(receive, self.max_body)
        except _TooLarge:
            await _refuse(
                send, fmt, 413, f"the request body is larger than {self.max_body} bytes", code="request_too_large"
            )
            return
        if raw is None:
            return  # the client left while sending its body
        try:
            if len(raw) > INLINE_BYTES or not _warm.is_set():
                # Building tiktoken's encodings takes about a second, once per process:
                # until then every request is judged in a thread, never on the loop.
                judged = await asyncio.to_thread(self._judge_warming, raw, provider, key)
            else:
                judged = self._judge(raw, provider, key)
        except RequestBodyError as error:
            await _refuse(send, fmt, 400, f"invalid request body: {error}", code="invalid_value", param=error.field)
            return
        except (ValueError, TypeError) as error:
            await _refuse(send, fmt, 400, f"invalid request body: {error}", code="invalid_value")
            return
        body = judged.body
        reservation: Optional[Reservation] = None
        if self.limiter is not None:
            started = time.perf_counter()
            if self.queue is not None:
                from ..fair import QueueCancelled, QueueRefused

                try:
                    # The body has been read: the queue watches receive() for a disconnect.
                    reservation = await self.queue.acquire_asgi(receive, key, judged.estimate)
                except QueueCancelled:
                    return  # the client left while it waited: nobody to answer
                except QueueRefused as error:
                    self._observe(path, started, error.decision)
                    wait = float(error.retry_after)
                    await _refuse(
                        send,
                        fmt,
                        429,
                        error.detail,
                        code="rate_limit_exceeded",
                        headers=self._retry_headers(wait),
                        extra={
                            "budget": "queue",
                            "reason": error.reason,
                            "retry_after": None if math.isinf(wait) else round(wait, 3),
                        },
                    )
                    return
            elif self._direct:
                reservation = self.limiter.reserve(key, judged.estimate)
            else:
                reservation = await _call(self.limiter, self.limiter.reserve, key, judged.estimate)
            self._observe(path, started, reservation.decision)
            if not reservation.allowed:
                await self._refuse_reservation(send, fmt, reservation)
                return
        spent = None
        if self.spend is not None:
            try:
                args = (key, body.get("model"), judged.counted.tokens, judged.output)
                if self._direct_spend:
                    spent = self.spend.reserve(*args)
                else:
                    spent = await _call(self.spend, self.spend.reserve, *args)
            except KeyError as error:  # UnknownModel: no price and no default
                if reservation is not None:
                    await _call(self.limiter, reservation.cancel)
                await _refuse(send, fmt, 400, str(error), code="model_not_found", param="model")
                return
            except BaseException:  # the spend backend failed: the tokens' lease must not stay held
                if reservation is not None:
                    await _guarded(_call(self.limiter, reservation.cancel))
                raise
            if not spent.allowed:
                if reservation is not None:
                    await _call(self.limiter, reservation.cancel)
                wait = float(spent.retry_after)
                headers = [(k, v) for k, v in spent.headers().items() if k.lower() != "retry-after"]
                await _refuse(
                    send,
                    fmt,
                    429,
                    spent.detail(),
                    code="rate_limit_exceeded",
                    headers=[*headers, *self._retry_headers(wait)],
                    extra={"budget": "spend", "retry_after": None if math.isinf(wait) else round(wait, 3)},
                )
                return
        both = _Both(reservation, spent, key, self)
        if judged.raw is not raw:
            scope = _rewritten(scope, len(judged.raw))
        await self._forward(scope, receive, send, provider, path, judged, both)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        provider: str,
        path: str,
        judged: _Judged,
        both: _Both,
    ) -> None:
        run = _Run()
        admitted = time.monotonic()
        ours = _encoded(both.headers())
        model = judged.body.get("model")
        response_provider = "openai-responses" if path == "/v1/responses" else provider
        client = _Client(receive, {"type": "http.request", "body": judged.raw, "more_body": False}, scope)

        async def relay(message: Message) -> None:
            if message["type"] == "http.response.start":
                run.status = int(message.get("status", 200))
                run.started = True
                content_type, content_encoding, headers = _start_headers(message, ours)
                if run.status < 400:
                    try:
                        run.reader = UsageReader(
                            response_provider,
                            model,
                            judged.counted.tokens,
                            content_type=content_type,
                            content_encoding=content_encoding,
                            strip_usage_chunk=judged.strip,
                        )
                        if judged.strip:  # else forwarded as they are
                            headers = run.reader.forwarded_headers(headers)
                    except Exception as error:  # reading usage must never break a response
                        log.warning("cannot read the usage of a %s response: %s", path, error)
                        run.reader_failed = True
                message = {**message, "headers": [*headers, *ours]}
            elif message["type"] == "http.response.body":
                if run.cut:
                    raise _Cut()
                chunk = message.get("body", b"")
                final = not message.get("more_body", False)
                reader = run.reader
                if reader is not None and not run.reader_failed:
                    try:
                        out = reader.feed(chunk)
                        if final:
                            out += reader.flush()
                    except Exception as error:
                        log.warning("cannot read the usage of a %s response: %s", path, error)
                        run.reader_failed = True
                        if reader.forward_decoded:
                            # What was forwarded so far was decoded: the rest cannot follow.
                            run.cut = True
                            await _protected(self._finish(both, provider, path, judged, run, admitted))
                            await send({"type": "http.response.body", "body": b"", "more_body": False})
                            raise _Cut() from None
                    else:
                        if out is not chunk:
                            message = {**message, "body": out}
                run.sent += len(chunk)
                if final:
                    run.done = True
                    # Settled before the client sees the end: its next call finds the
                    # budget and the concurrency place as this one left them.
                    await _protected(self._finish(both, provider, path, judged, run, admitted))
            await send(message)

        try:
            await _run_app(self.app, scope, client, relay, run)
        finally:
            if not run.settled:
                await _protected(self._finish(both, provider, path, judged, run, admitted))

    async def _finish(self, both: _Both, provider: str, path: str, judged: _Judged, run: _Run, admitted: float) -> None:
        """Settles (or cancels) a call once its response is over, once. Never raises."""
        if run.settled:
            return
        run.settled = True
        try:
            await self._settle(both, provider, path, judged, run)
        except Exception as error:  # a backend away: the lease expires on its own
            log.warning("could not settle a %s call: %s", path, error)
        if both.tokens is not None and both.tokens.concurrency is not None:
            self.holds.add(time.monotonic() - admitted)

    async def _settle(self, both: _Both, provider: str, path: str, judged: _Judged, run: _Run) -> None:
        if run.started and 400 <= run.status < 500:
            # The upstream refused the call (a bad request, its own rate limit): no tokens
            # were generated, but the call was made; it counts as a request (else a key
            # past its quota could send calls built to fail without end), its tokens and
            # dollars are refunded and its lease ends.
            await both.settle_at(Usage(0, 0, exact=False), judged.estimate)
            return
        if not run.started or run.status >= 500:
            # Nothing was delivered (the app failed or the client left before any answer,
            # or the upstream failed): a full refund. A client gone before the answer
            # still sent its prompt upstream: it pays its input.
            if run.client_gone and not run.started:
                await both.settle_at(Usage(judged.counted.tokens, 0, exact=False), judged.estimate)
            else:
                await both.cancel()
            return
        complete = run.done and not run.client_gone and not run.app_failed and not run.cut
        usage: Optional[Usage] = None
        if run.reader is not None and not run.reader_failed:
            try:
                if run.sent > INLINE_BYTES:
                    usage = await asyncio.to_thread(run.reader.finish, complete)
                else:
                    usage = run.reader.finish(complete)
            except UsageError as error:
                if complete:
                    log.warning("%s: the upstream's usage is unusable (%s); settled at the estimate", path, error)
            except Exception as error:
                log.warning("%s: reading the usage failed (%s); settled at the estimate", path, error)
        if usage is not None and not _trustworthy(usage):
            log.warning("%s: the upstream reported impossible usage %r; settled at the estimate", path, usage)
            usage = None
        if usage is None:
            if complete or run.sent:
                # Unreadable, or a JSON answer cut short (the upstream generated it whole
                # before sending it): the estimate.
                await both.settle_at(None, judged.estimate)
            else:  # gone before any byte: the prompt was sent, no output seen
                await both.settle_at(Usage(judged.counted.tokens, 0, exact=False), judged.estimate)
            return
        await both.settle_at(usage, judged.estimate)
        if complete and usage.exact:
            model = judged.body.get("model")
            if hasattr(self.output, "observe"):
                try:
                    self.output.observe(both.key, model, usage.output_tokens)
                except (ValueError, TypeError):
                    pass
            if provider == "anthropic":
                anthropic_estimator.observe(model, judged.base, usage.input_tokens, key=both.key)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers") or ():
        name = name.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and value.strip() not in (b"", b"0"):
            return True
    return False


def _start_headers(
    message: Message, ours: List[Tuple[bytes, bytes]]
) -> Tuple[Optional[str], Optional[str], List[Tuple[Any, Any]]]:
    """In one pass over a response start's headers: the first Content-Type, the first
    Content-Encoding, and the headers without those ``ours`` replaces (one value per
    name: the gateway's limits, not the upstream's)."""
    content_type: Optional[str] = None
    content_encoding: Optional[str] = None
    names = {k for k, _ in ours}
    kept: List[Tuple[Any, Any]] = []
    for key, value in message.get("headers") or ():
        name = bytes(key).lower()
        if name in names:
            continue
        kept.append((key, value))
        if name == b"content-type":
            if content_type is None:
                content_type = bytes(value).decode("latin-1")
        elif name == b"content-encoding" and content_encoding is None:
            content_encoding = bytes(value).decode("latin-1")
    return content_type, content_encoding, kept


# Our header names as bytes (they come from the limiters' configuration: a few names).
_NAMES: Dict[str, bytes] = {}


def _encoded(headers: Dict[str, str]) -> List[Tuple[bytes, bytes]]:
    """``_raw(list(headers.items()))`` with each name encoded once per process."""
    out: List[Tuple[bytes, bytes]] = []
    names = _NAMES
    for name, value in headers.items():
        raw = names.get(name)
        if raw is None:
            raw = name.lower().encode("latin-1")
            if len(names) < 256:
                names[name] = raw
        out.append((raw, value.encode("latin-1")))
    return out


def _replace_headers(message: Message, ours: List[Tuple[bytes, bytes]]) -> Message:
    """The response start with our headers replacing the app's of the same name (one
    value per name: the gateway's limits, not the upstream's)."""
    names = {k for k, _ in ours}
    kept = [(k, v) for k, v in message.get("headers") or () if bytes(k).lower() not in names]
    return {**message, "headers": [*kept, *ours]}


def _trustworthy(usage: Any) -> bool:
    """Usage an upstream reported that can be charged: whole, non-negative counts the
    backends hold exactly, cached input within input."""
    counts = (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens)
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOKENS:
            return False
    return bool(
        usage.cached_input_tokens <= usage.input_tokens and usage.input_tokens + usage.output_tokens <= MAX_TOKENS
    )


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
            await _guarded(_call(self.owner.limiter, self.tokens.cancel))
        if self.spend is not None:
            await _guarded(_call(self.owner.spend, self.spend.cancel))

    async def settle_at(self, usage: Optional[Usage], estimate: int) -> None:
        """Settles at ``usage`` (None: at the estimate); ends the lease either way."""
        if self.tokens is not None:
            tokens = estimate if usage is None else usage.total_tokens
            if self.owner._direct:
                try:
                    self.tokens.settle(tokens)
                except Exception as error:
                    log.warning("could not settle a reservation: %s", error)
            else:
                await _guarded(_call(self.owner.limiter, self.tokens.settle, tokens))
        if self.spend is not None:
            spend = self.spend
            if usage is not None:
                try:
                    micros = self.owner.spend.cost(spend.model, usage)
                except (ValueError, TypeError, KeyError) as error:  # usage the price table cannot cost
                    log.warning("the usage of a call cannot be priced (%s); its spend settles at the estimate", error)
                    usage = None
            await _guarded(_call(self.owner.spend, spend.settle, spend.estimate_micros if usage is None else micros))


async def _guarded(step: Any) -> None:
    """Awaits one settle/cancel: a backend away is logged (the lease then expires on its
    own); nothing is raised past the middleware."""
    try:
        await step
    except Exception as error:
        log.warning("could not settle a reservation: %s", error)
