"""Fair queues: wait for a limit in weighted-fair order instead of being refused.

A :class:`FairQueue` sits in front of any nexus-limits limiter. A request that the
limiter would refuse now waits, up to its deadline, for its turn; the waiting requests
are admitted in weighted-fair order across keys, so one key with a thousand requests
queued does not delay a key with one::

    import nexus_limits as nl
    from nexus_limits.fair import FairQueue

    upstream = nl.TokenBucket("50/second", burst=10)
    queue = FairQueue(upstream, limit_key="upstream", timeout=5.0)  # every key shares one limit
    decision = await queue.acquire_async("sk-ann")           # asyncio
    decision = queue.acquire("sk-ann", cost=3)    # threads

How it works:

- **Lanes and keys.** The limiter is checked on a *limit key*: by default the request's
  own key (each key waits for its own limit), or one key for everybody
  (``limit_key="upstream"``), or a function of the key (``limit_key=lambda k: org_of(k)``:
  the keys of an organisation share its limit). The requests waiting for one limit key
  form a lane.
- **Weighted-fair order** within a lane (start-time fair queueing). Each request gets a
  start tag, the later of the lane's virtual time and the finish tag of its key's
  previous waiting request, and a finish tag, ``start + cost / weight``. The lane admits
  the smallest finish tag first, and its virtual time becomes that request's start tag.
  A key with many requests waiting has tags far ahead; a request of a key with nothing
  waiting starts at the lane's time, so it waits behind at most about one request
  (``cost / weight``) of each other key that has requests waiting. Weights
  (``weights={"gold": 3}``, or ``weight=`` per call) are shares: while both wait, a key of
  weight 3 is served three units for every unit of a key of weight 1.
- **Only the head checks.** The request at a lane's head calls the limiter's own check
  (``hit``; ``reserve`` for a ``TokenLimiter``) when the limiter said capacity would be
  back (its ``retry_after``); everyone behind it waits without touching the limiter.
- **No pointless waiting.** A request that would have to wait is refused at once, with
  the time it would have needed (``RateLimitExceeded.retry_after``), when its predicted
  admission is past its deadline: the prediction is the time until the limiter could
  admit the units queued ahead of it plus its own (the limiter's ``peek`` for in-process
  and shared-memory limiters; for Redis, a model built from the limiter's last answers,
  with no extra round trip). Waiting requests pushed back by others that came ahead are
  refused as soon as they can no longer make it, and at their deadline at the latest.
- **Leaving.** A cancelled asyncio task leaves the queue at once; threads pass a
  :class:`CancelToken`; :meth:`FairQueue.acquire_asgi` leaves when the ASGI client
  disconnects.

Across processes and hosts each process keeps its own queue over a shared limit (a
:class:`~nexus_limits.SharedMemoryStore` or Redis): the limit holds exactly across all
of them; fairness between keys holds among the requests waiting in one process, and the
processes compete for the shared capacity through their heads' checks.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

from . import _core
from ._core import Decision, ManualClock
from ._wait import check_timeout
from .base import Key
from .errors import NexusLimitsError, RateLimitExceeded

__all__ = ["CancelToken", "FairQueue", "QueueCancelled", "QueueRefused"]

Weights = Union[None, Mapping[Any, float], Callable[[Any], Optional[float]]]

# A request's weight is its share while keys compete: between these bounds, so that
# cost / weight stays a number whose sums keep their precision for a long time.
MIN_WEIGHT = 0.001
MAX_WEIGHT = 1000.0
# Lane time is brought back to zero when it passes this (tags are doubles: far below
# 2**53, increments of cost / MAX_WEIGHT keep their precision).
_REBASE_AT = 1e9
# Waiting requests are re-judged (can they still make their deadline?) at most this
# often per lane, in seconds on the queue's clock.
_SWEEP_EVERY = 0.05
# A head waiting for a Concurrency lease polls, from 1 ms doubling to this, as a release
# in another process cannot wake it.
_LEASE_POLL_MAX = 0.05
# The most a head of a shared limit checks later than told (see FairQueue._jitter).
_JITTER_MAX = 0.001
# The largest cost of one request (and of what a peek is asked about).
_MAX_COST = 2**63 - 1
# With a ManualClock, how often (in real seconds) a blocked waiter looks at the clock
# anyway: something else holding the same clock (another queue, a limiter's acquire) may
# have moved it past the time the waiter waits for.
_MANUAL_POLL = 0.01
# Times within this of each other are equal (a ManualClock counts whole nanoseconds).
_EPS = 1e-9
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_CHECK, _WAIT, _RAISE, _DONE, _UNDO = range(5)

# In-process and shared-memory limiters: their checks and peeks never block on I/O.
_LOCAL_TYPES = (
    _core.TokenBucket,
    _core.SlidingWindow,
    _core.FixedWindow,
    _core.LeakyBucket,
    _core.Composite,
    _core.Concurrency,
    _core.TokenLimiter,
)


class QueueRefused(RateLimitExceeded):
    """A :class:`FairQueue` refused the request: it could not be admitted by its deadline.

    A :class:`~nexus_limits.RateLimitExceeded`, so ``except RateLimitExceeded`` catches it.
    ``retry_after`` is the time the request would have needed from the moment it was
    refused (``math.inf`` when its cost is above the limit's capacity); ``reason`` is
    one of:

    - ``"deadline"``: the predicted admission was past the deadline (refused on arrival,
      or while waiting as soon as that became true), or the deadline passed;
    - ``"never"``: the cost is above the limit's capacity;
    - ``"full"``: the queue held ``max_waiting`` requests, and this key had the most
      queued (it was refused, or its latest request was pushed out for another key's).

    ``detail`` says the same without the key, for an answer to the client.
    """

    def __init__(self, key: Any, decision: Decision, timeout: Optional[float], reason: str, waited: float) -> None:
        super().__init__(key, decision, timeout)
        self.reason = reason
        self.waited = waited
        need = decision.retry_after
        if reason == "never":
            why = "its cost is above the limit's capacity, so it can never be admitted"
        elif reason == "full":
            why = f"the queue is full and this key has the most waiting (admission was {need:.6g} s away)"
        else:
            why = f"admission needs {need:.6g} s more, past its timeout of {timeout!r} s"
        # The refusal without the key: what an answer to the client may say (its key is a
        # credential; logs and the exception's message name it).
        self.detail = f"fair queue refused the request after waiting {waited:.6g} s: {why}"
        self.args = (f"fair queue refused key {_show(key)} after waiting {waited:.6g} s: {why}",)


class QueueCancelled(NexusLimitsError):
    """The wait was cancelled (a :class:`CancelToken`, or the ASGI client disconnected):
    the request left the queue and was not admitted."""


class CancelToken:
    """Cancels :meth:`FairQueue.acquire` waits from another thread.

    Pass it as ``acquire(..., cancel=token)``; ``token.cancel()`` makes every wait
    using it leave its queue at once and raise :class:`QueueCancelled` (a wait that
    starts after the cancel raises at once). One token may serve several waits."""

    __slots__ = ("_cancelled", "_lock", "_waits")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._waits: Set[Tuple[FairQueue, _Waiter]] = set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            waits, self._waits = self._waits, set()
        for queue, waiter in waits:
            queue._cancel_waiter(waiter)

    def _add(self, queue: FairQueue, waiter: _Waiter) -> bool:
        with self._lock:
            if self._cancelled:
                return False
            self._waits.add((queue, waiter))
            return True

    def _discard(self, queue: FairQueue, waiter: _Waiter) -> None:
        with self._lock:
            self._waits.discard((queue, waiter))

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self._cancelled})"


class _Waiter:
    __slots__ = (
        "cost",
        "deadline",
        "event",
        "flow",
        "fut",
        "key",
        "lane",
        "loop",
        "outcome",
        "removed",
        "seq",
        "slept",
        "stag",
        "start",
        "tag",
        "thread",
        "timeout",
        "wake_at",
        "weight",
    )

    def __init__(self, key: Any, cost: int, weight: float, timeout: Optional[float], loop: Any) -> None:
        self.key = key
        self.cost = cost
        self.weight = weight
        self.timeout = timeout
        self.loop = loop
        self.thread = threading.get_ident()
        self.event: Optional[threading.Event] = None  # a thread's, made when it first waits
        self.fut: Any = None
        self.outcome: Any = None  # set once: a _Done, or the exception to raise
        self.removed = False
        self.lane: Any = None
        self.flow: Any = None
        self.slept = False  # it waited at least once (else an answer is "at once")
        self.stag = 0.0
        self.tag = 0.0
        self.seq = 0
        self.start = 0.0
        self.deadline = math.inf
        self.wake_at = math.inf


class _Flow:
    """One key's requests waiting in a lane (tags increase along them)."""

    __slots__ = ("key", "last_tag", "units", "waiters", "weight")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.last_tag = 0.0
        self.units = 0
        self.weight = 1.0
        self.waiters: List[_Waiter] = []


class _Lane:
    """The requests waiting for one limit key, in tag order (three parallel lists)."""

    __slots__ = (
        "anchor",
        "checker",
        "costs",
        "dirty",
        "flows",
        "items",
        "key",
        "order",
        "poll",
        "ready_at",
        "ready_cost",
        "retry_at",
        "swept_at",
        "vtime",
    )

    def __init__(self, key: Any) -> None:
        self.key = key
        self.order: List[Tuple[float, int]] = []
        self.items: List[_Waiter] = []
        self.costs: List[int] = []
        self.flows: Dict[Any, _Flow] = {}
        self.vtime = 0.0
        self.checker: Optional[_Waiter] = None
        # The head checks the limiter no earlier than ready_at (what the limiter said for
        # a cost of ready_cost; a smaller head may check at once).
        self.ready_at = -math.inf
        self.ready_cost = 0
        self.retry_at = -math.inf  # when the limiter's last refusal said to retry
        # What the limiter last said, for predictions without I/O: (t0, u0, t_full, limit),
        # u0 units available at t0, `limit` at t_full.
        self.anchor: Optional[Tuple[float, int, float, int]] = None
        self.dirty = False
        self.swept_at = -math.inf
        self.poll = 0.001


def _show(key: Any) -> str:
    """A key for a message: its repr, cut short (a key may be megabytes)."""
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _resolve(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


def _is_coroutine_function(fn: Any) -> bool:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is not None and bool(code.co_flags & 0x180)  # CO_COROUTINE | CO_ITERABLE_COROUTINE


def _check_key(key: Any, what: str) -> Key:
    if isinstance(key, bool) or not isinstance(key, (str, bytes, int)):
        raise TypeError(f"{what} must be str, bytes or int, got {type(key).__name__}")
    return key


def _check_weight(weight: Any, what: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(weight).__name__}")
    value = float(weight)
    if not (MIN_WEIGHT <= value <= MAX_WEIGHT):  # NaN fails this too
        raise ValueError(f"{what} must be from {MIN_WEIGHT} to {MAX_WEIGHT:g}, got {weight!r}")
    return value


def _decision_of(result: Any) -> Decision:
    """The Decision inside a check's answer (a Reservation carries one)."""
    return result if isinstance(result, Decision) else result.decision


class FairQueue:
    """Requests wait for a limiter, up to a deadline, admitted in weighted-fair order.

    ``limiter``: any nexus-limits limiter — ``TokenBucket``, ``SlidingWindow``,
    ``FixedWindow``, ``LeakyBucket``, ``Composite``, ``Concurrency``, ``TokenLimiter``,
    in-process, on a ``SharedMemoryStore`` or on Redis (``nexus_limits.redis`` or
    ``nexus_limits.redis.asyncio``).

    ``weights``: a key's share while keys compete for one limit: a mapping
    ``{key: weight}`` or a function ``key -> weight`` (``None``: 1.0); weights are from
    0.001 to 1000. ``acquire(..., weight=)`` overrides it for one request.

    ``limit_key``: the key the limiter is checked on. ``None`` (default): the request's
    own key (each key waits for its own limit, in arrival order). A key (``"all"``):
    every request shares that one limit, admitted fairly across keys. A function
    ``key -> limit key``: groups of keys share a limit, fairly within each group.

    ``timeout``: the default deadline of a request, in seconds (``None``: no deadline).
    ``max_waiting``: how many requests may wait at once, in all lanes; when full, a new
    request of the key with the most units queued (per weight) is refused, and a
    request of another key takes the place of that key's latest request instead.

    Round trips to Redis, counted from one process: a request admitted on arrival costs
    1 (its check); a request refused on arrival at most 1; a queue that keeps waiting
    makes at most 2 checks per admission (the check that admits, and at most one refused
    check by the next head to learn how long to wait), plus 1 each time another process
    takes first the capacity this one was told about, or a smaller request reaches the
    head. Predictions never cost a round trip. A ``Concurrency`` head polls instead
    (every 1 ms doubling to 50 ms), as a release elsewhere cannot wake it.
    """

    __slots__ = (
        "_async",
        "_blocked",
        "_check",
        "_clock",
        "_kind",
        "_lane_key",
        "_lanes",
        "_limiter",
        "_local",
        "_lock",
        "_max_waiting",
        "_peek",
        "_per_unit",
        "_seq",
        "_shared",
        "_stats",
        "_timeout",
        "_units",
        "_wait_buckets",
        "_waiting",
        "_weights",
    )

    def __init__(
        self,
        limiter: Any,
        weights: Weights = None,
        *,
        limit_key: Any = None,
        timeout: Optional[float] = 5.0,
        max_waiting: int = 10_000,
    ) -> None:
        check = getattr(limiter, "hit", None)
        if check is None and callable(getattr(limiter, "reserve", None)):
            check = limiter.reserve
            self._kind = "budget"
        elif callable(check):
            if hasattr(limiter, "lease_ttl"):
                self._kind = "lease"
            elif hasattr(limiter, "parts"):
                self._kind = "composite"
            else:
                self._kind = "rate"
        else:
            raise TypeError(
                f"limiter must be a nexus-limits limiter (with hit or reserve), got {type(limiter).__name__}"
            )
        self._limiter = limiter
        self._check: Callable[[Any, int], Any] = check
        self._peek: Any = getattr(limiter, "peek", None)
        self._async = _is_coroutine_function(check)
        self._local = isinstance(limiter, _LOCAL_TYPES)
        # Shared with other processes (a SharedMemoryStore, Redis): heads of other queues
        # race this one's for each freed unit.
        self._shared = not self._local or "store_full" in limiter.stats()
        clock = getattr(limiter, "clock", None)
        self._clock: Optional[ManualClock] = clock if isinstance(clock, ManualClock) else None
        self._per_unit = 0.0  # seconds per unit at the default rate, for the Redis model
        rate = getattr(limiter, "rate", None)
        if isinstance(rate, _core.Rate):
            self._per_unit = rate.period / rate.count
        if weights is not None and not isinstance(weights, Mapping) and not callable(weights):
            raise TypeError(f"weights must be None, a mapping or a function, got {type(weights).__name__}")
        if isinstance(weights, Mapping):
            weights = {
                _check_key(k, "a key of weights"): _check_weight(v, f"weights[{k!r}]") for k, v in weights.items()
            }
        self._weights = weights
        if limit_key is not None and not callable(limit_key):
            _check_key(limit_key, "limit_key")
        self._lane_key = limit_key
        self._timeout = check_timeout(timeout)
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be a whole number of at least 1, got {max_waiting!r}")
        self._max_waiting = max_waiting
        self._lock = threading.Lock()
        self._lanes: Dict[Any, _Lane] = {}
        self._blocked: Set[_Waiter] = set()
        self._seq = itertools.count()
        self._waiting = 0
        self._units = 0
        self._wait_buckets = [0] * (len(_WAIT_BUCKETS) + 1)
        self._stats: Dict[str, Any] = dict.fromkeys(
            (
                "admitted",
                "admitted_at_once",
                "refused_at_once",
                "timed_out",
                "pushed_out",
                "cancelled",
                "errors",
                "peak_waiting",
            ),
            0,
        )
        self._stats["wait_seconds_sum"] = 0.0
        self._stats["wait_seconds_max"] = 0.0

    # ---- public surface -------------------------------------------------------------

    @property
    def limiter(self) -> Any:
        return self._limiter

    @property
    def timeout(self) -> Optional[float]:
        """The default deadline of a request, in seconds (``None``: none)."""
        return self._timeout

    @property
    def max_waiting(self) -> int:
        return self._max_waiting

    def acquire(
        self,
        key: Key,
        cost: int = 1,
        timeout: Optional[float] = None,
        weight: Optional[float] = None,
        *,
        cancel: Optional[CancelToken] = None,
    ) -> Any:
        """Wait, blocking this thread, until the limiter admits ``cost`` for ``key`` in
        its fair turn; return what the check returned (the admitting Decision; the
        ``Lease`` of a ``Concurrency``; the ``Reservation`` of a ``TokenLimiter``).

        ``timeout``: seconds this request may wait (default: the queue's; ``math.inf``:
        no deadline). Raises :class:`QueueRefused` (a ``RateLimitExceeded``) at once when
        the request cannot be admitted in time, and :class:`QueueCancelled` when
        ``cancel`` is cancelled. Not for asyncio limiters (use :meth:`acquire_async`).
        """
        if self._async:
            raise TypeError(
                f"{type(self._limiter).__name__} is an asyncio limiter: use `await queue.acquire_async(...)`"
            )
        if cancel is not None:
            if not isinstance(cancel, CancelToken):
                raise TypeError(f"cancel must be a CancelToken, got {type(cancel).__name__}")
            if cancel.cancelled:
                raise QueueCancelled(f"the wait of key {_show(key)} was cancelled before it started")
        waiter = self._enter(key, cost, timeout, weight, None)
        if waiter.outcome is None:
            waiter.event = threading.Event()
        if cancel is not None and not cancel._add(self, waiter):
            self._cancel_waiter(waiter)
        try:
            while True:
                with self._lock:
                    action, arg = self._plan(waiter)
                if action == _CHECK:
                    try:
                        result = self._check(waiter.lane.key, waiter.cost)
                    except BaseException as error:
                        with self._lock:
                            self._check_failed(waiter, error)
                        raise
                    with self._lock:
                        action, arg = self._after_check(waiter, result)
                if action == _DONE:
                    return arg
                if action == _UNDO:
                    _give_back(arg[0])
                    raise arg[1]
                if action == _RAISE:
                    raise arg
                if action == _WAIT:
                    self._wait_sync(waiter, arg)
        except BaseException:
            self._leave(waiter)
            raise
        finally:
            if cancel is not None:
                cancel._discard(self, waiter)

    async def acquire_async(
        self, key: Key, cost: int = 1, timeout: Optional[float] = None, weight: Optional[float] = None
    ) -> Any:
        """Wait, without blocking the event loop, until the limiter admits ``cost`` for
        ``key`` in its fair turn; return what the check returned (the admitting
        Decision; the ``Lease`` of a ``Concurrency``; the ``Reservation`` of a
        ``TokenLimiter``).

        ``timeout``: seconds this request may wait (default: the queue's; ``math.inf``:
        no deadline). Raises :class:`QueueRefused` (a ``RateLimitExceeded``) at once when
        the request cannot be admitted in time. Cancelling the task leaves the queue at
        once. A synchronous Redis limiter's checks run in a worker thread.
        """
        import asyncio  # here, so that `import nexus_limits.fair` does not load asyncio

        loop = asyncio.get_running_loop()
        waiter = self._enter(key, cost, timeout, weight, loop)
        try:
            while True:
                with self._lock:
                    action, arg = self._plan(waiter)
                if action == _CHECK:
                    try:
                        if self._async:
                            result = await self._check(waiter.lane.key, waiter.cost)
                        elif self._local:
                            result = self._check(waiter.lane.key, waiter.cost)
                        else:
                            result = await asyncio.to_thread(self._check, waiter.lane.key, waiter.cost)
                    except BaseException as error:
                        with self._lock:
                            self._check_failed(waiter, error)
                        raise
                    with self._lock:
                        action, arg = self._after_check(waiter, result)
                if action == _DONE:
                    return arg
                if action == _UNDO:
                    await _give_back_async(arg[0])
                    raise arg[1]
                if action == _RAISE:
                    raise arg
                if action == _WAIT:
                    await self._wait_async(waiter, arg, loop)
        except BaseException:
            self._leave(waiter)
            raise

    async def acquire_asgi(
        self,
        receive: Callable[[], Awaitable[Mapping[str, Any]]],
        key: Key,
        cost: int = 1,
        timeout: Optional[float] = None,
        weight: Optional[float] = None,
    ) -> Any:
        """:meth:`acquire_async` for an ASGI request: leaves the queue as soon as the client
        disconnects, and raises :class:`QueueCancelled` then.

        Call it once the request body has been read to its end (the last
        ``http.request`` message, ``more_body`` false): it reads ``receive()`` meanwhile,
        and after the body an ASGI server only ever answers ``http.disconnect``. A
        request admitted in the same instant its client left is given back (a lease
        released, a reservation cancelled) before ``QueueCancelled`` is raised.
        """
        import asyncio

        async def gone() -> None:
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    return
                if message.get("type") == "http.request" and (message.get("body") or message.get("more_body")):
                    raise RuntimeError("acquire_asgi was called before the request body was read to its end")

        waiting = asyncio.ensure_future(self.acquire_async(key, cost, timeout, weight))
        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait((waiting, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, watcher):
                if not task.done():
                    task.cancel()
            await asyncio.gather(waiting, watcher, return_exceptions=True)
        if watcher.done() and not watcher.cancelled():
            # The client left (or the watcher failed): whatever was admitted meanwhile goes back.
            if not waiting.cancelled() and waiting.exception() is None:
                await _give_back_async(waiting.result())
            problem = watcher.exception()
            if problem is not None:
                raise problem
            raise QueueCancelled(f"the client of key {_show(key)} disconnected while it waited in the queue")
        return waiting.result()

    def waiting(self, key: Optional[Key] = None) -> int:
        """How many requests wait now (of ``key``, when given)."""
        with self._lock:
            if key is None:
                return self._waiting
            lane = self._lanes.get(self._lane_of(key))
            flow = lane.flows.get(key) if lane is not None else None
            return len(flow.waiters) if flow is not None else 0

    def stats(self) -> Dict[str, Any]:
        """Counters and gauges of this queue (this process).

        Gauges: ``waiting`` (requests waiting now), ``waiting_units`` (their cost),
        ``keys`` (keys with requests waiting), ``lanes`` (limit keys with requests
        waiting), ``peak_waiting`` (the most that ever waited at once), ``max_waiting``.
        Counters: ``admitted`` (all admissions), ``admitted_at_once`` (those that did
        not wait), ``refused`` (all refusals: the three that follow),
        ``refused_at_once`` (refused on arrival: the deadline could not be met, the cost
        is above the capacity, or the queue was full), ``timed_out`` (refused after
        waiting: the deadline passed or could no longer be met), ``pushed_out`` (made
        room for another key's request in a full queue), ``cancelled`` (left: task
        cancelled, CancelToken, client disconnected), ``errors`` (the limiter's check
        raised). Wait times of admitted requests, in seconds: ``wait_seconds_sum``,
        ``wait_seconds_count`` (= admitted), ``wait_seconds_max`` and
        ``wait_seconds_buckets``, a list of ``(upper bound, cumulative count)`` ending
        with ``(math.inf, admitted)``, as a Prometheus histogram has them.
        """
        with self._lock:
            out = dict(self._stats)
            out["waiting"] = self._waiting
            out["waiting_units"] = self._units
            out["lanes"] = len(self._lanes)
            out["keys"] = sum(len(lane.flows) for lane in self._lanes.values())
            out["max_waiting"] = self._max_waiting
            out["refused"] = out["refused_at_once"] + out["timed_out"] + out["pushed_out"]
            out["wait_seconds_count"] = out["admitted"]
            out["wait_seconds_buckets"] = list(
                zip((*_WAIT_BUCKETS, math.inf), itertools.accumulate(self._wait_buckets))
            )
            return out

    def __repr__(self) -> str:
        return (
            f"FairQueue({self._limiter!r}, limit_key={self._lane_key!r}, timeout={self._timeout!r}, "
            f"waiting={self._waiting})"
        )

    # ---- entering and leaving ---------------------------------------------------------

    def _lane_of(self, key: Key) -> Any:
        if self._lane_key is None:
            return key
        if callable(self._lane_key):
            return _check_key(self._lane_key(key), "limit_key(key)")
        return self._lane_key

    def _weight_of(self, key: Key, weight: Optional[float]) -> float:
        if weight is not None:
            return _check_weight(weight, "weight")
        if self._weights is None:
            return 1.0
        if isinstance(self._weights, Mapping):
            value = self._weights.get(key)
            return 1.0 if value is None else float(value)
        value = self._weights(key)
        return 1.0 if value is None else _check_weight(value, f"weights({_show(key)})")

    def _now(self) -> float:
        return self._clock.now if self._clock is not None else time.monotonic()

    def _enter(self, key: Key, cost: int, timeout: Optional[float], weight: Optional[float], loop: Any) -> _Waiter:
        _check_key(key, "key")
        if isinstance(cost, bool) or not isinstance(cost, int):
            raise TypeError(f"cost must be an int, got {type(cost).__name__}")
        if cost < 0 or cost > _MAX_COST:
            raise ValueError(f"cost must be from 0 to 2**63 - 1, got {cost}")
        if self._kind == "lease" and cost != 1:
            raise ValueError(f"a Concurrency limiter gives one lease at a time; cost must be 1, got {cost}")
        timeout = self._timeout if timeout is None else check_timeout(timeout)
        waiter = _Waiter(key, cost, self._weight_of(key, weight), timeout, loop)
        lane_key = self._lane_of(key)
        with self._lock:
            refusal = self._insert(waiter, lane_key)
        if refusal is not None:
            raise refusal
        return waiter

    def _insert(self, w: _Waiter, lane_key: Any) -> Optional[BaseException]:
        """Puts the request in its lane, or answers why not (under the lock)."""
        now = self._now()
        w.start = now
        w.deadline = now + w.timeout if w.timeout is not None else math.inf
        lane = self._lanes.get(lane_key)
        if lane is None and self._local:
            # Nobody waits for this limit: the check itself (no I/O) decides. Admitted is
            # the common case and costs no queue state at all.
            result = self._check(lane_key, w.cost)
            d = _decision_of(result)
            if d.allowed:
                self._admitted(w, now)
                w.outcome = _Done(d.lease if self._kind == "lease" else result)
                return None
            if self._kind != "lease" and (math.isinf(d.retry_after) or now + d.retry_after > w.deadline + _EPS):
                self._stats["refused_at_once"] += 1
                return self._refusal(w, d, d.retry_after, now)
            lane = self._lanes[lane_key] = _Lane(lane_key)
            self._learn(lane, w, d, now)
        elif lane is None:
            lane = self._lanes[lane_key] = _Lane(lane_key)
        flow = lane.flows.get(w.key)
        if flow is None:
            flow = lane.flows[w.key] = _Flow(w.key)
            flow.last_tag = lane.vtime
        w.lane, w.flow = lane, flow
        w.stag = max(lane.vtime, flow.last_tag)
        w.tag = w.stag + w.cost / w.weight
        w.seq = next(self._seq)
        entry = (w.tag, w.seq)
        i = bisect.bisect_right(lane.order, entry)
        lane.order.insert(i, entry)
        lane.items.insert(i, w)
        lane.costs.insert(i, w.cost)
        flow.waiters.append(w)
        flow.last_tag = w.tag
        flow.units += w.cost
        flow.weight = w.weight
        self._waiting += 1
        self._units += w.cost
        if i < len(lane.items) - 1:
            lane.dirty = True  # it came ahead of others: they may no longer make it
        if self._waiting > self._max_waiting:
            victim = self._victim(w)
            need = self._predict(victim.lane, self._units_through(victim), now)
            self._remove(victim)
            if victim is w:
                self._stats["refused_at_once"] += 1
                return self._refusal(w, None, need, now, "full")
            self._stats["pushed_out"] += 1
            self._fail(victim, self._refusal(victim, None, need, now, "full"))
            i = bisect.bisect_left(lane.order, entry)  # the victim may have been ahead of it
        self._stats["peak_waiting"] = max(self._stats["peak_waiting"], self._waiting)
        if i == 0 and lane.checker is None and (now + _EPS >= lane.ready_at or w.cost < lane.ready_cost):
            return None  # at the head and the limit may have room: its check decides
        try:
            return self._judge_arrival(w, lane, i, now)
        except BaseException:
            self._remove(w)  # the limiter's peek failed: the request is not left behind
            raise

    def _judge_arrival(self, w: _Waiter, lane: _Lane, i: int, now: float) -> Optional[BaseException]:
        """Refuses at once a request that has to wait and cannot make its deadline."""
        if self._kind != "lease":
            if self._never(lane, w.cost):
                self._remove(w)
                self._stats["refused_at_once"] += 1
                return self._refusal(w, None, math.inf, now, "never")
            need = self._predict(lane, sum(lane.costs[: i + 1]), now)
            if now + need > w.deadline + _EPS:
                self._remove(w)
                self._stats["refused_at_once"] += 1
                return self._refusal(w, None, need, now)
        if lane.dirty and now - lane.swept_at >= _SWEEP_EVERY:
            self._sweep(lane, now)
        return None

    def _victim(self, arrival: _Waiter) -> _Waiter:
        """Whose latest request leaves a full queue: the key with the most units queued
        per weight (the arrival's own key on a tie)."""
        flow = arrival.flow
        best, score = flow, flow.units / flow.weight
        for lane in self._lanes.values():
            for other in lane.flows.values():
                if other is flow or not other.waiters or other.waiters[-1] is lane.checker:
                    continue
                if other.units / other.weight > score:
                    best, score = other, other.units / other.weight
        victim: _Waiter = best.waiters[-1]
        return victim

    def _remove(self, w: _Waiter) -> None:
        """Takes the request out of its lane and key (under the lock)."""
        if w.removed or w.lane is None:
            w.removed = True
            return
        w.removed = True
        lane, flow = w.lane, w.flow
        i = bisect.bisect_left(lane.order, (w.tag, w.seq))
        del lane.order[i], lane.items[i], lane.costs[i]
        if flow.waiters[-1] is w:
            flow.waiters.pop()
            # Its unserved work is not charged: the key's next request starts from its
            # previous request's tag (or the lane's time).
            flow.last_tag = flow.waiters[-1].tag if flow.waiters else lane.vtime
        else:
            flow.waiters.remove(w)
        flow.units -= w.cost
        if not flow.waiters:
            del lane.flows[flow.key]
        self._waiting -= 1
        self._units -= w.cost
        self._blocked.discard(w)
        if lane.items:
            if i == 0:
                self._wake(lane.items[0])
        else:
            self._drop_if_empty(lane)
        self._advance_soon()

    def _drop_if_empty(self, lane: _Lane) -> None:
        key = lane.key
        if not lane.items and lane.checker is None and self._lanes.get(key) is lane:
            del self._lanes[key]

    def _leave(self, w: _Waiter) -> None:
        """The waiter stops waiting for any reason of its own (cancelled, interrupted)."""
        with self._lock:
            lane = w.lane
            if lane is not None and lane.checker is w:
                lane.checker = None
                self._wake_head(lane)
            if not w.removed:
                self._remove(w)
                self._stats["cancelled"] += 1
            if lane is not None:
                self._drop_if_empty(lane)

    def _cancel_waiter(self, w: _Waiter) -> None:
        with self._lock:
            if w.removed or isinstance(w.outcome, _Done):
                return
            error = QueueCancelled(f"the wait of key {_show(w.key)} was cancelled")
            if w.lane is not None and w.lane.checker is w:
                w.outcome = error  # its check is under way: it is judged when it returns
                return
            self._remove(w)
            self._stats["cancelled"] += 1
            self._fail(w, error)

    def _fail(self, w: _Waiter, error: BaseException) -> None:
        w.outcome = error
        self._wake(w)

    def _refusal(
        self, w: _Waiter, d: Optional[Decision], need: float, now: float, reason: Optional[str] = None
    ) -> QueueRefused:
        if reason is None:
            reason = "never" if math.isinf(need) else "deadline"
        limit = d.limit if d is not None else 0
        need = max(need, 0.0)
        reset = d.reset_after if d is not None else (0.0 if math.isinf(need) else need)
        decision = Decision(False, limit, 0, reset, need)
        return QueueRefused(w.key, decision, w.timeout, reason, now - w.start)

    def _admitted(self, w: _Waiter, now: float) -> None:
        waited = max(now - w.start, 0.0)
        stats = self._stats
        stats["admitted"] += 1
        if not w.slept:
            stats["admitted_at_once"] += 1
        stats["wait_seconds_sum"] += waited
        stats["wait_seconds_max"] = max(stats["wait_seconds_max"], waited)
        self._wait_buckets[bisect.bisect_left(_WAIT_BUCKETS, waited)] += 1

    # ---- the head's turn ----------------------------------------------------------------

    def _plan(self, w: _Waiter) -> Tuple[int, Any]:
        """What the waiter does next (under the lock): check, wait until a time, raise
        or return."""
        outcome = w.outcome
        if isinstance(outcome, _Done):
            return _DONE, outcome.value
        if outcome is not None:
            return _RAISE, outcome
        if w.event is not None:
            w.event.clear()
        self._blocked.discard(w)
        lane = w.lane
        now = self._now()
        head = lane.items[0] is w and lane.checker is None
        if head and (now + _EPS >= lane.ready_at or w.cost < lane.ready_cost):
            lane.checker = w
            return _CHECK, None
        overtime = False
        if now + _EPS >= w.deadline:
            need = self._predict(lane, self._units_through(w), now) if self._kind != "lease" else 0.0
            if self._kind == "lease" or need > _EPS or (lane.checker is None and lane.ready_at > now + _EPS):
                need = max(need, lane.retry_at - now if head else 0.0, _EPS)
                self._remove(w)
                self._stats["timed_out"] += 1
                return _RAISE, self._refusal(w, None, need, now, "deadline")
            # The limit has room for it and everyone ahead now, and those are being admitted
            # one after the other at this instant: it is in time, it waits for its turn (a
            # sweep refuses it should that change).
            overtime = True
        if lane.dirty and now - lane.swept_at >= _SWEEP_EVERY:
            self._sweep(lane, now)
            if w.outcome is not None:
                return _RAISE, w.outcome
        if head:
            until = min(lane.ready_at + self._jitter(lane.ready_at - now), w.deadline)
        else:
            until = math.inf if overtime else w.deadline
        if w.loop is not None:
            w.fut = w.loop.create_future()
        w.slept = True
        return _WAIT, until

    def _after_check(self, w: _Waiter, result: Any) -> Tuple[int, Any]:
        """Judges the head's check (under the lock)."""
        lane = w.lane
        lane.checker = None
        now = self._now()
        d = _decision_of(result)
        if w.outcome is not None:  # cancelled while its check ran
            self._remove(w)
            self._stats["cancelled"] += 1
            self._wake_head(lane)
            # What it was given goes back, outside the lock (a Redis lease's release is I/O).
            return (_UNDO, (result, w.outcome)) if d.allowed else (_RAISE, w.outcome)
        self._learn(lane, w, d, now)
        if d.allowed:
            self._remove(w)
            lane.vtime = max(lane.vtime, w.stag)
            if lane.vtime > _REBASE_AT:
                self._rebase(lane)
            self._admitted(w, now)
            self._wake_head(lane)
            self._drop_if_empty(lane)
            return _DONE, (d.lease if self._kind == "lease" else result)
        wait = d.retry_after
        if self._kind != "lease" and (math.isinf(wait) or now + wait > w.deadline + _EPS):
            self._remove(w)
            self._stats["timed_out" if w.slept else "refused_at_once"] += 1
            self._wake_head(lane)
            self._drop_if_empty(lane)
            return _RAISE, self._refusal(w, d, wait, now)
        lane.dirty = True
        self._wake_head(lane)  # a request that came ahead meanwhile is the head now
        return _WAIT, None

    def _jitter(self, wait: float) -> float:
        """How much later than the limiter said a head checks a shared limit: up to 1 ms
        (and a twentieth of the wait) at random. Queues in several processes whose heads
        wait for the same freed unit then take turns; waking on the dot, the one whose
        timer happens to fire first would win every race, and the others' keys starve."""
        if not self._shared or self._clock is not None or wait <= 0:
            return 0.0
        return random.random() * min(_JITTER_MAX, wait / 20)

    def _check_failed(self, w: _Waiter, error: BaseException) -> None:
        lane = w.lane
        lane.checker = None
        if not w.removed:
            self._remove(w)
            self._stats["errors" if isinstance(error, Exception) else "cancelled"] += 1
        self._wake_head(lane)
        self._drop_if_empty(lane)

    def _learn(self, lane: _Lane, w: _Waiter, d: Decision, now: float) -> None:
        """Remembers what the limiter said: when the head may check again, and the
        anchor of the predictions."""
        if d.allowed:
            lane.ready_at, lane.ready_cost = now, 0
            lane.poll = 0.001
            lane.anchor = (now, d.remaining, now + d.reset_after, d.limit)
            return
        wait = d.retry_after
        lane.retry_at = now + wait
        if self._kind == "lease":
            # retry_after is when the oldest lease expires; a release may come any time.
            if self._clock is None:
                wait = min(wait, lane.poll)
                lane.poll = min(lane.poll * 2, _LEASE_POLL_MAX)
            lane.ready_at, lane.ready_cost = now + wait, w.cost
            return
        lane.ready_at, lane.ready_cost = now + wait, w.cost
        if not math.isinf(wait):
            lane.anchor = (now + wait, w.cost, now + max(d.reset_after, wait), d.limit)

    def _wake_head(self, lane: _Lane) -> None:
        if lane.items:
            self._wake(lane.items[0])

    def _wake(self, w: _Waiter) -> None:
        self._blocked.discard(w)
        if w.event is not None:
            w.event.set()
            return
        fut = w.fut
        if fut is None or fut.done():
            return
        w.fut = None
        if threading.get_ident() == w.thread:
            fut.set_result(None)
        else:
            try:
                w.loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # pragma: no cover - its loop is closed: nobody waits there
                pass

    def _rebase(self, lane: _Lane) -> None:
        """Brings the lane's time back to zero (keeps tags far from double rounding)."""
        base = lane.vtime
        lane.vtime = 0.0
        for w in lane.items:
            w.tag -= base
            w.stag -= base
        lane.order = [(w.tag, w.seq) for w in lane.items]
        for flow in lane.flows.values():
            flow.last_tag -= base

    # ---- waiting ----------------------------------------------------------------------

    def _wait_sync(self, w: _Waiter, until: Optional[float]) -> None:
        assert w.event is not None
        if until is None:
            return
        if self._clock is not None:
            with self._lock:
                if w.event.is_set():
                    return
                w.wake_at = until
                self._blocked.add(w)
                self._advance_manual()
            w.event.wait(_MANUAL_POLL)
            return
        delay = until - time.monotonic()
        if delay <= 0:
            return
        lane = w.lane
        if self._kind == "lease" and self._local and lane.items and lane.items[0] is w and until < w.deadline:
            # The head of an in-process Concurrency lane: a release wakes it at once.
            self._limiter._wait_for_release(min(delay, _LEASE_POLL_MAX))
            return
        w.event.wait(None if math.isinf(delay) else delay)

    async def _wait_async(self, w: _Waiter, until: Optional[float], loop: Any) -> None:
        import asyncio

        if until is None:
            return
        fut = w.fut
        if self._clock is not None:
            await asyncio.sleep(0)  # let the tasks ready now queue first: their times count too
            if fut.done():
                return
            with self._lock:
                if not fut.done():
                    w.wake_at = until
                    self._blocked.add(w)
                    self._advance_manual()
            handle = loop.call_later(_MANUAL_POLL, _resolve, fut)
            try:
                await fut
            finally:
                handle.cancel()
            return
        delay = until - time.monotonic()
        if delay <= 0:
            if not fut.done():
                fut.set_result(None)
            return
        handle = None if math.isinf(delay) else loop.call_later(delay, _resolve, fut)
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()

    def _advance_soon(self) -> None:
        """After a waiter left: with a ManualClock, time moves on once the others are all
        blocked. Asyncio waiters' loops do it after the callbacks ready now (the code
        that just saw the waiter leave may go on queueing at this time)."""
        if self._clock is None or not self._blocked or len(self._blocked) < self._waiting:
            return
        for w in self._blocked:
            if w.loop is not None:
                try:
                    w.loop.call_soon_threadsafe(self._advance_locked)
                except RuntimeError:  # pragma: no cover - its loop is closed
                    continue
                return
        self._advance_manual()

    def _advance_locked(self) -> None:
        with self._lock:
            self._advance_manual()

    def _advance_manual(self) -> None:
        """With a ManualClock, once every waiter of this queue is blocked: move the clock
        to the earliest time one of them waits for, and wake those whose time it is
        (under the lock). While any waiter still runs (woken, checking), time stands
        still, so that what it does happens at the time it was woken for."""
        if self._clock is None or not self._blocked or len(self._blocked) < self._waiting:
            return
        target = min(w.wake_at for w in self._blocked)
        if math.isinf(target):
            return
        now = self._clock.now
        if target > now:
            self._clock.advance(max(target - now, _EPS))
            now = self._clock.now
        for w in [w for w in self._blocked if w.wake_at <= now + _EPS]:
            self._wake(w)

    # ---- predictions ------------------------------------------------------------------

    def _units_through(self, w: _Waiter) -> int:
        lane = w.lane
        i = bisect.bisect_left(lane.order, (w.tag, w.seq))
        return sum(lane.costs[: i + 1])

    def _never(self, lane: _Lane, cost: int) -> bool:
        """Whether ``cost`` is above the limit's capacity (never admitted)."""
        if self._local:
            d = _decision_of(self._peek(lane.key, cost))
            return not d.allowed and math.isinf(d.retry_after)
        anchor = lane.anchor
        return self._kind == "rate" and anchor is not None and cost > anchor[3]

    def _predict(self, lane: _Lane, units: int, now: float, memo: Optional[Dict[Any, float]] = None) -> float:
        """Seconds from now until the limiter could admit ``units`` more (the requests
        ahead and this one), if nothing else took from it: a lower bound, so that no
        request that could make its deadline is refused for a wrong guess."""
        if self._kind == "lease" or units <= 0:
            return 0.0
        if self._local:
            if memo is None:
                memo = {}
            if self._kind == "composite":
                d = self._peek(lane.key, min(units, _MAX_COST))
                if d.allowed:
                    return 0.0
                if not math.isinf(d.retry_after):
                    return float(d.retry_after)
                # Past the smallest part's capacity: each part's own time is a lower bound.
                return max(self._single_wait(part, lane.key, units, memo) for part in self._limiter.parts)
            if self._kind == "budget":
                d = _decision_of(self._peek(lane.key, min(units, _MAX_COST)))
                return 0.0 if d.allowed or math.isinf(d.retry_after) else float(d.retry_after)
            return self._single_wait(self._limiter, lane.key, units, memo)
        return self._model_wait(lane, units, now)

    @staticmethod
    def _single_wait(limiter: Any, key: Any, units: int, memo: Dict[Any, float]) -> float:
        """One algorithm, from its peeks: exact up to its capacity; past it, the time to
        fill the capacity plus the rest at the sustained rate."""
        d = limiter.peek(key, min(units, _MAX_COST))
        if d.allowed:
            return 0.0
        if not math.isinf(d.retry_after):
            return float(d.retry_after)
        capacity = d.limit
        if units <= capacity or capacity <= 0:
            return 0.0
        per_unit = memo.get(id(limiter))
        if per_unit is None:
            rate = limiter.inspect(key).get("rate")
            per_unit = memo[id(limiter)] = rate.period / rate.count if rate is not None else 0.0
        full = limiter.peek(key, capacity)
        base = 0.0 if full.allowed or math.isinf(full.retry_after) else float(full.retry_after)
        return base + float(units - capacity) * per_unit

    def _model_wait(self, lane: _Lane, units: int, now: float) -> float:
        """The Redis prediction, with no round trip: from the last answer, ``u0`` units
        available at ``t0`` and the whole capacity at ``t_full``; linear in between for
        one algorithm (exact for token and leaky buckets, flat for a fixed window), then
        at the sustained rate. For composites and budgets: the head's own wait only."""
        head_wait = max(lane.ready_at - now, 0.0)
        anchor = lane.anchor
        if anchor is None:
            return head_wait
        t0, u0, t_full, limit = anchor
        base = max(head_wait, t0 - now, 0.0)
        if self._kind != "rate" or units <= u0:
            return base
        full = max(base, t_full - now)
        span = limit - u0
        if units <= limit:
            return base + (full - base) * (units - u0) / span if span > 0 else base
        per_unit = (full - base) / span if span > 0 and full > base else self._per_unit
        return full + (units - limit) * per_unit

    def _sweep(self, lane: _Lane, now: float) -> None:
        """Refuses, now, the waiters of a lane that can no longer make their deadline
        (under the lock)."""
        lane.dirty = False
        lane.swept_at = now
        if self._kind == "lease":
            return
        memo: Dict[Any, float] = {}
        units = 0
        doomed: List[Tuple[_Waiter, float]] = []
        for w in lane.items:
            through = units + w.cost
            if w is not lane.checker and not math.isinf(w.deadline):
                need = self._predict(lane, through, now, memo)
                if now + need > w.deadline + _EPS:
                    doomed.append((w, need))
                    continue  # its units will not be served: those behind it move up
            units = through
        for w, need in doomed:
            self._remove(w)
            self._stats["timed_out"] += 1
            self._fail(w, self._refusal(w, None, need, now, "deadline"))


class _Done:
    """The waiter was admitted on arrival; ``value`` is what the check returned."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _give_back(result: Any) -> Optional[Any]:
    """Releases what an admission holds (a lease, a reservation); returns an awaitable
    when that is a coroutine (asyncio Redis)."""
    target = result.lease if isinstance(result, Decision) else result
    if target is None:
        return None
    for name in ("release", "cancel"):
        method = getattr(target, name, None)
        if callable(method):
            return method()
    return None


async def _give_back_async(result: Any) -> None:
    pending = _give_back(result)
    if pending is not None and hasattr(pending, "__await__"):
        await pending
