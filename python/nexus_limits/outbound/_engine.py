"""The outbound limiter's decisions, free of HTTP: what a request costs, when it may
go, what the answer proves, and how it settles. The transports drive it."""

from __future__ import annotations

import collections
import json
import math
import threading
import time
import weakref
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple, Union

import nexus_limits as nl

from ..tokens import (
    AnthropicEstimator,
    OutputEstimate,
    RequestBodyError,
    Usage,
    count_request_tokens,
    parse_rate_limit_headers,
)
from ._aimd import AIMD
from ._errors import CallTooLarge, OutboundRefused, QuotaTimeout
from ._ledger import _Ledger, ledger_for

__all__ = ["DIMENSIONS", "OutboundLimiter", "parse_limits"]

DIMENSIONS = ("requests", "tokens", "input_tokens", "output_tokens")

# Request paths that are LLM calls (suffixes, so that Azure's
# /openai/deployments/<name>/chat/completions and proxies' prefixes match too).
_ROUTES: Tuple[Tuple[str, str, str], ...] = (
    ("/chat/completions", "openai", "chat"),
    ("/completions", "openai", "completions"),
    ("/embeddings", "openai", "embeddings"),
    ("/responses", "openai", "responses"),
    ("/messages", "anthropic", "messages"),
)
# Poll while another call probes a model.
_PROBE_POLL = 0.01
# How long the others wait for the probe's whole answer (a long stream) once the
# limits are known.
PROBE_PATIENCE = 1.0
# How long the others wait for the probe's headers when the limits are unknown.
PROBE_WAIT = 5.0
# Without retry-after or reset headers, a 429 pauses the model this long.
_DEFAULT_PAUSE = 1.0
# The longest pause a provider's 429 may impose on its own (a longer retry-after is cut).
MAX_PROVIDER_PAUSE = 120.0
# Learned limits above these are taken for garbage (no provider grants them per
# window; the shared store's buckets could not hold them).
_MAX_LEARNED = {"requests": 10**7, "tokens": 10**10, "input_tokens": 10**10, "output_tokens": 10**10}
# The longest time a request is taken to need to reach the provider once sent: the
# provider starts counting a call that much later than the local buckets.
MAX_LEAD = 0.25
# The most models kept apart; calls to more share the state named OTHER_MODELS.
MAX_MODELS = 4096
OTHER_MODELS = "(other models)"
# Bodies larger than this are counted on a worker thread by the async transport.
LARGE_BODY = 64 << 10

RateLike = Union[str, int, nl.Rate]
# A ticket charged on the limiter's own ledger.
_MAIN: Any = object()


def _rate(value: Any, window: float, where: str) -> nl.Rate:
    if isinstance(value, nl.Rate):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{where} must be a rate such as '500/minute', got a bool")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{where} must be at least 1, got {value}")
        return nl.Rate(value, window)
    if isinstance(value, str):
        try:
            return nl.Rate.parse(value)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    raise TypeError(f"{where} must be a rate such as '500/minute' (or an int per window), got {type(value).__name__}")


def parse_limits(limits: Any, window: float = 60.0) -> Dict[str, Dict[str, nl.Rate]]:
    """``{"gpt-4o": {"requests": "500/minute", "tokens": "30000/minute"}}`` -> rates per
    model and limit. ``"*"`` is the default for models not listed. Limits are
    ``requests``, ``tokens`` (OpenAI: input plus output), ``input_tokens`` and
    ``output_tokens`` (Anthropic's separate limits); an int is a count per ``window``
    seconds."""
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise TypeError(f"limits must be a dict of model -> {{limit: rate}}, got {type(limits).__name__}")
    out: Dict[str, Dict[str, nl.Rate]] = {}
    for model, spec in limits.items():
        if not isinstance(model, str) or not model:
            raise TypeError(f"limits: model names must be non-empty str, got {model!r}")
        if not isinstance(spec, Mapping):
            raise TypeError(f"limits[{model!r}] must be a dict such as {{'requests': '500/minute'}}")
        rates: Dict[str, nl.Rate] = {}
        for dim, value in spec.items():
            if dim not in DIMENSIONS:
                raise ValueError(f"limits[{model!r}]: unknown limit {dim!r}; expected one of {', '.join(DIMENSIONS)}")
            rates[dim] = _rate(value, window, f"limits[{model!r}][{dim!r}]")
        out[model] = rates
    return out


def _retry_after(headers: Mapping[str, str], parsed: Optional[float]) -> Optional[float]:
    """``retry-after-ms`` (float milliseconds, as OpenAI sends it) first, then
    ``retry-after`` (seconds or an HTTP date); None if neither is usable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    return parsed


class Call:
    """One LLM request, as the limiter sees it: its model, its input tokens (counted
    for OpenAI models, estimated for Claude) and the output it may produce."""

    __slots__ = ("base", "body", "cap", "exact", "input", "kind", "model", "output", "provider")

    def __init__(
        self,
        provider: str,
        kind: str,
        model: str,
        body: Optional[Dict[str, Any]],
        input_tokens: int,
        exact: bool,
        base: int,
        cap: Optional[int],
        output: int,
    ) -> None:
        self.provider = provider
        self.kind = kind
        self.model = model
        self.body = body
        self.input = input_tokens
        self.exact = exact
        self.base = base
        self.cap = cap
        self.output = output

    def costs(self, rates: Mapping[str, nl.Rate], margin: float) -> Dict[str, int]:
        """Units to reserve on each limit that ``rates`` has."""
        inp = self.input if self.exact else math.ceil(self.input * (1 + margin))
        out = self.output
        if self.cap is None:
            # An output guess never makes a call too large: the provider will stop it
            # or the settlement will charge what it really used.
            for dim, room in (("tokens", inp), ("output_tokens", 0)):
                rate = rates.get(dim)
                if rate is not None:
                    out = max(0, min(out, rate.count - room))
        costs = {"requests": 1}
        if self.provider == "anthropic":
            costs.update(input_tokens=inp, output_tokens=out, tokens=inp + out)
        else:
            costs["tokens"] = inp + out
        return {dim: n for dim, n in costs.items() if dim in rates}

    def actual(self, usage: Usage) -> Dict[str, int]:
        """What the provider counted against each limit, from the answer's usage."""
        if self.provider == "anthropic":
            # Cache reads do not count against Anthropic's input limit.
            inp = max(0, usage.input_tokens - usage.cached_input_tokens)
            out = usage.output_tokens
            return {"requests": 1, "input_tokens": inp, "output_tokens": out, "tokens": inp + out}
        # OpenAI counts the output cap against its token limit, whatever the answer used.
        out = usage.output_tokens if self.cap is None else max(self.cap, usage.output_tokens)
        return {"requests": 1, "tokens": usage.input_tokens + out}

    def __repr__(self) -> str:
        return f"Call({self.provider} {self.kind} model={self.model!r} input={self.input} output={self.output})"


class Ticket:
    """An admitted call: what it reserved, on which limits, and when it was sent."""

    __slots__ = ("call", "costs", "done", "ledger", "model", "probe", "sent_at")

    def __init__(self, call: Call, costs: Optional[Dict[str, int]], probe: bool = False, ledger: Any = _MAIN) -> None:
        self.call = call
        # Where the call is charged: _MAIN (the limiter's ledger), another ledger (the
        # local one that answered while Redis was away) or None (charged nowhere).
        self.ledger = ledger
        # The name the model's state is kept under (the call's model, or OTHER_MODELS).
        self.model = call.model
        self.costs = costs
        self.probe = probe
        self.sent_at = time.monotonic()
        self.done = False


class Deadline:
    __slots__ = ("end", "timeout")

    def __init__(self, timeout: Optional[float]) -> None:
        self.timeout = timeout
        self.end = math.inf if timeout is None else time.monotonic() + timeout

    def left(self) -> float:
        return self.end - time.monotonic()


class _Model:
    """What this process knows of one model."""

    __slots__ = (
        "aimd",
        "async_locks",
        "gate",
        "given",
        "headerless",
        "learned",
        "lock",
        "name",
        "probe_started",
        "probed",
        "probing",
        "stats",
        "ttfb",
    )

    def __init__(self, name: str, given: Dict[str, nl.Rate], aimd: Optional[AIMD], window: float) -> None:
        self.name = name
        self.given = given
        self.learned: Dict[str, nl.Rate] = {}
        # True once an answer came without rate-limit headers: nothing to learn, so the
        # model is not held back (a 429 still pauses it).
        self.headerless = False
        # The first call to a model goes alone (the probe): its answer teaches the
        # limits (when not given) and calibrates the Claude estimator before the rest.
        self.probing = False
        self.probed = False
        self.probe_started = 0.0
        self.lock = threading.Lock()
        # One FIFO lock per event loop (an asyncio.Lock belongs to its loop).
        self.async_locks: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        # Recent times from sending to the answer's headers: they bound how long a
        # request takes to reach the provider (see lead() and _ledger.take).
        self.ttfb: Deque[float] = collections.deque(maxlen=32)
        self.aimd = aimd
        self.gate: Optional[nl.TokenBucket] = None
        if aimd is not None:
            self.gate = nl.TokenBucket(nl.Rate(max(1, round(aimd.value)), window))
        self.stats: Dict[str, float] = {
            "calls": 0,
            "admitted": 0,
            "waited_seconds": 0.0,
            "requeued": 0,
            "provider_429": 0,
            "too_large": 0,
            "timeouts": 0,
            "settled": 0,
            "settled_at_estimate": 0,
            "resynced": 0,
        }

    def rates(self) -> Dict[str, nl.Rate]:
        return {**self.learned, **self.given} if self.learned else self.given

    def lead(self) -> float:
        """How late the provider may count a call it is sent now: the longest recent
        time to an answer's headers (which includes the way there), at most MAX_LEAD;
        MAX_LEAD before any answer."""
        return min(max(self.ttfb, default=MAX_LEAD), MAX_LEAD)


class OutboundLimiter:
    """The state behind :class:`LimitedTransport` and :class:`AsyncLimitedTransport`:
    per-model limits (given or learned), the buckets (in a ledger: this process, a
    SharedMemoryStore or Redis), the Claude token estimator and the learned output
    sizes. Several transports may share one (``limiter=``), e.g. a sync and an async
    client of the same application. See :class:`LimitedTransport` for the options."""

    def __init__(
        self,
        limits: Optional[Mapping[str, Mapping[str, RateLike]]] = None,
        *,
        store: Any = None,
        window: float = 60.0,
        timeout: Optional[float] = 300.0,
        learn: bool = True,
        max_requeue: int = 3,
        estimate_margin: float = 0.1,
        output_tokens: int = 1024,
        aimd: Optional[AIMD] = None,
        namespace: str = "outbound",
        on_error: str = "raise",
        replicas: int = 1,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not (0 < window < math.inf):
            raise ValueError(f"window must be a positive number of seconds, got {window!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0
        ):
            raise ValueError(f"timeout must be None or a non-negative number of seconds, got {timeout!r}")
        if isinstance(max_requeue, bool) or not isinstance(max_requeue, int) or max_requeue < 0:
            raise ValueError(f"max_requeue must be a non-negative int, got {max_requeue!r}")
        if (
            isinstance(estimate_margin, bool)
            or not isinstance(estimate_margin, (int, float))
            or not 0 <= estimate_margin <= 10
        ):
            raise ValueError(f"estimate_margin must be a number in [0, 10], got {estimate_margin!r}")
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
            raise ValueError(f"output_tokens must be a non-negative int, got {output_tokens!r}")
        if aimd is not None and not isinstance(aimd, AIMD):
            raise TypeError(f"aimd must be an AIMD controller (a template copied per model), got {type(aimd).__name__}")
        if not isinstance(namespace, str) or not namespace or "\x00" in namespace:
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        self.window = float(window)
        self.limits = parse_limits(limits, self.window)
        self.timeout = None if timeout is None else float(timeout)
        self.learn = bool(learn)
        self.max_requeue = max_requeue
        self.estimate_margin = float(estimate_margin)
        self.aimd = aimd
        self.ledger: _Ledger = ledger_for(store, namespace, on_error=on_error, replicas=replicas)
        self.estimator = AnthropicEstimator()
        from ..spend import LearnedOutputEstimate

        self.outputs = LearnedOutputEstimate(default=output_tokens, min_samples=20)
        self._models: Dict[str, _Model] = {}
        self._lock = threading.Lock()

    # --- planning ---------------------------------------------------------------------
    @staticmethod
    def route(method: str, path: str, headers: Mapping[str, str]) -> Optional[Tuple[str, str]]:
        """(provider, kind) when ``method path`` is an LLM call the limiter meters."""
        if method.upper() != "POST":
            return None
        path = path.rstrip("/")
        for suffix, provider, kind in _ROUTES:
            if path.endswith(suffix):
                if kind == "messages" and "/threads/" in path:
                    return None  # OpenAI Assistants' thread messages, not an LLM call
                if kind == "completions" and path.endswith("/chat/completions"):  # pragma: no cover - order
                    continue
                return provider, kind
        return None

    def plan(self, method: str, path: str, headers: Mapping[str, str], content: bytes) -> Optional[Call]:
        """The :class:`Call` of a request, or None when it is not metered (not an LLM
        call). Never raises for any body: one that cannot be read is estimated from its
        size (the provider will judge it)."""
        routed = self.route(method, path, headers)
        if routed is None:
            return None
        provider, kind = routed
        if "anthropic-version" in headers:
            provider = "anthropic"
        body: Optional[Dict[str, Any]] = None
        if not headers.get("content-encoding"):
            try:
                parsed = json.loads(content) if content else None
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, dict):
                body = parsed
        model = body.get("model") if body is not None else None
        if not isinstance(model, str) or not model or len(model) > 200:
            model = _deployment(path) or "unknown"
        rough = max(1, math.ceil(len(content) / 3))
        base = 0
        if body is None:
            count, exact = rough, False
        elif provider == "anthropic":
            try:
                base = self.estimator.base(body)
                count, exact = math.ceil(base * self.estimator.factor(model)), False
            except (RequestBodyError, TypeError, RecursionError):
                count, exact = rough, False
        else:
            try:
                counted = count_request_tokens(body, "openai", model)
                count, exact = counted.tokens, counted.exact
            except (RequestBodyError, TypeError, ValueError, RecursionError):
                count, exact = rough, False
        cap: Optional[int] = None
        if body is not None:
            for name in OutputEstimate.CAPS:
                if body.get(name) is not None:
                    try:
                        cap = OutputEstimate.cap(body, name)
                    except RequestBodyError:
                        cap = None
                    break
        if kind == "embeddings":
            cap, output = None, 0
        elif cap is not None:
            output = cap
        else:
            learned = self.outputs.learned(None, model)
            output = learned if learned is not None else self.outputs.default
        choices = body.get("n") if body is not None else None
        if type(choices) is int and 1 < choices <= 128 and output:
            # n answers to one prompt: OpenAI counts the output cap once per answer.
            output *= choices
            cap = None if cap is None else cap * choices
        return Call(provider, kind, model, body, count, exact, base, cap, output)

    # --- models -----------------------------------------------------------------------
    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            with self._lock:
                if name not in self._models and len(self._models) >= MAX_MODELS:
                    # Model names come from request bodies: past this many, the rest
                    # share one state rather than grow memory without end.
                    name = OTHER_MODELS
                model = self._models.get(name)
                if model is None:
                    given = dict(self.limits.get(name, self.limits.get("*", {})))
                    aimd = self.aimd.copy() if self.aimd is not None else None
                    model = self._models[name] = _Model(name, given, aimd, self.window)
        return model

    def rates(self, model: str) -> Dict[str, nl.Rate]:
        """The limits in force for ``model`` (given, else learned)."""
        return self._model(model).rates()

    # --- admission (one step; the transports loop and sleep) --------------------------
    def _begin(self, call: Call) -> _Model:
        model = self._model(call.model)
        model.stats["calls"] += 1
        return model

    def _step(self, model: _Model, call: Call, probe: bool) -> Tuple[str, Any]:
        """What a call does next: ``("go", ticket)`` (sent unreserved: a model whose
        limits are unknown and not learned, or the probe that will learn them),
        ``("wait", seconds)`` (for the probe), or ``("take", (rates, costs, probe))``.
        ``probe``: this call is already the probe."""
        rates = model.rates()
        if not rates and (not self.learn or model.headerless):
            return "go", Ticket(call, None)
        if not probe and (not rates or (call.provider == "anthropic" and call.base > 0 and not model.probed)):
            with self._lock:
                waited = time.monotonic() - model.probe_started
                if not model.probing:
                    model.probing = probe = True
                    model.probe_started = time.monotonic()
                elif not rates and waited >= PROBE_WAIT:
                    # The probe is slow to answer (a long generation): go unmetered
                    # rather than wait longer; the answers' headers (a 429's too)
                    # teach the limits soon enough.
                    return "go", Ticket(call, None)
                elif not rates or waited < PROBE_PATIENCE:
                    return "wait", _PROBE_POLL
        if not rates:
            return "go", Ticket(call, None, probe=True)
        if call.provider == "anthropic" and call.base > 0:
            # Estimated now, with what the estimator learnt while this call waited.
            call.input = math.ceil(call.base * self.estimator.factor(call.model))
        return "take", (rates, call.costs(rates, self.estimate_margin), probe)

    def _end_probe(self, model: _Model) -> None:
        with self._lock:
            model.probing = False
            model.probed = True

    def _gate_wait(self, model: _Model) -> float:
        if model.gate is None:
            return 0.0
        return float(model.gate.peek(model.name, 1).retry_after)

    def _gate_charge(self, model: _Model) -> None:
        if model.gate is not None:
            model.gate.hit(model.name, 1)

    def _too_large(self, model: _Model, call: Call, rates: Mapping[str, nl.Rate], deadline: Deadline) -> CallTooLarge:
        model.stats["too_large"] += 1
        for dim, units in call.costs(rates, self.estimate_margin).items():
            if units > rates[dim].count:
                return CallTooLarge(call.model, dim, units, rates[dim].count, deadline.timeout)
        return CallTooLarge(call.model, "tokens", 0, 0, deadline.timeout)  # pragma: no cover

    def _check_wait(self, model: _Model, call: Call, wait: float, limit: str, deadline: Deadline) -> float:
        """``wait`` if the deadline allows it, else QuotaTimeout at once."""
        if wait > deadline.left():
            model.stats["timeouts"] += 1
            raise QuotaTimeout(call.model, limit, wait, deadline.timeout)
        model.stats["waited_seconds"] += wait
        return wait

    def admit(self, call: Call, deadline: Deadline) -> Ticket:
        """Wait (sleeping this thread) until ``call`` may be sent, and reserve it."""
        model = self._begin(call)
        if not model.lock.acquire(timeout=-1 if math.isinf(deadline.left()) else max(0.0, deadline.left())):
            model.stats["timeouts"] += 1
            raise QuotaTimeout(call.model, "requests", deadline.left(), deadline.timeout)
        probe = False
        try:
            while True:
                pause = self.ledger.paused(model.name)
                if pause > 0:
                    time.sleep(self._check_wait(model, call, pause, "paused", deadline))
                    continue
                gate = self._gate_wait(model)
                if gate > 0:
                    time.sleep(self._check_wait(model, call, gate, "requests", deadline))
                    continue
                what, detail = self._step(model, call, probe)
                if what == "go":
                    self._gate_charge(model)
                    return self._admitted(model, detail)
                if what == "wait":
                    time.sleep(self._check_wait(model, call, detail, "requests", deadline))
                    continue
                rates, costs, probe = detail
                wait, where = self.ledger.charge(model.name, rates, costs, model.lead())
                if wait == 0:
                    self._gate_charge(model)
                    return self._admitted(model, self._ticket(call, costs, probe, where))
                if math.isinf(wait):
                    raise self._too_large(model, call, rates, deadline)
                time.sleep(self._check_wait(model, call, wait, self._binding(model, rates, costs), deadline))
        except BaseException:
            if probe:
                self._end_probe(model)
            raise
        finally:
            model.lock.release()

    async def admit_async(self, call: Call, deadline: Deadline) -> Ticket:
        """``admit`` for asyncio: waits with ``asyncio.sleep``, in FIFO order per model."""
        import asyncio

        model = self._begin(call)
        loop = asyncio.get_running_loop()
        lock = model.async_locks.get(loop)
        if lock is None:
            lock = model.async_locks.setdefault(loop, asyncio.Lock())
        try:
            left = deadline.left()
            await asyncio.wait_for(lock.acquire(), None if math.isinf(left) else max(0.0, left))
        except asyncio.TimeoutError:
            model.stats["timeouts"] += 1
            raise QuotaTimeout(call.model, "requests", deadline.left(), deadline.timeout) from None
        probe = False
        try:
            ledger = self.ledger
            while True:
                pause = await ledger.paused_async(model.name)
                if pause > 0:
                    await asyncio.sleep(self._check_wait(model, call, pause, "paused", deadline))
                    continue
                gate = self._gate_wait(model)
                if gate > 0:
                    await asyncio.sleep(self._check_wait(model, call, gate, "requests", deadline))
                    continue
                what, detail = self._step(model, call, probe)
                if what == "go":
                    self._gate_charge(model)
                    return self._admitted(model, detail)
                if what == "wait":
                    await asyncio.sleep(self._check_wait(model, call, detail, "requests", deadline))
                    continue
                rates, costs, probe = detail
                wait, where = await ledger.charge_async(model.name, rates, costs, model.lead())
                if wait == 0:
                    self._gate_charge(model)
                    return self._admitted(model, self._ticket(call, costs, probe, where))
                if math.isinf(wait):
                    raise self._too_large(model, call, rates, deadline)
                limit = self._binding(model, rates, costs)
                await asyncio.sleep(self._check_wait(model, call, wait, limit, deadline))
        except BaseException:
            if probe:
                self._end_probe(model)
            raise
        finally:
            lock.release()

    def _binding(self, model: _Model, rates: Mapping[str, nl.Rate], costs: Mapping[str, int]) -> str:
        """The limit that holds a call back (for messages): the fullest one."""
        if getattr(self.ledger, "remote", False):
            return "requests"  # not worth a round trip: only for a message
        used = self.ledger.used(model.name, rates)
        return max(rates, key=lambda d: (used.get(d, 0.0) + costs.get(d, 0)) / rates[d].count)

    def _ticket(self, call: Call, costs: Dict[str, int], probe: bool, where: Optional[_Ledger]) -> Ticket:
        return Ticket(call, costs, probe=probe, ledger=_MAIN if where is self.ledger else where)

    def _ledger_of(self, ticket: Ticket) -> Optional[_Ledger]:
        """The ledger that holds ``ticket``'s charge (None: none does)."""
        return self.ledger if ticket.ledger is _MAIN else ticket.ledger

    @staticmethod
    def _admitted(model: _Model, ticket: Ticket) -> Ticket:
        ticket.model = model.name
        model.stats["admitted"] += 1
        ticket.sent_at = time.monotonic()
        return ticket

    # --- the answer -------------------------------------------------------------------
    def _learn(self, model: _Model, status: int, headers: Mapping[str, str]) -> Tuple[Any, Dict[str, Any]]:
        """Learns limits from the headers; returns them parsed, and those seen."""
        limits = parse_rate_limit_headers(headers)
        found = {
            "requests": limits.requests,
            "tokens": limits.tokens,
            "input_tokens": limits.input_tokens,
            "output_tokens": limits.output_tokens,
        }
        if found["input_tokens"] is not None or found["output_tokens"] is not None:
            # Anthropic's "tokens" is the most restrictive of its input and output
            # limits, not a limit of its own.
            found["tokens"] = None
        seen = {dim: limit for dim, limit in found.items() if limit is not None}
        if seen:
            model.headerless = False
        elif 200 <= status < 300 and not model.rates():
            model.headerless = True
        if self.learn:
            for dim, limit in seen.items():
                if dim in model.given or limit.limit is None or not 1 <= limit.limit <= _MAX_LEARNED[dim]:
                    continue
                rate = nl.Rate(limit.limit, self.window)
                if model.learned.get(dim) != rate:
                    model.learned = {**model.learned, dim: rate}
        return limits, seen

    def _floors(self, model: _Model, seen: Mapping[str, Any], sent_at: float) -> Dict[str, Tuple[float, float]]:
        """What the headers prove the provider counts, per limit: (below, target).

        ``below`` is the least it can count now: its count when it answered (limit
        minus remaining, less one for its rounding down) less what refilled since the
        request was sent (the earliest it could have answered). A local count below
        that means someone else spends the same quota: it is raised to ``target``,
        the count as reported, so that the next calls wait for the provider's view.
        A local count above ``below`` is left alone: it counts calls the provider has
        not seen yet."""
        rates = model.rates()
        elapsed = max(0.0, time.monotonic() - sent_at)
        floors: Dict[str, Tuple[float, float]] = {}
        for dim, limit in seen.items():
            rate = rates.get(dim)
            if rate is None or limit.remaining is None:
                continue
            capacity = limit.limit if limit.limit else rate.count
            counted = capacity - limit.remaining
            below = counted - 1 - elapsed * rate.count / rate.period
            if below > 0:
                floors[dim] = (below, float(counted))
        return floors

    @staticmethod
    def _refused_floors(
        ticket: Ticket, rates: Mapping[str, nl.Rate], seen: Mapping[str, Any], pause: float
    ) -> Dict[str, Tuple[float, float]]:
        """After a 429: a limit the provider reports exhausted may be past empty (its
        remaining stops at 0). Its reset time says how deep (OpenAI's, to the
        millisecond: the count is reset x rate); without one, the count is set so that,
        once the pause is over, exactly the refused call fits again: what the provider
        promised by its retry-after."""
        floors: Dict[str, Tuple[float, float]] = {}
        costs = ticket.costs or {}
        for dim, limit in seen.items():
            rate = rates.get(dim)
            cost = costs.get(dim, 1 if dim == "requests" else 0)
            if rate is None or limit.remaining is None or limit.remaining >= max(cost, 1):
                continue
            per_second = rate.count / rate.period
            if limit.reset is not None and limit.reset > 0:
                target = max(float(rate.count - limit.remaining), limit.reset * per_second)
            else:
                target = rate.count + pause * per_second - cost
            floors[dim] = (target, target)
        return floors

    def answered(self, ticket: Ticket, status: int, headers: Mapping[str, str]) -> float:
        """The provider answered ``status`` with ``headers``: learn, resynchronise, and on
        a 429 pause the model. Returns the pause (seconds) a 429 imposed, else 0. Error
        answers end the ticket here (their tokens are refunded, the request stays
        counted); successful ones are settled by :meth:`settle`."""
        model = self._model(ticket.model)
        model.ttfb.append(time.monotonic() - ticket.sent_at)
        limits, seen = self._learn(model, status, headers)
        rates = model.rates()
        probe_charge = self._probe_end(model, ticket, rates, status)
        if probe_charge:
            self.ledger.adjust(model.name, rates, probe_charge)
        if status >= 400:
            # Refused or failed: the provider counted no tokens (the request stays).
            self._refund_tokens(ticket)
        floors = self._floors(model, seen, ticket.sent_at)
        if floors:
            model.stats["resynced"] += self.ledger.sync(model.name, rates, floors)
        pause = 0.0
        if status == 429:
            model.stats["provider_429"] += 1
            pause = self._pause_of(limits, headers)
            self.ledger.pause(model.name, pause)
            exhausted = self._refused_floors(ticket, rates, seen, pause)
            if exhausted:
                self.ledger.sync(model.name, rates, exhausted)
        if model.aimd is not None:
            self._aimd(model, status)
        return pause

    async def answered_async(self, ticket: Ticket, status: int, headers: Mapping[str, str]) -> float:
        """``answered`` for a ledger whose operations are awaited (Redis asyncio)."""
        ledger = self.ledger
        if not getattr(ledger, "remote", False):
            return self.answered(ticket, status, headers)
        model = self._model(ticket.model)
        model.ttfb.append(time.monotonic() - ticket.sent_at)
        limits, seen = self._learn(model, status, headers)
        rates = model.rates()
        probe_charge = self._probe_end(model, ticket, rates, status)
        if probe_charge:
            await ledger.adjust_async(model.name, rates, probe_charge)
        if status >= 400:
            deltas = self._token_refund(ticket)
            held = self._ledger_of(ticket)
            if deltas and held is not None:
                await held.adjust_async(model.name, rates, deltas)
        floors = self._floors(model, seen, ticket.sent_at)
        if floors:
            model.stats["resynced"] += await ledger.sync_async(model.name, rates, floors)
        pause = 0.0
        if status == 429:
            model.stats["provider_429"] += 1
            pause = self._pause_of(limits, headers)
            await ledger.pause_async(model.name, pause)
            exhausted = self._refused_floors(ticket, rates, seen, pause)
            if exhausted:
                await ledger.sync_async(model.name, rates, exhausted)
        if model.aimd is not None:
            self._aimd(model, status)
        return pause

    def _probe_end(self, model: _Model, ticket: Ticket, rates: Mapping[str, nl.Rate], status: int) -> Dict[str, int]:
        """The probe's answer came. If it went out unreserved, charge it now that its
        answer taught the limits (the provider counted it), so that it settles like any
        call. An error answer ends the probe here; a good one when it settles (its
        usage calibrates the estimates of the calls waiting for it)."""
        if not ticket.probe:
            return {}
        if status >= 400:
            ticket.probe = False
            self._end_probe(model)
        if not rates or ticket.costs is not None:
            return {}
        ticket.costs = ticket.call.costs(rates, self.estimate_margin)
        return dict(ticket.costs)

    def _aimd(self, model: _Model, status: int) -> None:
        assert model.aimd is not None and model.gate is not None
        before = model.aimd.value
        after = model.aimd.observe(status)
        if round(after) != round(before):
            model.gate.set_default_quota(nl.Rate(max(1, round(after)), self.window))

    @staticmethod
    def _pause_of(limits: Any, headers: Mapping[str, str]) -> float:
        wait = _retry_after(headers, limits.retry_after)
        if wait is None:
            resets = [
                limit.reset
                for limit in (limits.requests, limits.tokens, limits.input_tokens, limits.output_tokens)
                if limit is not None and limit.reset is not None and limit.remaining == 0
            ]
            wait = max(resets, default=_DEFAULT_PAUSE)
        return min(max(wait, 0.0), MAX_PROVIDER_PAUSE)

    @staticmethod
    def _token_refund(ticket: Ticket) -> Dict[str, float]:
        if ticket.done:
            return {}
        ticket.done = True
        if not ticket.costs:
            return {}
        return {dim: -units for dim, units in ticket.costs.items() if dim != "requests" and units}

    def _refund_tokens(self, ticket: Ticket) -> None:
        deltas = self._token_refund(ticket)
        held = self._ledger_of(ticket)
        if deltas and held is not None:
            held.adjust(ticket.model, self.rates(ticket.model), deltas)

    def _settlement(self, ticket: Ticket, usage: Optional[Usage]) -> Dict[str, float]:
        """The adjustments that settle ``ticket`` at ``usage`` (None: at its estimate),
        after teaching the estimators."""
        call = ticket.call
        model = self._model(ticket.model)
        if ticket.probe:
            ticket.probe = False
            self._end_probe(model)
        if ticket.done:
            return {}
        ticket.done = True
        if usage is None:
            model.stats["settled_at_estimate"] += 1
            return {}
        model.stats["settled"] += 1
        if usage.exact:
            if call.provider == "anthropic" and call.base > 0:
                self.estimator.observe(call.model, call.base, usage.input_tokens)
            if call.cap is None and call.kind != "embeddings":
                self.outputs.observe(None, call.model, usage.output_tokens)
        if not ticket.costs:
            return {}
        actual = call.actual(usage)
        return {
            dim: actual.get(dim, units) - units
            for dim, units in ticket.costs.items()
            if actual.get(dim, units) != units
        }

    def settle(self, ticket: Ticket, usage: Optional[Usage]) -> None:
        """Settle an admitted call at its real usage (None: keep its estimate)."""
        deltas = self._settlement(ticket, usage)
        held = self._ledger_of(ticket)
        if deltas and held is not None:
            held.adjust(ticket.model, self.rates(ticket.model), deltas)

    async def settle_async(self, ticket: Ticket, usage: Optional[Usage]) -> None:
        deltas = self._settlement(ticket, usage)
        held = self._ledger_of(ticket)
        if deltas and held is not None:
            await held.adjust_async(ticket.model, self.rates(ticket.model), deltas)

    def _failure(self, ticket: Ticket, sent: bool) -> Dict[str, float]:
        if ticket.probe:
            ticket.probe = False
            self._end_probe(self._model(ticket.model))
        if ticket.done:
            return {}
        ticket.done = True
        if sent or not ticket.costs:
            # The provider may have counted it: the estimate stands.
            return {}
        return {dim: -units for dim, units in ticket.costs.items() if units}

    def failed(self, ticket: Ticket, sent: bool) -> None:
        """The call raised before an answer. ``sent``: whether the request may have
        reached the provider (then its estimate stands; else everything is refunded)."""
        deltas = self._failure(ticket, sent)
        held = self._ledger_of(ticket)
        if deltas and held is not None:
            held.adjust(ticket.model, self.rates(ticket.model), deltas)

    async def failed_async(self, ticket: Ticket, sent: bool) -> None:
        deltas = self._failure(ticket, sent)
        held = self._ledger_of(ticket)
        if deltas and held is not None:
            await held.adjust_async(ticket.model, self.rates(ticket.model), deltas)

    def requeued(self, ticket: Ticket) -> None:
        self._model(ticket.model).stats["requeued"] += 1

    # --- introspection ----------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Per model: the limits in force and where they come from, and the counters —
        ``calls``, ``admitted``, ``waited_seconds``, ``requeued`` (sent again after a
        provider 429), ``provider_429``, ``too_large`` and ``timeouts`` (refused before
        sending), ``settled`` (from the answer's usage), ``settled_at_estimate`` (no
        usage could be read), ``resynced`` (local usage raised to the provider's); with
        ``aimd``, the controller's stats. With a Redis store, ``"redis"`` holds the
        ``on_error`` policy, the circuit breaker's state and the fallbacks (see
        :meth:`RedisLedger.stats <nexus_limits.outbound._redis.RedisLedger.stats>`)."""
        out: Dict[str, Any] = {}
        for name, model in list(self._models.items()):
            entry: Dict[str, Any] = dict(model.stats)
            entry["limits"] = {dim: f"{rate.count}/{rate.period:g}s" for dim, rate in model.rates().items()}
            entry["learned"] = sorted(d for d in model.learned if d not in model.given)
            if model.headerless:
                entry["headerless"] = True
            if model.aimd is not None:
                entry["aimd"] = model.aimd.stats()
            out[name] = entry
        result: Dict[str, Any] = {"store": self.ledger.where, "models": out}
        backend = getattr(self.ledger, "stats", None)
        if backend is not None:
            result["redis"] = backend()
        return result

    def refusal_body(self, call: Call, error: OutboundRefused) -> bytes:
        """The error document a provider would send, in its own format."""
        if call.provider == "anthropic":
            doc: Dict[str, Any] = {"type": "error", "error": {"type": "rate_limit_error", "message": str(error)}}
        else:
            doc = {"error": {"message": str(error), "type": error.limit, "param": None, "code": error.code}}
        return json.dumps(doc).encode()


def _deployment(path: str) -> Optional[str]:
    """Azure OpenAI's deployment name, the model of a body without one."""
    parts: List[str] = path.split("/")
    if "deployments" in parts:
        i = parts.index("deployments")
        if i + 1 < len(parts) and parts[i + 1]:
            return parts[i + 1][:200]
    return None
