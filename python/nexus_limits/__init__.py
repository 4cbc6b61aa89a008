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

from ._core import Decision, Lease, ManualClock, Rate, SharedMemoryStore
from ._core import __version__ as __version__
from .base import AsyncRateLimiter, RateLimiter
from .budget import Reservation, TokenLimiter
from .errors import BackendUnavailable, BadRequest, NexusLimitsError, RateLimitExceeded
from .limiters import Composite, Concurrency, FixedWindow, LeakyBucket, SlidingWindow, TokenBucket

if TYPE_CHECKING:
    from .adapters.decorators import limit

__all__ = [
    "AsyncRateLimiter",
    "BackendUnavailable",
    "BadRequest",
    "Composite",
    "Concurrency",
    "Decision",
    "FixedWindow",
    "LeakyBucket",
    "Lease",
    "ManualClock",
    "NexusLimitsError",
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
    # `limit` lives with the adapters, which load asyncio; importing it on first use keeps
    # `import nexus_limits` light.
    if name == "limit":
        from .adapters.decorators import limit

        return limit
    raise AttributeError(f"module 'nexus_limits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "limit"})
