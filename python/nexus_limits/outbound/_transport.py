"""httpx transports (sync and async) that hold every LLM call until the provider's
limits allow it, then settle it from the answer."""

from __future__ import annotations

import importlib
import time
from types import TracebackType
from typing import Any, AsyncIterator, Dict, Iterator, Mapping, Optional, Tuple, Type

from ..tokens import Usage, UsageError, UsageReader
from ._engine import LARGE_BODY, Call, Deadline, OutboundLimiter, Ticket
from ._errors import OutboundRefused

__all__ = ["AsyncLimitedTransport", "LimitedTransport"]

REFUSALS = ("raise", "response")


def _flavour(obj: Any) -> Any:
    """The HTTP library of an httpx-style object: ``httpx`` or ``httpx2`` (the fork the
    newest openai and anthropic SDKs use; both have the same transport API), found
    along its class's bases (the SDKs subclass the clients). ImportError if none."""
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".", 1)[0]
        if root in ("httpx", "httpx2"):
            return importlib.import_module(root)
    raise ImportError(f"{type(obj).__name__} is not an httpx or httpx2 object")


_STREAMS: Dict[Tuple[str, bool], type] = {}


def _stream_class(module: Any, is_async: bool) -> type:
    """A byte stream of ``module``'s kind (its client asserts the type) that lets the
    answer's bytes through unchanged while a UsageReader reads them."""
    key = (module.__name__, is_async)
    cls = _STREAMS.get(key)
    if cls is not None:
        return cls
    if is_async:

        class _AsyncMetered(module.AsyncByteStream):  # type: ignore[misc]
            def __init__(self, inner: Any, meter: _Meter) -> None:
                self._inner = inner
                self._meter = meter

            async def __aiter__(self) -> AsyncIterator[bytes]:
                complete = False
                try:
                    async for chunk in self._inner:
                        self._meter.feed(chunk)
                        yield chunk
                    complete = True
                finally:
                    await self._meter.end_async(complete)

            async def aclose(self) -> None:
                try:
                    await self._inner.aclose()
                finally:
                    await self._meter.end_async(False)

        cls = _AsyncMetered
    else:

        class _Metered(module.SyncByteStream):  # type: ignore[misc]
            def __init__(self, inner: Any, meter: _Meter) -> None:
                self._inner = inner
                self._meter = meter

            def __iter__(self) -> Iterator[bytes]:
                complete = False
                try:
                    for chunk in self._inner:
                        self._meter.feed(chunk)
                        yield chunk
                    complete = True
                finally:
                    self._meter.end(complete)

            def close(self) -> None:
                try:
                    self._inner.close()
                finally:
                    self._meter.end(False)

        cls = _Metered
    _STREAMS[key] = cls
    return cls


class _Meter:
    """Reads one answer's usage as its bytes pass, and settles its ticket once."""

    __slots__ = ("_limiter", "_reader", "_ticket", "_usage_done")

    def __init__(self, limiter: OutboundLimiter, ticket: Ticket, headers: Mapping[str, str]) -> None:
        self._limiter = limiter
        self._ticket = ticket
        self._usage_done = False
        call = ticket.call
        self._reader: Optional[UsageReader]
        try:
            self._reader = UsageReader(
                call.provider,
                call.model,
                call.input,
                content_type=headers.get("content-type"),
                content_encoding=headers.get("content-encoding"),
            )
        except (ValueError, TypeError):  # pragma: no cover - checked arguments
            self._reader = None

    def feed(self, chunk: bytes) -> None:
        reader = self._reader
        if reader is not None:
            try:
                reader.feed(chunk)
            except Exception:  # reading usage must never break the answer
                self._reader = None

    def _usage(self, complete: bool) -> Optional[Usage]:
        if self._usage_done:
            return None
        self._usage_done = True
        reader = self._reader
        if reader is None:
            return None
        try:
            return reader.finish(complete)
        except UsageError:
            return None

    @property
    def pending(self) -> bool:
        return not self._usage_done

    def end(self, complete: bool) -> None:
        if self.pending:
            self._limiter.settle(self._ticket, self._usage(complete))

    async def end_async(self, complete: bool) -> None:
        if self.pending:
            await self._limiter.settle_async(self._ticket, self._usage(complete))


def _request_headers(request: Any) -> Dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _connect_errors(module: Any) -> Tuple[Type[BaseException], ...]:
    """Errors after which the request surely never reached the provider."""
    return tuple(
        getattr(module, name) for name in ("ConnectError", "ConnectTimeout", "PoolTimeout") if hasattr(module, name)
    )


class _Options:
    """What the sync and async transports share."""

    def _setup(self, transport: Any, limiter: Optional[OutboundLimiter], refusal: str, options: Dict[str, Any]) -> None:
        if refusal not in REFUSALS:
            raise ValueError(f"refusal must be 'raise' or 'response', got {refusal!r}")
        if limiter is not None:
            if options:
                raise TypeError(f"give either limiter= or limiter options ({', '.join(sorted(options))}), not both")
            if not isinstance(limiter, OutboundLimiter):
                raise TypeError(f"limiter must be an OutboundLimiter, got {type(limiter).__name__}")
        self.limiter = limiter if limiter is not None else OutboundLimiter(**options)
        self.refusal = refusal
        self._given = transport
        self._inner: Dict[str, Any] = {}
        # Keeps alive whatever the inner transport's owner is (wrap() sets it).
        self._keep: Any = None

    def _inner_for(self, request: Any, factory: str) -> Any:
        if self._given is not None:
            return self._given
        module = _flavour(request)
        inner = self._inner.get(module.__name__)
        if inner is None:
            inner = self._inner[module.__name__] = getattr(module, factory)()
        return inner

    def _plan(self, request: Any) -> Optional[Call]:
        headers = _request_headers(request)
        if self.limiter.route(request.method, request.url.path, headers) is None:
            return None
        return self.limiter.plan(request.method, request.url.path, headers, request.content)

    def _refused(self, request: Any, call: Call, error: OutboundRefused) -> Any:
        if self.refusal == "raise":
            raise error
        module = _flavour(request)
        return module.Response(
            429,
            headers={
                "content-type": "application/json",
                # The SDKs retry a 429 unless told not to: this one will not pass by retrying.
                "x-should-retry": "false",
                "x-nexus-limits-refused": error.code,
            },
            content=self.limiter.refusal_body(call, error),
            request=request,
        )

    def _metered_response(self, response: Any, ticket: Ticket, is_async: bool) -> Any:
        headers = {k.lower(): v for k, v in response.headers.items()}
        meter = _Meter(self.limiter, ticket, headers)
        module = _flavour(response)
        stream = _stream_class(module, is_async)(response.stream, meter)
        return module.Response(
            response.status_code,
            headers=response.headers,
            stream=stream,
            extensions=response.extensions,
        )

    def stats(self) -> Dict[str, Any]:
        """The limiter's statistics (see :meth:`OutboundLimiter.stats`)."""
        return self.limiter.stats()


class LimitedTransport(_Options):
    """An httpx transport that keeps an application under its LLM provider's limits.

    Give it to the SDK's HTTP client::

        import httpx, openai
        from nexus_limits.outbound import LimitedTransport

        client = openai.OpenAI(http_client=httpx.Client(transport=LimitedTransport()))

    (or use :func:`nexus_limits.outbound.wrap`). For every LLM call — ``POST`` to
    ``.../chat/completions``, ``/completions``, ``/embeddings``, ``/responses`` or
    Anthropic's ``/messages`` — it:

    1. counts the request's input tokens (exactly for OpenAI models, with tiktoken;
       estimated for Claude, with an estimator that learns from every answer's usage
       and a safety ``estimate_margin``) and takes the output cap (``max_tokens``...)
       or, without one, a learned estimate of the model's outputs;
    2. waits, in first-come order per model, until the model's buckets hold the call —
       ``requests`` and ``tokens`` (OpenAI), ``requests``, ``input_tokens`` and
       ``output_tokens`` (Anthropic) — and reserves it. A call that needs more than a
       whole limit is refused at once (:class:`CallTooLarge`), one that cannot be
       admitted within ``timeout`` seconds too (:class:`QuotaTimeout`);
    3. sends it; from the answer's rate-limit headers it learns limits it was not
       given and raises its own count of what is used to what the provider reports
       (so processes sharing one organisation's limit converge on the provider's
       view); on a provider 429 it pauses the model until ``retry-after`` and sends
       the call again itself (up to ``max_requeue`` times), instead of every caller
       retrying at once;
    4. settles the reservation from the answer's real usage, read from the bytes as
       they pass (JSON and streams, compressed or not): OpenAI counts the output cap
       against its token limit, Anthropic the real output.

    Other requests pass through untouched.

    Options (or ``limiter=`` an :class:`OutboundLimiter` shared with other transports):

    - ``limits``: ``{"gpt-4o": {"requests": "500/minute", "tokens": "30000/minute"}}``;
      ``"*"`` for every model not listed. Limits not given are learned from the
      provider's headers (``learn=True``): the first call to a model goes alone, the
      others wait for its answer, so not even the first ones meet a 429. Learned limits
      are taken per ``window`` seconds (60: OpenAI's and Anthropic's are per minute).
    - ``store``: where the buckets live — None (this process), a
      :class:`~nexus_limits.SharedMemoryStore` (every process of the host that opens
      it), or a Redis client (every host; a ``redis.asyncio`` client for the async
      transport; a Redis Cluster client works too: a model's keys share one slot).
    - ``on_error`` (Redis only): what a call does while Redis cannot be reached —
      ``"raise"`` (the default) raises :class:`~nexus_limits.BackendUnavailable`;
      ``"deny"`` refuses it (:class:`StoreUnavailable`, an :class:`OutboundRefused`);
      ``"allow"`` sends it unmetered; ``"local"`` meters it in this process against
      every limit divided by ``replicas`` (how many processes share the limits).
      The client's circuit breaker (shared with the library's other Redis limiters)
      makes the first call that meets the outage wait at most the client's socket
      timeouts and the next ones answer at once; ``stats()["redis"]`` shows it.
    - ``timeout``: the longest wait for quota, in seconds (None: no limit).
    - ``refusal``: ``"raise"`` (the default) raises :class:`OutboundRefused`; with
      ``"response"`` the transport answers a 429 in the provider's own error format
      with ``x-should-retry: false``, which the SDKs raise as their ``RateLimitError``
      without retrying (what :func:`wrap` uses).
    - ``aimd``: an :class:`AIMD` controller, copied per model, over a requests-per-
      ``window`` gate in this process: halved on every 429 (and overload), raised while
      healthy — for providers that send no rate-limit headers.

    ``transport``: the transport that sends (default: httpx's ``HTTPTransport()``, of
    the same library as the client's requests, httpx or httpx2).
    """

    def __init__(
        self,
        transport: Any = None,
        *,
        limiter: Optional[OutboundLimiter] = None,
        refusal: str = "raise",
        **options: Any,
    ) -> None:
        self._setup(transport, limiter, refusal, options)

    def handle_request(self, request: Any) -> Any:
        inner = self._inner_for(request, "HTTPTransport")
        if self.limiter.route(request.method, request.url.path, _request_headers(request)) is None:
            return inner.handle_request(request)
        request.read()
        call = self._plan(request)
        if call is None:  # pragma: no cover - routed above
            return inner.handle_request(request)
        limiter = self.limiter
        deadline = Deadline(limiter.timeout)
        attempt = 0
        while True:
            try:
                ticket = limiter.admit(call, deadline)
            except OutboundRefused as error:
                return self._refused(request, call, error)
            ticket.sent_at = time.monotonic()
            try:
                response = inner.handle_request(request)
            except BaseException as error:
                limiter.failed(ticket, sent=not isinstance(error, _connect_errors(_flavour(request))))
                raise
            headers = {k.lower(): v for k, v in response.headers.items()}
            pause = limiter.answered(ticket, response.status_code, headers)
            if response.status_code == 429 and attempt < limiter.max_requeue and pause <= deadline.left():
                response.close()
                attempt += 1
                limiter.requeued(ticket)
                continue
            if ticket.done:
                return response
            return self._metered_response(response, ticket, is_async=False)

    def close(self) -> None:
        inners = [self._given] if self._given is not None else list(self._inner.values())
        for inner in inners:
            inner.close()

    def __enter__(self) -> LimitedTransport:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]] = None,
        exc: Optional[BaseException] = None,
        tb: Optional[TracebackType] = None,
    ) -> None:
        self.close()


class AsyncLimitedTransport(_Options):
    """:class:`LimitedTransport` for asyncio clients (``openai.AsyncOpenAI``,
    ``anthropic.AsyncAnthropic``, ``httpx.AsyncClient``): waits with ``asyncio.sleep``
    and never blocks the event loop (large bodies are counted on a worker thread). With
    Redis, ``store`` is a ``redis.asyncio`` client."""

    def __init__(
        self,
        transport: Any = None,
        *,
        limiter: Optional[OutboundLimiter] = None,
        refusal: str = "raise",
        **options: Any,
    ) -> None:
        self._setup(transport, limiter, refusal, options)

    async def handle_async_request(self, request: Any) -> Any:
        inner = self._inner_for(request, "AsyncHTTPTransport")
        if self.limiter.route(request.method, request.url.path, _request_headers(request)) is None:
            return await inner.handle_async_request(request)
        await request.aread()
        if len(request.content) > LARGE_BODY:
            import asyncio

            call = await asyncio.get_running_loop().run_in_executor(None, self._plan, request)
        else:
            call = self._plan(request)
        if call is None:  # pragma: no cover - routed above
            return await inner.handle_async_request(request)
        limiter = self.limiter
        deadline = Deadline(limiter.timeout)
        attempt = 0
        while True:
            try:
                ticket = await limiter.admit_async(call, deadline)
            except OutboundRefused as error:
                return self._refused(request, call, error)
            ticket.sent_at = time.monotonic()
            try:
                response = await inner.handle_async_request(request)
            except BaseException as error:
                await limiter.failed_async(ticket, sent=not isinstance(error, _connect_errors(_flavour(request))))
                raise
            headers = {k.lower(): v for k, v in response.headers.items()}
            pause = await limiter.answered_async(ticket, response.status_code, headers)
            if response.status_code == 429 and attempt < limiter.max_requeue and pause <= deadline.left():
                await response.aclose()
                attempt += 1
                limiter.requeued(ticket)
                continue
            if ticket.done:
                return response
            return self._metered_response(response, ticket, is_async=True)

    async def aclose(self) -> None:
        inners = [self._given] if self._given is not None else list(self._inner.values())
        for inner in inners:
            await inner.aclose()

    async def __aenter__(self) -> AsyncLimitedTransport:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]] = None,
        exc: Optional[BaseException] = None,
        tb: Optional[TracebackType] = None,
    ) -> None:
        await self.aclose()
