"""Model prices and exact cost arithmetic in integer micro-dollars."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from importlib import resources
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

from ..tokens import Usage

__all__ = ["Price", "PriceTable", "UnknownModel", "default_prices"]

MICROS = 1_000_000


class UnknownModel(KeyError):
    """A model with no price and no default price: never priced as zero."""

    def __str__(self) -> str:
        return str(self.args[0])


def _dollars(value: Any, what: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, str, Decimal, Fraction)):
        if isinstance(value, float):
            value = repr(value)
        else:
            raise TypeError(f"{what} must be a number of dollars (str, int or Decimal), got {type(value).__name__}")
    try:
        amount = Fraction(Decimal(value)) if isinstance(value, str) else Fraction(value)
    except (InvalidOperation, ValueError):
        raise ValueError(f"{what} must be a number of dollars, got {value!r}") from None
    if amount < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return amount


class Price(NamedTuple):
    """Dollars per 1,000,000 tokens, kept exact. ``cached_input`` defaults to ``input``
    and ``cache_write`` to ``input``."""

    input: Fraction
    output: Fraction
    cached_input: Fraction
    cache_write: Fraction

    @classmethod
    def of(cls, input: Any, output: Any, cached_input: Any = None, cache_write: Any = None) -> Price:
        i = _dollars(input, "input price")
        return cls(
            i,
            _dollars(output, "output price"),
            i if cached_input is None else _dollars(cached_input, "cached input price"),
            i if cache_write is None else _dollars(cache_write, "cache write price"),
        )

    def micros(
        self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0, cache_write_tokens: int = 0
    ) -> int:
        """The cost in micro-dollars, rounded up (never under-charged). One dollar per
        million tokens is exactly one micro-dollar per token."""
        for name, n in (
            ("input_tokens", input_tokens),
            ("output_tokens", output_tokens),
            ("cached_input_tokens", cached_input_tokens),
            ("cache_write_tokens", cache_write_tokens),
        ):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        if cached_input_tokens + cache_write_tokens > input_tokens:
            raise ValueError(
                "cached_input_tokens + cache_write_tokens cannot exceed input_tokens (which includes them)"
            )
        plain = input_tokens - cached_input_tokens - cache_write_tokens
        total = (
            plain * self.input
            + cached_input_tokens * self.cached_input
            + cache_write_tokens * self.cache_write
            + output_tokens * self.output
        )
        return math.ceil(total)


class PriceTable:
    """Prices by model name: exact names, then the longest matching prefix (so dated
    snapshots such as ``gpt-4o-2024-08-06`` find ``gpt-4o``), then ``default``.

    Unknown models raise :class:`UnknownModel` unless a ``default`` price is given —
    never a silent zero.
    """

    def __init__(
        self,
        prices: Optional[Mapping[str, Union[Price, Mapping[str, Any]]]] = None,
        default: Optional[Union[Price, Mapping[str, Any]]] = None,
    ) -> None:
        self._prices: Dict[str, Price] = {}
        for name, price in (prices or {}).items():
            self.set(name, price)
        self.default = self._price(default, "default") if default is not None else None

    @staticmethod
    def _price(value: Union[Price, Mapping[str, Any]], name: str) -> Price:
        if isinstance(value, Price):
            return value
        if not isinstance(value, Mapping) or "input" not in value or "output" not in value:
            raise ValueError(f"price of {name!r} must have 'input' and 'output' (dollars per 1M tokens)")
        return Price.of(value["input"], value["output"], value.get("cached_input"), value.get("cache_write"))

    def set(self, model: str, price: Union[Price, Mapping[str, Any]]) -> None:
        """Adds or overrides one model's price."""
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        self._prices[model.lower()] = self._price(price, model)

    def get(self, model: Optional[str]) -> Price:
        name = re.sub(r"^(openai|anthropic)/", "", (model or "").strip().lower())
        if name in self._prices:
            return self._prices[name]
        best = max((p for p in self._prices if name.startswith(p)), key=len, default=None)
        if best is not None and name[len(best) : len(best) + 1] in ("-", "@", ":"):
            return self._prices[best]
        if self.default is not None:
            return self.default
        raise UnknownModel(f"no price for model {model!r}; add it (PriceTable.set) or give a default price")

    def cost(self, model: Optional[str], usage: Usage, cache_write_tokens: Optional[int] = None) -> int:
        """The micro-dollar cost of a call's :class:`~nexus_limits.tokens.Usage`: cached
        input priced as cached, input written to the cache (``usage.cache_write_tokens``
        unless ``cache_write_tokens`` is given) as a cache write."""
        written = usage.cache_write_tokens if cache_write_tokens is None else cache_write_tokens
        return self.get(model).micros(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, written)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and model.lower() in self._prices

    def __len__(self) -> int:
        return len(self._prices)


def default_prices(default: Optional[Union[Price, Mapping[str, Any]]] = None) -> PriceTable:
    """The shipped table (``prices.json``: source and date inside), as a new PriceTable
    you may extend or override."""
    doc = json.loads(resources.files(__package__).joinpath("prices.json").read_text())
    return PriceTable(doc["models"], default=default)


def price_source() -> Dict[str, str]:
    doc = json.loads(resources.files(__package__).joinpath("prices.json").read_text())
    return {"source": doc["source"], "taken": doc["taken"], "unit": doc["unit"]}
