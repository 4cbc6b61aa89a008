"""Why an outbound call was refused before it was sent."""

from __future__ import annotations

import math
from typing import Optional

from .._core import Decision
from ..errors import NexusLimitsError, RateLimitExceeded

__all__ = ["CallTooLarge", "OutboundRefused", "QuotaTimeout", "StoreUnavailable"]


class OutboundRefused(RateLimitExceeded):
    """A call the outbound limiter did not send. ``model`` is the request's model,
    ``limit`` the provider limit that stopped it (``"requests"``, ``"tokens"``,
    ``"input_tokens"`` or ``"output_tokens"``; ``"paused"`` while a 429's retry-after
    runs), ``retry_after`` the seconds it would have needed (``math.inf``: never)."""

    code = "refused"

    def __init__(self, model: str, limit: str, message: str, retry_after: float, timeout: Optional[float]) -> None:
        # RateLimitExceeded's attributes, with a message of our own.
        NexusLimitsError.__init__(self, message)
        self.key = model
        self.model = model
        self.limit = limit
        self.timeout = timeout
        self.decision = Decision(False, 0, 0, 0.0, retry_after)

    @property
    def retry_after(self) -> float:
        return float(self.decision.retry_after)


class CallTooLarge(OutboundRefused):
    """The call needs more than a whole limit (e.g. 50,000 tokens against a limit of
    30,000 per minute): it could never be sent, so it is refused at once."""

    code = "call_too_large"

    def __init__(self, model: str, limit: str, needed: int, capacity: int, timeout: Optional[float]) -> None:
        self.needed = needed
        self.capacity = capacity
        super().__init__(
            model,
            limit,
            f"nexus-limits: this call to {model} needs {needed} {limit.replace('_', ' ')} but the limit is "
            f"{capacity} per window, so it can never be sent; make it smaller (fewer input tokens, a lower "
            "max_tokens) or raise the limit",
            math.inf,
            timeout,
        )


class QuotaTimeout(OutboundRefused):
    """The provider's limit would not allow the call before ``timeout`` seconds of waiting."""

    code = "quota_timeout"

    def __init__(self, model: str, limit: str, wait: float, timeout: Optional[float]) -> None:
        super().__init__(
            model,
            limit,
            f"nexus-limits: the {limit.replace('_', ' ')} limit of {model} would admit this call in "
            f"{wait:.3g} s, past the wait allowed (timeout={timeout!r} s)",
            wait,
            timeout,
        )


class StoreUnavailable(OutboundRefused):
    """The shared store (Redis) could not be reached and the limiter was built with
    ``on_error="deny"``: calls are refused rather than sent unmetered while it is away.
    ``retry_after`` is a second (the breaker tries the store again about then);
    ``__cause__`` is the store's error."""

    code = "store_unavailable"

    def __init__(self, model: str, cause: BaseException, retry_after: float, timeout: Optional[float]) -> None:
        what = f"{type(cause).__name__}: {cause}"[:300]
        super().__init__(
            model,
            "store",
            f"nexus-limits: the shared store (Redis) that holds {model}'s limits could not be reached ({what}); "
            "with on_error='deny' calls are refused until it answers again (on_error='local' would admit them "
            "against this process's share of the limits)",
            retry_after,
            timeout,
        )
