"""The LLM middleware's view of a hierarchy: a key's call charged at org > team > key
in one :class:`nexus_limits.Hierarchy` step, with the request's priority class.

The LLM middleware (:class:`nexus_limits.adapters.llm.LLMLimitMiddleware`) speaks to a
TokenLimiter: ``reserve(key, tokens)`` and ``peek(key)``, whose answer has ``allowed``,
``decision``, the ``requests``/``tokens``/``daily_tokens``/``concurrency`` decisions,
``headers()``, ``settle(tokens)`` and ``cancel()``; and to a SpendLimiter:
``reserve(key, model, input_tokens, output_tokens)``, ``cost(model, usage)``.
:class:`TreeLimiter` and :class:`TreeSpend` give it those interfaces over a Hierarchy:
they map the key to its path (a :class:`Route`), and take the request's class from
:data:`REQUEST_CLASS`, which the gateway sets for each request before calling the
middleware (a context variable: each request's task sees its own).

A route lists the quotas of its path that were configured: the others (a node with
no quota of a kind its level has, see :mod:`.teams`) are left out of the headers and
of the refusal's words.
"""

from __future__ import annotations

import inspect
import math
from contextvars import ContextVar
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from ..base import Key

if TYPE_CHECKING:
    from .teams import TeamTree

__all__ = ["REQUEST_CLASS", "Route", "TreeLimiter", "TreeReservation", "TreeSpend", "TreeSpendReservation"]

# The priority class of the request being served (None: the hierarchy's default).
REQUEST_CLASS: ContextVar[Optional[str]] = ContextVar("nexus_limits_gateway_class", default=None)
# The answer of the last refusal in this request, for the words of the 429 (see TreeLimiter.requests).
_REFUSED: ContextVar[Optional[TreeReservation]] = ContextVar("nexus_limits_gateway_refused", default=None)


class KeyRemoved(LookupError):
    """A key a reload removed while one of its requests was under way (its body still
    arriving): it is looked up when the call is reserved, before any answer, and the
    gateway answers 401 as it would the key's next request. (Not a KeyError: the LLM
    middleware reads a KeyError from a spend reservation as an unknown model.)"""


class Route:
    """Where one key's calls are charged: its path in the hierarchy, the quotas of that
    path that are real (``"team.tokens"``...) and their rates as configured, for words."""

    __slots__ = ("names", "path", "rates")

    def __init__(self, path: Tuple[Key, ...], rates: Dict[str, str]) -> None:
        self.path = path
        self.rates = rates
        self.names: FrozenSet[str] = frozenset(rates)


class TreeReservation:
    """A :class:`~nexus_limits.HierarchyReservation` (or a peek's
    :class:`~nexus_limits.HierarchyDecision`) seen as a TokenLimiter reservation: the
    decision of each unit is the one of the level that refused it (else the tightest)."""

    __slots__ = ("estimate", "outcome", "route")

    def __init__(self, outcome: Any, route: Route, estimate: int) -> None:
        self.outcome = outcome
        self.route = route
        self.estimate = estimate

    @property
    def allowed(self) -> bool:
        return bool(self.outcome.allowed)

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def decision(self) -> Any:
        return self.outcome.decision

    @property
    def retry_after(self) -> float:
        return float(self.outcome.retry_after)

    @property
    def policy(self) -> Optional[str]:
        """The refusing quota as ``"team.tokens"`` (None when admitted)."""
        return self.outcome.policy if not self.allowed else None

    def _pick(self, decisions: List[Tuple[str, Any]]) -> Optional[Tuple[str, Any]]:
        mine = [(n, d) for n, d in decisions if n in self.route.names]
        if not mine:
            return None
        refused = [(n, d) for n, d in mine if not d.allowed]
        if refused:
            return max(refused, key=lambda e: (e[0] == self.outcome.policy, e[1].retry_after))
        return min(mine, key=lambda e: (e[1].remaining, -e[1].retry_after))

    def unit(self, unit: str) -> Optional[Tuple[str, Any]]:
        """``(policy, Decision)`` for one unit: the refusing level's, else the tightest."""
        if unit == "concurrency":
            return self._pick([(f"{level}.concurrency", d) for level, d in self.outcome.concurrency.items()])
        suffix = f".{unit}"
        return self._pick([(n, d) for n, d in self.outcome.quotas.items() if n.endswith(suffix)])

    @property
    def requests(self) -> Any:
        found = self.unit("requests")
        return found[1] if found else None

    @property
    def tokens(self) -> Any:
        found = self.unit("tokens")
        return found[1] if found else None

    @property
    def daily_tokens(self) -> Any:
        found = self.unit("daily_tokens")
        return found[1] if found else None

    @property
    def concurrency(self) -> Any:
        found = self.unit("concurrency")
        return found[1] if found else None

    def describe(self, unit: str) -> Optional[str]:
        """The limit that decided ``unit`` for this call, in words: ``"200000/minute of
        team search"`` (None when no level of the path has that kind of quota)."""
        found = self.unit(unit)
        if found is None:
            return None
        policy = found[0]
        rate = self.route.rates.get(policy, "")
        return f"{rate} of {_describe(policy, self.route)}".strip()

    def headers(self) -> Dict[str, str]:
        """The hierarchy's headers without the quotas no node was given: every real
        quota of the path as ``"level.quota"`` in ``RateLimit-Policy``/``RateLimit``,
        the refusing one first."""
        out: Dict[str, str] = dict(self.outcome.headers())
        for name in ("RateLimit-Policy", "RateLimit"):
            if name in out:
                kept = [e for e in out[name].split(", ") if e.split(";", 1)[0].strip('"') in self.route.names]
                if kept:
                    out[name] = ", ".join(kept)
                else:
                    del out[name]
        for unit in ("requests", "tokens"):
            if not any(n.endswith(f".{unit}") for n in self.route.names):
                for part in ("limit", "remaining", "reset"):
                    out.pop(f"x-ratelimit-{part}-{unit}", None)
        if not self.allowed and self.outcome.policy:
            out["x-nexus-limit-policy"] = self.outcome.policy
        return out

    def settle(self, actual_tokens: int) -> Any:
        return self.outcome.settle(actual_tokens)

    def cancel(self) -> Any:
        return self.outcome.cancel()

    def __repr__(self) -> str:
        return f"TreeReservation({self.outcome!r})"


class TreeLimiter:
    """The TokenLimiter interface the LLM middleware uses, over a Hierarchy.

    ``route_of(key)`` gives the key's :class:`Route` (the gateway sends a limiter only
    the keys it routes; another is a KeyError). Each call uses the class in
    :data:`REQUEST_CLASS`. A refusal's words name the limit that refused
    (:meth:`TreeReservation.describe`)."""

    def __init__(
        self,
        hierarchy: Any,
        route_of: Callable[[Key], Optional[Route]],
    ) -> None:
        self.hierarchy = hierarchy
        self.route_of = route_of
        # The synchronous twin that changes a Redis hierarchy's quotas (None in-process).
        self.admin: Any = None
        # The workers' SharedMemoryStore the hierarchy lives in (None: this process or Redis).
        self.store: Any = None

    def _route(self, key: Key) -> Route:
        route = self.route_of(key)
        if route is None:
            # (the key itself is a credential: never in a message that may be logged)
            raise KeyRemoved("the key is not in the hierarchy (a reload removed it?)")
        return route

    def _answer(self, outcome: Any, route: Route, estimate: int) -> TreeReservation:
        answer = TreeReservation(outcome, route, estimate)
        if not answer.allowed:
            _REFUSED.set(answer)
        return answer

    async def _later(self, outcome: Any, route: Route, estimate: int) -> TreeReservation:
        return self._answer(await outcome, route, estimate)

    def reserve(self, key: Key, tokens: int) -> Any:
        """Reserve one request and ``tokens`` at every level of the key's path, with a
        lease at each level that has a concurrency limit: a :class:`TreeReservation`
        (a coroutine giving one on Redis)."""
        route = self._route(key)
        outcome = self.hierarchy.reserve(route.path, tokens, cls=REQUEST_CLASS.get())
        if inspect.isawaitable(outcome):
            return self._later(outcome, route, tokens)
        return self._answer(outcome, route, tokens)

    def peek(self, key: Key) -> Any:
        """Whether a request would be admitted now at every level (charging nothing)."""
        route = self._route(key)
        outcome = self.hierarchy.peek(route.path, cls=REQUEST_CLASS.get())
        if inspect.isawaitable(outcome):
            return self._later(outcome, route, 0)
        return self._answer(outcome, route, 0)

    # The middleware words a refusal with ``limiter.<unit>``: with a hierarchy the limit
    # that refused depends on the call, so these name the one that refused the call
    # being answered in this request (the context variable is per request).
    def _words(self, unit: str) -> Optional[str]:
        refused = _REFUSED.get()
        return None if refused is None else refused.describe(unit)

    @property
    def requests(self) -> Optional[str]:
        return self._words("requests")

    @property
    def tokens(self) -> Optional[str]:
        return self._words("tokens")

    @property
    def daily_tokens(self) -> Optional[str]:
        return self._words("daily_tokens")

    async def inspect(self, key: Key) -> Optional[Dict[str, Any]]:
        """Each level's state for the key's path, ``{"org": {...}, "team": ..., "key": ...}``,
        the quotas no node was given left out."""
        route = self.route_of(key)
        if route is None:
            return None
        out: Dict[str, Any] = {}
        path = route.path
        for depth, level in enumerate(self.hierarchy.levels, 1):
            state = self.hierarchy.inspect(path[:depth])
            if inspect.isawaitable(state):
                state = await state
            out[level] = {
                "node": path[depth - 1],
                **{
                    unit: value for unit, value in state.items() if unit != "level" and f"{level}.{unit}" in route.names
                },
            }
        return out

    def stats(self) -> Dict[str, Any]:
        """The hierarchy's counters as the metrics read them: totals, each level's quota
        as a part ``"org.tokens"``, each class as ``"class.batch"``."""
        stats = self.hierarchy.stats()
        out: Dict[str, Any] = {k: v for k, v in stats.items() if not isinstance(v, dict)}
        for level, units in stats.get("levels", {}).items():
            for unit, numbers in units.items():
                out[f"{level}.{unit}"] = numbers
        for cls, numbers in stats.get("classes", {}).items():
            out[f"class.{cls}"] = {k: v for k, v in numbers.items() if k != "share"}
        return out


def _describe(policy: str, route: Route) -> str:
    level = policy.split(".", 1)[0]
    if level in ("org", "team"):
        name: str = str(route.path[0 if level == "org" else 1])
        return f"{level} {name}"
    return "this key"


def _dollars(micros: int) -> str:
    """Micro-dollars as dollars: "0.01", or every digit needed ("0.000550")."""
    text = f"{Decimal(micros) / 1_000_000:.6f}"
    return f"{micros / 1_000_000:.2f}" if micros % 10_000 == 0 else text.rstrip("0")


class TreeSpendReservation:
    """A dollar reservation at every level of a key's path, as the LLM middleware
    finishes a SpendLimiter's: ``settle(usage or micros)``, ``cancel()``, ``headers()``
    (``x-budget-*`` of the tightest level) and ``detail()`` naming the level that refused."""

    __slots__ = ("_owner", "model", "outcome", "route")

    def __init__(self, owner: TreeSpend, outcome: Any, route: Route, model: Optional[str]) -> None:
        self._owner = owner
        self.outcome = outcome
        self.route = route
        self.model = model

    @property
    def allowed(self) -> bool:
        return bool(self.outcome.allowed)

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def estimate_micros(self) -> int:
        return int(self.outcome.spend_estimate)

    @property
    def retry_after(self) -> float:
        return float(self.outcome.retry_after)

    def _tightest(self) -> Optional[Tuple[str, Any]]:
        return TreeReservation(self.outcome, self.route, 0).unit("spend")

    @property
    def decision(self) -> Any:
        found = self._tightest()
        return found[1] if found else None

    def settle(self, actual: Any) -> Any:
        micros = actual if isinstance(actual, int) else self._owner.cost(self.model, actual)
        return self.outcome.settle(0, actual_spend=micros)

    def cancel(self) -> Any:
        return self.outcome.cancel()

    def headers(self) -> Dict[str, str]:
        from ..budget import go_duration

        out: Dict[str, str] = {}
        d = self.decision
        if d is not None:
            out["x-budget-limit"] = _dollars(d.limit)
            out["x-budget-remaining"] = _dollars(d.remaining)
            out["x-budget-reset"] = go_duration(d.reset_after)
        if not self.allowed:
            found = self._tightest()
            if found is not None:
                out["x-nexus-limit-policy"] = found[0]
            if self.retry_after != float("inf"):
                out["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        return out

    def detail(self) -> str:
        found = self._tightest()
        if found is None:
            return "spend budget exhausted"
        policy = found[0]
        budget = f"{self.route.rates.get(policy, '')} of {_describe(policy, self.route)}"
        if math.isinf(self.retry_after):
            return (
                f"spend budget {budget}: the estimated cost ${_dollars(self.estimate_micros)} is above the whole budget"
            )
        return f"spend budget {budget} exhausted; enough is restored in {math.ceil(self.retry_after)} s"


class TreeSpend:
    """The SpendLimiter interface the LLM middleware uses, over the dollar budgets of a
    key's org, team and tier (a :class:`TeamTree` of spend): ``reserve(key, model,
    input_tokens, output_tokens)`` prices the call (``prices``) and reserves its cost at
    every level, all or nothing."""

    def __init__(self, tree: TeamTree, prices: Any) -> None:
        self.tree = tree
        self.prices = prices

    def estimate(
        self, model: Optional[str], input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> int:
        return int(self.prices.get(model).micros(input_tokens, output_tokens, cached_input_tokens))

    def cost(self, model: Optional[str], usage: Any) -> int:
        return int(self.prices.cost(model, usage))

    def reserve(self, key: Key, model: Optional[str], input_tokens: int, output_tokens: int) -> Any:
        # Priced first: an unknown model (KeyError) is answered before anything is charged.
        micros = self.estimate(model, input_tokens, output_tokens)
        route = self.tree.routes.get(key)
        if route is None:
            raise KeyRemoved("the key is not in a team (a reload removed it?)")
        outcome = self.tree.hierarchy.reserve(route.path, 0, spend=micros)
        if inspect.isawaitable(outcome):

            async def later() -> TreeSpendReservation:
                return TreeSpendReservation(self, await outcome, route, model)

            return later()
        return TreeSpendReservation(self, outcome, route, model)

    def stats(self) -> Dict[str, Any]:
        return self.tree.limiter.stats()
