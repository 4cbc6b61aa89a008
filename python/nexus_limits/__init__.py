"""nexus-limits: rate limiting and traffic control with a Rust core.

>>> import nexus_limits as nl
>>> tb = nl.TokenBucket("100/minute", burst=20)
>>> tb.try_acquire("api-key")
True
>>> d = tb.hit("api-key", cost=5)
>>> d.allowed, d.remaining
(True, 14)
"""

from ._core import Decision, Lease, ManualClock, Quota, Rate, SharedMemoryStore
from ._core import __version__ as __version__
from .base import AsyncRateLimiter, RateLimiter
from .errors import BackendUnavailable, BadRequest, NexusLimitsError, RateLimitExceeded
from .limiters import Composite, Concurrency, FixedWindow, LeakyBucket, Priority, SlidingWindow, TokenBucket

# Not `from typing import TYPE_CHECKING`: typing alone costs `import nexus_limits` more
# than everything else it loads. Type checkers take this name as True.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .adapters.decorators import limit
    from .budget import Reservation, TokenLimiter
    from .fair import CancelToken, FairQueue, QueueCancelled, QueueRefused
    from .hierarchy import Hierarchy, HierarchyDecision, HierarchyReservation

# Loaded on first use (see __getattr__), so that `import nexus_limits` stays light: the
# plain limiters above are all a program that only checks rates loads.
_LAZY = {
    "limit": "adapters.decorators",
    "FairQueue": "fair",
    "CancelToken": "fair",
    "QueueRefused": "fair",
    "QueueCancelled": "fair",
    "Hierarchy": "hierarchy",
    "HierarchyDecision": "hierarchy",
    "HierarchyReservation": "hierarchy",
    "Reservation": "budget",
    "TokenLimiter": "budget",
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


def __getattr__(name: str) -> "Any":
    """The names of ``_LAZY``, imported when first asked for (then kept here)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nexus_limits' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
