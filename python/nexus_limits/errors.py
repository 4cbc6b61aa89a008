"""Exceptions of nexus-limits.

Bad arguments raise the built-in ``ValueError`` or ``TypeError`` with a message that
names the argument; a denied call is a :class:`~nexus_limits.Decision`, never an
exception. The classes here are for waiting that cannot succeed, for backends, and for
requests the framework adapters cannot judge.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is for type checkers only: see base.py
if TYPE_CHECKING:
    from typing import Any, Optional

__all__ = ["BackendUnavailable", "BadRequest", "NexusLimitsError", "RateLimitExceeded"]

_INF = float("inf")  # math.inf, without importing math at `import nexus_limits`


class NexusLimitsError(Exception):
    """Base class of the exceptions raised by nexus-limits."""


class RateLimitExceeded(NexusLimitsError):
    """``acquire`` could not be admitted in time.

    Raised at once, without sleeping, when the wait is known to exceed ``timeout`` or
    when the cost can never be admitted (it is above the limiter's capacity).

    Attributes:
        key: the key that was limited.
        decision: the last :class:`~nexus_limits.Decision` (``retry_after`` says how long
            the wait would have been; ``math.inf`` when never).
        timeout: the timeout that was given, or None.
    """

    def __init__(self, key: Any, decision: Any, timeout: Optional[float]) -> None:
        self.key = key
        self.decision = decision
        self.timeout = timeout
        retry = getattr(decision, "retry_after", _INF)
        if retry == _INF:
            why = "the cost is above the limit, so it can never be admitted"
        else:
            why = f"admission needs {retry:.6g} s more, past timeout={timeout!r}"
        super().__init__(f"rate limit exceeded for key {key!r}: {why}")

    @property
    def retry_after(self) -> float:
        """Seconds until the call could be admitted (``math.inf`` when never)."""
        return float(getattr(self.decision, "retry_after", _INF))


class BackendUnavailable(NexusLimitsError):
    """A shared store (Redis/Valkey) could not be reached; ``__cause__`` is the error."""


class BadRequest(NexusLimitsError, ValueError):
    """A request that cannot be judged: its target is not a plain path the limiter can
    compare (``http://host/x``, ``*``, an encoded ``/``, ``?`` or ``#``, an invalid
    percent-escape...), or the client key is ambiguous (given twice with different
    values).

    ``str(error)`` is a one-line detail naming the problem; the adapters send it as the
    ``detail`` of a 400 ``application/problem+json`` answer. Key functions given as
    ``key=`` may raise it too.
    """
