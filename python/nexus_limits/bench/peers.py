"""The contenders of ``nexus-limits bench``: nexus-limits, a 12-line pure-Python
reference, and the limiters Python users pick today, each configured idiomatically
and per key. A peer that is not installed is skipped with a line saying so."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Dict, List, NamedTuple, Optional

Check = Callable[[Any], bool]


class Made(NamedTuple):
    check: Check
    tracked: Optional[Callable[[], int]]  # keys still held, where the library lets us see
    cleanup: Optional[Callable[[], Any]]  # what a user calls to drop idle keys, if anything


class Contender(NamedTuple):
    name: str
    library: str
    family: str  # "bucket" or "window": which nexus-limits contender it is compared with
    make: Callable[[int, float], Made]  # (count, period seconds) -> Made


def _nexus(cls_name: str) -> Callable[[int, float], Made]:
    def make(count: int, period: float) -> Made:
        import nexus_limits as nl

        lim = getattr(nl, cls_name)(nl.Rate(count, period), ttl=period)
        return Made(lim.try_acquire, lambda: len(lim), lim.sweep)

    return make


def _reference(count: int, period: float) -> Made:
    from .measure import ReferenceGCRA

    ref = ReferenceGCRA(count, period)
    return Made(ref.try_acquire, lambda: len(ref.tat), None)


def _limits(strategy: str) -> Callable[[int, float], Made]:
    def make(count: int, period: float) -> Made:
        from limits import RateLimitItemPerSecond, storage, strategies

        store = storage.MemoryStorage()
        limiter = getattr(strategies, strategy)(store)
        item = RateLimitItemPerSecond(count, max(1, round(period)))

        def tracked() -> int:
            return len(getattr(store, "storage", {})) + len(getattr(store, "events", {}))

        return Made(lambda key: limiter.hit(item, key), tracked, None)

    return make


def _throttled(using: str) -> Callable[[int, float], Made]:
    def make(count: int, period: float) -> Made:
        import throttled

        # throttled-py counts periods in whole seconds.
        quota = throttled.rate_limiter.per_duration(_timedelta(max(1, round(period))), count)
        store = throttled.MemoryStore()
        th = throttled.Throttled(using=using, quota=quota, store=store)
        return Made(lambda key: not th.limit(str(key)).limited, None, None)

    return make


def _timedelta(period: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=period)


def _pyrate(count: int, period: float) -> Made:
    from pyrate_limiter import BucketFactory, InMemoryBucket, Limiter, MonotonicClock, Rate, RateItem

    class PerKey(BucketFactory):
        """One bucket per key (pyrate-limiter's default factory shares one for all keys)."""

        def __init__(self) -> None:
            self.rates = [Rate(count, int(period * 1000))]
            self.buckets: Dict[str, Any] = {}
            self.clock = MonotonicClock()

        def wrap_item(self, name: str, weight: int = 1) -> Any:
            return RateItem(name, self.clock.now(), weight=weight)

        def get(self, item: Any) -> Any:
            bucket = self.buckets.get(item.name)
            if bucket is None:
                bucket = self.buckets[item.name] = InMemoryBucket(self.rates)
            return bucket

    factory = PerKey()
    limiter = Limiter(factory)
    return Made(lambda key: bool(limiter.try_acquire(str(key), blocking=False)), lambda: len(factory.buckets), None)


def _token_bucket(count: int, period: float) -> Made:
    import token_bucket

    store = token_bucket.MemoryStorage()
    limiter = token_bucket.Limiter(count / period, count, store)
    return Made(lambda key: limiter.consume(str(key)), lambda: len(getattr(store, "_buckets", {})), None)


def contenders() -> List[Contender]:
    return [
        Contender("nexus-limits TokenBucket", "nexus-limits", "bucket", _nexus("TokenBucket")),
        Contender("nexus-limits SlidingWindow", "nexus-limits", "window", _nexus("SlidingWindow")),
        Contender("nexus-limits FixedWindow", "nexus-limits", "fixed", _nexus("FixedWindow")),
        Contender("reference (pure-Python GCRA)", "reference", "bucket", _reference),
        Contender("limits MovingWindow", "limits", "window", _limits("MovingWindowRateLimiter")),
        Contender("limits FixedWindow", "limits", "fixed", _limits("FixedWindowRateLimiter")),
        Contender("limits SlidingWindowCounter", "limits", "window", _limits("SlidingWindowCounterRateLimiter")),
        Contender("pyrate-limiter (per-key buckets)", "pyrate_limiter", "window", _pyrate),
        Contender("throttled-py TokenBucket", "throttled", "bucket", _throttled("token_bucket")),
        Contender("throttled-py GCRA", "throttled", "bucket", _throttled("gcra")),
        Contender("throttled-py SlidingWindow", "throttled", "window", _throttled("sliding_window")),
        Contender("token-bucket", "token_bucket", "bucket", _token_bucket),
    ]


def available(contender: Contender) -> bool:
    if contender.library in ("nexus-limits", "reference"):
        return True
    return importlib.util.find_spec(contender.library) is not None


OURS = {
    "bucket": "nexus-limits TokenBucket",
    "window": "nexus-limits SlidingWindow",
    "fixed": "nexus-limits FixedWindow",
}
