"""nexus-limits: rate limiting and traffic control with a Rust core.

>>> import nexus_limits as nl
>>> tb = nl.TokenBucket("100/minute", burst=20)
>>> tb.try_acquire("api-key")
True
>>> d = tb.hit("api-key", cost=5)
>>> d.allowed, d.remaining
(True, 14)
"""

from ._core import Decision, Lease, ManualClock, Rate, SharedMemoryStore
from ._core import __version__ as __version__
from .adapters.decorators import limit
from .base import AsyncRateLimiter, RateLimiter
from .budget import Reservation, TokenLimiter
from .errors import BackendUnavailable, BadRequest, NexusLimitsError, RateLimitExceeded
from .limiters import Composite, Concurrency, FixedWindow, LeakyBucket, SlidingWindow, TokenBucket

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
