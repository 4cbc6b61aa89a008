"""Where the outbound buckets live: in this process, in a SharedMemoryStore (the
processes of one host), or on Redis (every host).

A ledger keeps, per model and per limit ("requests", "tokens", "input_tokens",
"output_tokens"), a token bucket of the provider's limit: ``used`` units that drain at
the limit's rate. Every operation sees several buckets of one model at once and is
atomic across them:

- ``take(model, rates, costs, lead)``: charge every bucket its cost if all of them
  have room, else charge nothing and say how long to wait (``math.inf``: a cost above
  a limit's capacity never fits). ``lead`` is how long the request takes to reach the
  provider: a bucket with room starts draining a charge at once, the provider's only
  when the request arrives, so the charge is counted as starting ``lead`` seconds
  later (GCRA: ``tat = max(tat, now + lead) + cost``), or the local bucket would run
  ``lead`` seconds of refill ahead of the provider's after every idle spell;
- ``adjust(model, rates, deltas)``: settle — charge more (a bucket may go into debt) or
  refund (never below empty);
- ``sync(model, rates, floors)``: for each bucket whose usage is below ``floors[dim][0]``
  (the least the provider's headers prove it has counted), raise it to
  ``floors[dim][1]`` (what they say it counts);
- ``pause(model, seconds)`` / ``paused(model)``: hold the model until a 429's
  ``retry-after`` has passed, for every process sharing the ledger.

``charge`` is ``take`` that also says which ledger holds the charge (the Redis ledger
answers from an in-process one while Redis is away, or charges nowhere), so that the
call settles where it was charged.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import nexus_limits as nl

__all__ = ["LocalLedger", "SharedLedger", "ledger_for"]

Rates = Mapping[str, nl.Rate]
Costs = Mapping[str, float]
Floors = Mapping[str, Tuple[float, float]]

# In shared memory a request or a token is up to 1,000 units of the store's bucket, so
# that settling (which rewrites a bucket in whole units) keeps its fractions.
_SCALE = 1000
_MAX_UNITS = 2**50
# The longest pause a shared ledger records (a provider's retry-after beyond it is cut).
MAX_PAUSE = 600.0


class _Ledger:
    """What the sync and async transports call; the asyncio variants of a ledger whose
    operations never block for long (in-process, shared memory) run them directly."""

    def take(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        raise NotImplementedError

    def adjust(self, model: str, rates: Rates, deltas: Costs) -> None:
        raise NotImplementedError

    def sync(self, model: str, rates: Rates, floors: Floors) -> int:
        raise NotImplementedError

    def used(self, model: str, rates: Rates) -> Dict[str, float]:
        raise NotImplementedError

    def pause(self, model: str, seconds: float) -> None:
        raise NotImplementedError

    def paused(self, model: str) -> float:
        raise NotImplementedError

    def charge(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> Tuple[float, Optional[_Ledger]]:
        """``take``, and the ledger that holds the charge (None: none does)."""
        return self.take(model, rates, costs, lead), self

    async def take_async(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        return self.take(model, rates, costs, lead)

    async def charge_async(
        self, model: str, rates: Rates, costs: Costs, lead: float = 0.0
    ) -> Tuple[float, Optional[_Ledger]]:
        return await self.take_async(model, rates, costs, lead), self

    async def used_async(self, model: str, rates: Rates) -> Dict[str, float]:
        return self.used(model, rates)

    async def adjust_async(self, model: str, rates: Rates, deltas: Costs) -> None:
        self.adjust(model, rates, deltas)

    async def sync_async(self, model: str, rates: Rates, floors: Floors) -> int:
        return self.sync(model, rates, floors)

    async def pause_async(self, model: str, seconds: float) -> None:
        self.pause(model, seconds)

    async def paused_async(self, model: str) -> float:
        return self.paused(model)

    where = "in-process"


def _per_second(rate: nl.Rate) -> float:
    return rate.count / rate.period


def _lead_units(lead: float, rate: nl.Rate, used: float, scale: int = 1) -> int:
    """What charging ``lead`` seconds late adds, in units of ``1 / scale``:
    ``max(used, lead x rate) - used``, rounded to the nearest unit."""
    if lead <= 0:
        return 0
    return max(0, round((lead * _per_second(rate) - used) * scale))


class LocalLedger(_Ledger):
    """Buckets in this process: one single-limit ``nexus_limits.TokenLimiter`` per model
    and limit (its exact refill, debt and refunds), decided together under a lock."""

    where = "in-process"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: Dict[Tuple[str, str], Tuple[nl.Rate, nl.TokenLimiter]] = {}
        self._pauses: Dict[str, float] = {}

    def _bucket(self, model: str, dim: str, rate: nl.Rate) -> nl.TokenLimiter:
        entry = self._buckets.get((model, dim))
        if entry is None:
            limiter = nl.TokenLimiter(tokens=rate, ttl=max(3600.0, 2 * rate.period))
            self._buckets[(model, dim)] = (rate, limiter)
            return limiter
        old, limiter = entry
        if old != rate:
            # A learned limit changed (a new tier): keep what was used.
            limiter.set_default_quota(tokens=rate)
            self._buckets[(model, dim)] = (rate, limiter)
        return limiter

    @staticmethod
    def _used(limiter: nl.TokenLimiter, rate: nl.Rate) -> float:
        state = limiter.inspect("b")["tokens"]
        return float(state["reset_after"]) * _per_second(rate)

    def take(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        with self._lock:
            wait = 0.0
            buckets = []
            for dim, cost in costs.items():
                rate = rates.get(dim)
                if rate is None:
                    continue
                limiter = self._bucket(model, dim, rate)
                units = math.ceil(cost)
                if units > rate.count:
                    return math.inf
                decision = limiter._peek("b", units)[0]
                if not decision.allowed:
                    wait = max(wait, float(decision.retry_after))
                buckets.append((limiter, units + _lead_units(lead, rate, self._used(limiter, rate))))
            if wait > 0:
                return wait
            for limiter, units in buckets:
                if units:
                    limiter._adjust("b", units, limiter._now())
            return 0.0

    def adjust(self, model: str, rates: Rates, deltas: Costs) -> None:
        with self._lock:
            for dim, delta in deltas.items():
                rate = rates.get(dim)
                units = round(delta)
                if rate is None or units == 0:
                    continue
                limiter = self._bucket(model, dim, rate)
                limiter._adjust("b", units, limiter._now())

    def sync(self, model: str, rates: Rates, floors: Floors) -> int:
        raised = 0
        with self._lock:
            for dim, (below, target) in floors.items():
                rate = rates.get(dim)
                if rate is None:
                    continue
                limiter = self._bucket(model, dim, rate)
                used = self._used(limiter, rate)
                if used < below:
                    limiter._adjust("b", round(target - used), limiter._now())
                    raised += 1
        return raised

    def used(self, model: str, rates: Rates) -> Dict[str, float]:
        with self._lock:
            return {dim: self._used(self._bucket(model, dim, rate), rate) for dim, rate in rates.items()}

    def pause(self, model: str, seconds: float) -> None:
        until = time.monotonic() + min(seconds, MAX_PAUSE)
        with self._lock:
            if until > self._pauses.get(model, 0.0):
                self._pauses[model] = until

    def paused(self, model: str) -> float:
        until = self._pauses.get(model)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            with self._lock:
                if self._pauses.get(model) == until:
                    del self._pauses[model]
            return 0.0
        return left


class SharedLedger(_Ledger):
    """Buckets in a :class:`~nexus_limits.SharedMemoryStore`, shared by every process of
    the host that opens the same store: one ``nexus_limits.TokenBucket(store=store)`` per
    model and limit, and one more per model holding its pause (a backlog of
    milliseconds). Operations on several buckets are made atomic across processes by an
    ``flock`` on a file next to the store (held for microseconds; the kernel drops it if
    its holder dies)."""

    where = "shared memory"

    def __init__(self, store: nl.SharedMemoryStore, namespace: str = "outbound") -> None:
        if not isinstance(store, nl.SharedMemoryStore):
            raise TypeError(f"store must be a nexus_limits.SharedMemoryStore, got {type(store).__name__}")
        self.store = store
        self.namespace = namespace
        self._thread_lock = threading.Lock()
        path = f"{store.path}.{namespace}.lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._buckets: Dict[Tuple[str, str, nl.Rate], nl.TokenBucket] = {}
        self._pause_buckets: Dict[str, nl.TokenBucket] = {}

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass

    class _Locked:
        __slots__ = ("_ledger",)

        def __init__(self, ledger: SharedLedger) -> None:
            self._ledger = ledger

        def __enter__(self) -> None:
            import fcntl

            self._ledger._thread_lock.acquire()
            try:
                fcntl.flock(self._ledger._fd, fcntl.LOCK_EX)
            except BaseException:
                self._ledger._thread_lock.release()
                raise

        def __exit__(self, *exc: object) -> None:
            import fcntl

            try:
                fcntl.flock(self._ledger._fd, fcntl.LOCK_UN)
            finally:
                self._ledger._thread_lock.release()

    def _locked(self) -> SharedLedger._Locked:
        return SharedLedger._Locked(self)

    def _key(self, model: str, dim: str) -> str:
        return f"{self.namespace}\x00{model}\x00{dim}"

    def _bucket(self, model: str, dim: str, rate: nl.Rate) -> Tuple[nl.TokenBucket, int]:
        scale = max(1, min(_SCALE, _MAX_UNITS // rate.count))
        bucket = self._buckets.get((model, dim, rate))
        if bucket is None:
            bucket = nl.TokenBucket(nl.Rate(rate.count * scale, rate.period), store=self.store)
            self._buckets[(model, dim, rate)] = bucket
        return bucket, scale

    def _used(self, bucket: nl.TokenBucket, key: str, rate: nl.Rate) -> float:
        return float(bucket.peek(key, 0).reset_after) * _per_second(rate)

    def _set(self, bucket: nl.TokenBucket, key: str, rate: nl.Rate, scale: int, used: float) -> None:
        # Rounded up: a count never drifts below what was charged.
        units = min(math.ceil(used * scale - 1e-6), rate.count * scale)
        bucket.reset(key)
        if units > 0:
            bucket.hit(key, units)

    def take(self, model: str, rates: Rates, costs: Costs, lead: float = 0.0) -> float:
        with self._locked():
            wait = 0.0
            charges = []
            for dim, cost in costs.items():
                rate = rates.get(dim)
                if rate is None:
                    continue
                bucket, scale = self._bucket(model, dim, rate)
                units = math.ceil(cost) * scale
                key = self._key(model, dim)
                decision = bucket.peek(key, units)
                if math.isinf(decision.retry_after):
                    return math.inf
                if not decision.allowed:
                    wait = max(wait, float(decision.retry_after))
                if lead > 0:
                    extra = _lead_units(lead, rate, self._used(bucket, key, rate), scale)
                    units = min(units + extra, rate.count * scale)
                charges.append((bucket, key, units))
            if wait > 0:
                return wait
            for bucket, key, units in charges:
                if units:
                    bucket.hit(key, units)
            return 0.0

    def adjust(self, model: str, rates: Rates, deltas: Costs) -> None:
        with self._locked():
            for dim, delta in deltas.items():
                rate = rates.get(dim)
                if rate is None or delta == 0:
                    continue
                bucket, scale = self._bucket(model, dim, rate)
                key = self._key(model, dim)
                used = self._used(bucket, key, rate)
                # A debt past a whole empty bucket is not kept: the store's buckets end
                # there. The provider's headers bring it back (sync).
                self._set(bucket, key, rate, scale, max(0.0, used + delta))

    def sync(self, model: str, rates: Rates, floors: Floors) -> int:
        raised = 0
        with self._locked():
            for dim, (below, target) in floors.items():
                rate = rates.get(dim)
                if rate is None:
                    continue
                bucket, scale = self._bucket(model, dim, rate)
                key = self._key(model, dim)
                used = self._used(bucket, key, rate)
                if used < below:
                    self._set(bucket, key, rate, scale, target)
                    raised += 1
        return raised

    def used(self, model: str, rates: Rates) -> Dict[str, float]:
        with self._locked():
            out = {}
            for dim, rate in rates.items():
                bucket, _ = self._bucket(model, dim, rate)
                out[dim] = self._used(bucket, self._key(model, dim), rate)
            return out

    def _pause_bucket(self, model: str) -> nl.TokenBucket:
        bucket = self._pause_buckets.get(model)
        if bucket is None:
            # One unit per millisecond; a backlog of n units is a pause of n ms.
            bucket = nl.TokenBucket("1000/s", burst=int(MAX_PAUSE * 1000), store=self.store)
            self._pause_buckets[model] = bucket
        return bucket

    def pause(self, model: str, seconds: float) -> None:
        seconds = min(seconds, MAX_PAUSE)
        with self._locked():
            bucket = self._pause_bucket(model)
            key = self._key(model, "pause")
            left = float(bucket.peek(key, 0).reset_after)
            if seconds > left:
                bucket.reset(key)
                bucket.hit(key, max(1, math.ceil(seconds * 1000)))

    def paused(self, model: str) -> float:
        bucket = self._pause_bucket(model)
        return float(bucket.peek(self._key(model, "pause"), 0).reset_after)


def ledger_for(store: Any, namespace: str = "outbound", *, on_error: str = "raise", replicas: int = 1) -> _Ledger:
    """The ledger for ``store``: None (this process), a SharedMemoryStore, or a Redis
    client (``redis.Redis`` / ``redis.asyncio.Redis``, or a Redis Cluster client).
    ``on_error`` and ``replicas`` say what a Redis ledger does while Redis is away (see
    :class:`~nexus_limits.outbound._redis.RedisLedger`); other stores cannot be away."""
    if store is not None and hasattr(store, "evalsha") and hasattr(store, "script_load"):
        from ._redis import RedisLedger

        return RedisLedger(store, namespace, on_error=on_error, replicas=replicas)
    if on_error != "raise" or replicas != 1:
        raise ValueError(
            "on_error= and replicas= say what to do while Redis is away: they apply only when store= is a "
            f"Redis client, not {type(store).__name__ if store is not None else 'None (this process)'}"
        )
    if store is None:
        return LocalLedger()
    if isinstance(store, nl.SharedMemoryStore):
        return SharedLedger(store, namespace)
    raise TypeError(
        "store must be None (this process), a nexus_limits.SharedMemoryStore (the processes of one host) "
        f"or a Redis client (every host), got {type(store).__name__}"
    )
