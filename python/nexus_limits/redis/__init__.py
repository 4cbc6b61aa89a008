"""Limiters shared by every process and host, through Redis or Valkey.

The classes mirror the in-process ones — ``TokenBucket``, ``SlidingWindow``,
``FixedWindow``, ``LeakyBucket``, ``Concurrency``, ``Composite`` — and take a client
first::

    import redis
    from nexus_limits.redis import TokenBucket

    limiter = TokenBucket(redis.Redis(), "100/minute", burst=20, prefix="nl")
    limiter.hit("api-key")

Each check is one round trip: a Lua script (the twin of the Rust step function) run
with EVALSHA, reading the server's clock (``TIME``), so client clock skew never
matters; keys expire by themselves once they are back at their fresh state. Keys of
one user key share a hash tag, so composites work on Redis Cluster.

When the server cannot be reached, ``on_error`` decides: ``"raise"`` (the default)
raises :class:`~nexus_limits.BackendUnavailable` with the cause, ``"allow"`` fails open
and ``"deny"`` fails closed; either way the Decision has ``fallback=True``.

The asyncio mirror, with the same names, is :mod:`nexus_limits.redis.asyncio`.
"""

from __future__ import annotations

from ._sync import (
    Composite,
    Concurrency,
    FixedWindow,
    LeakyBucket,
    Lease,
    LeasePolicy,
    SlidingWindow,
    TokenBucket,
)
from ._sync_budget import SpendLimiter, TokenLimiter
from ._sync_hierarchy import Hierarchy, Priority

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

# Defined in the generated _sync.py and _sync_budget.py; they belong to this module.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
