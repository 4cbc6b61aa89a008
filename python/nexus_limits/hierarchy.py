"""Hierarchical quotas: org > team > key (any depth), charged at every level at once.

>>> import nexus_limits as nl
>>> h = nl.Hierarchy(levels=[("org", "1000/minute"), ("team", "100/minute"), ("key", "10/minute")])
>>> h.hit(("acme", "search", "sk-1")).allowed
True
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from . import _core, _wait
from ._core import Decision, ManualClock
from .base import Key

__all__ = ["AsyncHierarchyReservation", "Hierarchy", "HierarchyDecision", "HierarchyReservation"]

Path = Union[Tuple[Key, ...], List[Key]]
_MAX_LEVELS = 16


def _spend(spend: Any) -> Any:
    """A dollar budget (``"25.00/day"``) as a rate of micro-dollars; anything else as given
    (the native class checks it)."""
    if isinstance(spend, str):
        from .spend import parse_budget  # here: the spend package is not needed otherwise

        return parse_budget(spend)
    return spend


def _level(level: Any) -> Any:
    """A level as the native class takes it: dollar budgets (``spend="25.00/day"``) become
    rates of micro-dollars; everything else is checked there."""
    if not isinstance(level, tuple) or len(level) != 2 or not isinstance(level[1], dict):
        return level
    name, quotas = level
    if isinstance(quotas.get("spend"), str):
        quotas = {**quotas, "spend": _spend(quotas["spend"])}
    return (name, quotas)


class HierarchyDecision:
    """The answer to :meth:`Hierarchy.hit` (or ``peek``): true when every level admitted.

    - ``decision``: every quota's decision combined (the least ``remaining``, the
      longest ``retry_after``), a :class:`~nexus_limits.Decision`;
    - ``level``: the name of the level that refused (None when admitted), ``quota`` the
      quota there that refused (``"requests"``, ``"tokens"``, ``"daily_tokens"``,
      ``"spend"`` or ``"concurrency"``) and ``policy`` both as ``"team.tokens"``. When
      several refused, the one that frees up last (the highest level of those tied);
      in shadow mode, the one that would have refused;
    - ``levels``: each level's own decision, ``{"org": Decision, ...}``, whose
      ``retry_after`` says when that level frees up for this call;
    - ``quotas``: each quota's own decision, ``{"org.requests": Decision, ...}``.
    """

    __slots__ = ("_concurrency", "_levels", "_owner", "_quotas", "_reply", "decision", "level", "path", "quota")

    def __init__(self, owner: Any, path: Path, reply: Tuple[Any, ...]) -> None:
        self._owner = owner
        self._reply = reply
        self.path = tuple(path)
        self.decision: Decision = reply[1]
        refused = reply[2]
        self.level: Optional[str] = refused[0] if refused is not None else None
        self.quota: Optional[str] = refused[1] if refused is not None else None
        # Built when first asked for: most callers only look at the decision.
        self._levels: Optional[Dict[str, Decision]] = None
        self._quotas: Optional[Dict[str, Decision]] = None
        self._concurrency: Optional[Dict[str, Decision]] = None

    @property
    def levels(self) -> Dict[str, Decision]:
        """Each level's own decision, ``{"org": Decision, ...}``."""
        if self._levels is None:
            self._levels = {n: d for n, d in zip(self._owner.levels, self._reply[4]) if d is not None}
        return self._levels

    @property
    def concurrency(self) -> Dict[str, Decision]:
        """Each level's concurrency decision (levels with a limit, when asked)."""
        if self._concurrency is None:
            self._concurrency = {n: d for n, d in zip(self._owner.levels, self._reply[5]) if d is not None}
        return self._concurrency

    @property
    def quotas(self) -> Dict[str, Decision]:
        """Each quota's own decision, ``{"org.requests": Decision, ..., "team.concurrency": ...}``."""
        if self._quotas is None:
            quotas = {f"{level}.{unit}": d for level, unit, d in self._reply[3]}
            for name, d in self.concurrency.items():
                quotas[f"{name}.concurrency"] = d
            self._quotas = quotas
        return self._quotas

    @property
    def allowed(self) -> bool:
        return bool(self.decision.allowed)

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def policy(self) -> Optional[str]:
        """The refusing quota as ``"level.quota"`` (None when admitted, unless in shadow
        mode: then the quota that would have refused)."""
        return None if self.level is None else f"{self.level}.{self.quota}"

    @property
    def retry_after(self) -> float:
        """Seconds until the same call could be admitted at every level (``math.inf``:
        never, it is above a quota's capacity)."""
        return float(self.decision.retry_after)

    @property
    def remaining(self) -> int:
        return int(self.decision.remaining)

    def headers(self) -> Dict[str, str]:
        """Rate-limit headers for this call: ``RateLimit-Policy`` and ``RateLimit`` list
        every quota of the path as ``"level.quota"`` (the refusing one first), the legacy
        ``X-RateLimit-*`` triple the tightest, ``Retry-After`` (whole seconds) when
        refused, and OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
        from the tightest level of each."""
        from .adapters.headers import Policy, rate_limit_headers
        from .budget import go_duration

        entries: List[Tuple[Any, Decision]] = []
        for level, unit, _quota, window in self._owner._policies(self.path):
            name = f"{level}.{unit}"
            d = self.quotas.get(name)
            if d is None:
                continue  # a fallback answer (the store was away) decided no quota
            entries.append((Policy(name, int(d.limit), max(1, math.ceil(window))), d))
        for level, d in self.concurrency.items():
            entries.append((Policy(f"{level}.concurrency", int(d.limit), 0), d))
        entries.sort(key=lambda e: e[0].name != self.policy)
        out = dict(rate_limit_headers(entries, denied_by=None if self.allowed else self.decision))
        if not entries and not self.allowed and not math.isinf(self.retry_after):
            # A fallback refusal (the store was away) decided no quota but still says when to retry.
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        for unit in ("requests", "tokens"):
            mine = [d for name, d in self.quotas.items() if name.endswith(f".{unit}")]
            if mine:
                d = min(mine, key=lambda d: (d.remaining, -d.retry_after))
                out[f"x-ratelimit-limit-{unit}"] = str(d.limit)
                out[f"x-ratelimit-remaining-{unit}"] = str(d.remaining)
                out[f"x-ratelimit-reset-{unit}"] = go_duration(d.reset_after)
        return out

    def __repr__(self) -> str:
        state = "allowed" if self.allowed else f"refused by {self.policy}" if self.policy else "refused"
        return f"{type(self).__name__}(path={self.path!r}, {state}, retry_after={self.retry_after:.6g})"


class HierarchyReservation(HierarchyDecision):
    """The outcome of :meth:`Hierarchy.reserve`: when ``allowed``, one request, the
    estimated tokens and spend were charged at every level, and a lease is held at every
    level with a concurrency limit. Finish it exactly once:

    - ``settle(actual_tokens, actual_spend=None)`` charges the actual amounts instead of
      the estimates at every level (a refund when they were high; a node may go into
      debt when they were low) and ends the leases;
    - ``cancel()`` refunds the request and every estimate at every level and ends the
      leases.

    Neither settled nor cancelled within the hierarchy's ``lease_ttl``, it stands as
    charged (its leases expire) and a late ``settle``/``cancel`` returns False.
    """

    __slots__ = ("_charged_at", "_done", "_leases", "_lock", "estimate", "spend_estimate")

    def __init__(self, owner: Any, path: Path, tokens: int, spend: int, reply: Tuple[Any, ...]) -> None:
        super().__init__(owner, path, reply)
        self.estimate = tokens
        self.spend_estimate = spend
        self._leases: List[Optional[int]] = reply[6]
        self._charged_at: int = reply[7]
        self._done = not reply[0]
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """Settled, cancelled, expired, or never admitted."""
        return self._done or bool(self._owner._expired(self._charged_at))

    def _take(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    @staticmethod
    def _amount(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        return value

    def settle(self, actual_tokens: int, actual_spend: Optional[int] = None) -> bool:
        """Charge the actual tokens (and spend, if given) instead of the estimates, at
        every level. True if applied. An amount past 64 bits is a debt no one can wait
        out: it is charged as the largest debt a node holds."""
        tokens = self._amount("actual_tokens", actual_tokens)
        spend = self.spend_estimate if actual_spend is None else self._amount("actual_spend", actual_spend)
        if not self._take():
            return False
        return bool(
            self._owner._settle(
                self.path, 0, tokens - self.estimate, spend - self.spend_estimate, self._charged_at, self._leases
            )
        )

    def cancel(self) -> bool:
        """Refund the request and every estimate at every level. True if applied."""
        if not self._take():
            return False
        return bool(
            self._owner._settle(self.path, -1, -self.estimate, -self.spend_estimate, self._charged_at, self._leases)
        )

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, estimate={self.estimate}, {'done' if self.done else 'open'})"


class AsyncHierarchyReservation(HierarchyReservation):
    """A :class:`HierarchyReservation` of an asyncio backend
    (:class:`nexus_limits.redis.asyncio.Hierarchy`): ``settle`` and ``cancel`` are
    coroutines."""

    __slots__ = ()

    async def settle(self, actual_tokens: int, actual_spend: Optional[int] = None) -> bool:  # type: ignore[override]
        tokens = self._amount("actual_tokens", actual_tokens)
        spend = self.spend_estimate if actual_spend is None else self._amount("actual_spend", actual_spend)
        if not self._take():
            return False
        return bool(
            await self._owner._settle(
                self.path, 0, tokens - self.estimate, spend - self.spend_estimate, self._charged_at, self._leases
            )
        )

    async def cancel(self) -> bool:  # type: ignore[override]
        if not self._take():
            return False
        return bool(
            await self._owner._settle(
                self.path, -1, -self.estimate, -self.spend_estimate, self._charged_at, self._leases
            )
        )


class Hierarchy(_core.Hierarchy):
    """Quotas at every level of a path (org > team > key, any depth), charged all or
    nothing.

    ``levels`` lists the levels from the top as ``(name, quotas)`` pairs; ``quotas`` is
    a dict of ``requests``, ``tokens``, ``daily_tokens`` (rates such as ``"100/minute"``;
    ``daily_tokens`` also an int of tokens per day), ``spend`` (dollars, such as
    ``"25.00/day"``, counted in micro-dollars) and ``concurrency`` (calls in flight), or a
    rate alone for requests. Each rate is a token bucket whose burst is its count. A path
    names one node per level: ``("acme", "search", "sk-1")`` is the key ``sk-1`` of the
    team ``search`` of the org ``acme`` (``("other", "search", ...)`` is another team).

    - ``hit(path, cost=1)`` charges ``cost`` requests at every level (token and spend
      quotas are only asked whether the node is in debt); no lease is taken.
    - ``reserve(path, tokens, spend=0)`` charges one request, the estimated tokens and
      spend at every level and takes a lease at every level with a concurrency limit;
      the :class:`HierarchyReservation` settles at the actual amounts.

    Every check is one atomic step across the levels: in this process under the locks of
    every level's nodes taken in one global order (so concurrent calls neither deadlock
    nor overspend); with ``store=`` a :class:`~nexus_limits.SharedMemoryStore` as one
    transaction of the store, for every process of the host. There the leases live in
    the store too: taken in the same transaction as the rate quotas, ended by
    ``settle``/``cancel``, and a lease whose process died ends after ``lease_ttl``
    (which must not pass the store's ``ttl``). The answer says which level refused and
    when each level frees up.

    ``classes={"interactive": 1.0, "batch": 0.7}`` shares every quota of every level
    between priority classes, as :class:`~nexus_limits.Priority` shares one limiter: a
    call of class ``cls`` (``hit(path, cls="batch")``, ``reserve(..., cls=...)``; by
    default ``default_class``, else the class with the smallest share) is admitted only
    if every quota it is charged to keeps the part its class may not use free.
    ``stats()["classes"]`` counts each class's calls.

    ``set_quota(("acme",), tokens="500000/minute")`` gives one node (here the org
    ``acme``) quotas of its own at run time, keeping what it has used (in a
    shared-memory store, for every process, kept in the store until ``clear_quota``);
    ``set_default_quota("team", ...)`` changes a level (in this process; in a
    shared-memory store a level's quotas are fixed when it is built).
    """

    __slots__ = ()

    def __new__(
        cls,
        levels: Iterable[Tuple[str, Union[str, Dict[str, Any]]]],
        *,
        store: Optional[_core.SharedMemoryStore] = None,
        name: Optional[str] = None,
        clock: Optional[ManualClock] = None,
        lease_ttl: Optional[float] = None,
        ttl: Optional[float] = None,
        max_keys: Optional[int] = None,
        shadow: Optional[bool] = None,
        classes: Optional[Dict[str, float]] = None,
        default_class: Optional[str] = None,
    ) -> Hierarchy:
        if not isinstance(levels, (str, bytes, dict)) and hasattr(levels, "__iter__"):
            # One level past the most the native class takes is enough for it to refuse
            # the list; an endless iterable is never read to its end.
            levels = [_level(level) for level in itertools.islice(levels, _MAX_LEVELS + 1)]
        return super().__new__(
            cls, levels, store, name, clock, lease_ttl, ttl, max_keys, shadow, classes, default_class
        )

    def hit(self, path: Path, cost: int = 1, *, cls: Optional[str] = None) -> HierarchyDecision:
        """Decide ``cost`` requests at every level of ``path``; charge all or none.
        ``cls``: the call's priority class (with ``classes=``)."""
        return HierarchyDecision(self, path, self._check(path, cost, 0, 0, True, cls))

    def try_acquire(self, path: Path, cost: int = 1, *, cls: Optional[str] = None) -> bool:
        """``hit(path, cost).allowed``."""
        return self._try(path, cost, cls)

    def peek(
        self, path: Path, cost: int = 1, *, tokens: int = 0, spend: int = 0, cls: Optional[str] = None
    ) -> HierarchyDecision:
        """What a call of ``cost`` requests, ``tokens`` and ``spend`` would get now
        (leases included), charging nothing."""
        return HierarchyDecision(self, path, self._check(path, cost, tokens, spend, False, cls))

    def reserve(
        self, path: Path, tokens: int = 0, *, spend: int = 0, cls: Optional[str] = None
    ) -> HierarchyReservation:
        """Reserve one request, ``tokens`` and ``spend`` at every level of ``path``, with
        a lease at every level that has a concurrency limit; see
        :class:`HierarchyReservation`."""
        return HierarchyReservation(self, path, tokens, spend, self._reserve(path, 1, tokens, spend, cls))

    def set_quota(
        self,
        node: Path,
        requests: Any = None,
        tokens: Any = None,
        daily_tokens: Any = None,
        spend: Any = None,
        concurrency: Optional[int] = None,
    ) -> None:
        """Give one node (its path from the top: ``("acme",)`` is the org acme) quotas of
        its own, keeping what it has used: ``requests``, ``tokens``, ``daily_tokens``
        (rates), ``spend`` (dollars, ``"10.00/day"``) and ``concurrency``, each of a quota
        its level has; the others stay."""
        super().set_quota(node, requests, tokens, daily_tokens, _spend(spend), concurrency)

    def set_default_quota(
        self,
        level: str,
        requests: Any = None,
        tokens: Any = None,
        daily_tokens: Any = None,
        spend: Any = None,
        concurrency: Optional[int] = None,
    ) -> None:
        """Change the quotas of every node of ``level`` (nodes with their own keep theirs),
        keeping what each has used; as :meth:`set_quota` takes them."""
        super().set_default_quota(level, requests, tokens, daily_tokens, _spend(spend), concurrency)

    def acquire(
        self, path: Path, cost: int = 1, timeout: Optional[float] = None, *, cls: Optional[str] = None
    ) -> HierarchyDecision:
        """Block until ``cost`` requests are admitted at every level (sleeping exactly the
        ``retry_after`` of each refusal). Raises :class:`~nexus_limits.RateLimitExceeded`
        at once when the wait would pass ``timeout`` or can never end."""
        return _wait.acquire(lambda p, c: self.hit(p, c, cls=cls), self.clock, path, cost, timeout)  # type: ignore[arg-type, return-value]

    async def acquire_async(
        self, path: Path, cost: int = 1, timeout: Optional[float] = None, *, cls: Optional[str] = None
    ) -> HierarchyDecision:
        """``acquire`` for asyncio: waits with ``asyncio.sleep``, never blocking the loop."""
        return await _wait.acquire_async(lambda p, c: self.hit(p, c, cls=cls), self.clock, path, cost, timeout)  # type: ignore[arg-type, return-value]

    def __repr__(self) -> str:
        parts = []
        for level in self.levels:
            quotas = ", ".join(f"{k}={v if isinstance(v, int) else str(v)!r}" for k, v in self.quotas(level).items())
            parts.append(f"({level!r}: {quotas})")
        store = f", store={self.store_path!r}" if self.store_path else ""
        return f"Hierarchy([{', '.join(parts)}]{store})"
