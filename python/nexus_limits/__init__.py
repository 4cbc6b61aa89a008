"""nexus-limits: rate limiting and traffic control with a Rust core.

>>> import nexus_limits as nl
>>> tb = nl.TokenBucket("100/minute", burst=20)
>>> tb.try_acquire("api-key")
True
>>> d = tb.hit("api-key", cost=5)
>>> d.allowed, d.remaining
(True, 14)
"""

from typing import TYPE_CHECKING, Any

from ._core import Decision, Lease, ManualClock, Quota, Rate, SharedMemoryStore
from ._core import __version__ as __version__
from .base import AsyncRateLimiter, RateLimiter
from .budget import Reservation, TokenLimiter
from .errors import BackendUnavailable, BadRequest, NexusLimitsError, RateLimitExceeded
from .hierarchy import Hierarchy, HierarchyDecision, HierarchyReservation
from .limiters import Composite, Concurrency, FixedWindow, LeakyBucket, Priority, SlidingWindow, TokenBucket

if TYPE_CHECKING:
    from .adapters.decorators import limit
    from .fair import CancelToken, FairQueue, QueueCancelled, QueueRefused

# Loaded on first use (see __getattr__), so that `import nexus_limits` stays light.
_LAZY = {
    "limit": "adapters.decorators",
    "FairQueue": "fair",
    "CancelToken": "fair",
    "QueueRefused": "fair",
    "QueueCancelled": "fair",
}

__all__ = [
    "AsyncRateLimiter",
    "BackendUnavailable",
    "BadRequest",
    "CancelToken",
    "Composite",
    "Concurrency",
    "Decision",
    "FairQueue",
    "FixedWindow",
    "Hierarchy",
    "HierarchyDecision",
    "HierarchyReservation",
    "LeakyBucket",
    "Lease",
    "ManualClock",
    "NexusLimitsError",
    "Priority",
    "QueueCancelled",
    "QueueRefused",
    "Quota",
    "Rate",
    "RateLimitExceeded",
    "RateLimiter",
    "Reservation",
    "SharedMemoryStore",
    "SlidingWindow",
    "TokenBucket",
    "TokenLimiter",
    "__version__",
    "limit",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nexus_limits' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
