"""The asyncio mirror of :mod:`nexus_limits.redis`: the same classes and names for
``redis.asyncio.Redis`` (or ``redis.asyncio.RedisCluster``, or Valkey's asyncio
client). Every method is a coroutine; nothing blocks the event loop::

    import redis.asyncio
    from nexus_limits.redis.asyncio import TokenBucket

    limiter = TokenBucket(redis.asyncio.Redis(), "100/minute", burst=20)
    decision = await limiter.hit("api-key")
"""

from __future__ import annotations

from ._async import (
    Composite,
    Concurrency,
    FixedWindow,
    LeakyBucket,
    Lease,
    LeasePolicy,
    SlidingWindow,
    TokenBucket,
)
from ._async_budget import SpendLimiter, TokenLimiter
from ._async_hierarchy import Hierarchy, Priority

__all__ = [
    "Composite",
    "Concurrency",
    "FixedWindow",
    "Hierarchy",
    "LeakyBucket",
    "Lease",
    "LeasePolicy",
    "Priority",
    "SlidingWindow",
    "SpendLimiter",
    "TokenBucket",
    "TokenLimiter",
]

# Defined in _async.py and _async_budget.py (the one source of both sides); they belong here.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
