"""Learned output estimates: a streaming p95 of output tokens per key and model."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from ..tokens import OutputEstimate

__all__ = ["LearnedOutputEstimate", "P2Quantile"]


class P2Quantile:
    """The P² algorithm (Jain & Chlamtac, 1985): one quantile of a stream in five
    numbers, no samples kept."""

    __slots__ = ("count", "dn", "heights", "n", "np", "p")

    def __init__(self, p: float) -> None:
        if not 0 < p < 1:
            raise ValueError(f"the quantile must be in (0, 1), got {p!r}")
        self.p = p
        self.count = 0
        self.heights: List[float] = []
        self.n = [0, 1, 2, 3, 4]
        self.np = [0.0, 2 * p, 4 * p, 2 + 2 * p, 4.0]
        self.dn = [0.0, p / 2, p, (1 + p) / 2, 1.0]

    def add(self, x: float) -> None:
        self.count += 1
        h = self.heights
        if len(h) < 5:
            h.append(float(x))
            h.sort()
            return
        if x < h[0]:
            h[0] = x
            k = 0
        elif x >= h[4]:
            h[4] = max(h[4], x)
            k = 3
        else:
            k = next(i for i in range(4) if h[i] <= x < h[i + 1])
        for i in range(k + 1, 5):
            self.n[i] += 1
        for i in range(5):
            self.np[i] += self.dn[i]
        for i in (1, 2, 3):
            d = self.np[i] - self.n[i]
            if (d >= 1 and self.n[i + 1] - self.n[i] > 1) or (d <= -1 and self.n[i - 1] - self.n[i] < -1):
                s = 1 if d > 0 else -1
                q = h[i] + s / (self.n[i + 1] - self.n[i - 1]) * (
                    (self.n[i] - self.n[i - 1] + s) * (h[i + 1] - h[i]) / (self.n[i + 1] - self.n[i])
                    + (self.n[i + 1] - self.n[i] - s) * (h[i] - h[i - 1]) / (self.n[i] - self.n[i - 1])
                )
                if not h[i - 1] < q < h[i + 1]:
                    q = h[i] + s * (h[i + s] - h[i]) / (self.n[i + s] - self.n[i])
                h[i] = q
                self.n[i] += s

    def value(self) -> Optional[float]:
        if not self.heights:
            return None
        if len(self.heights) < 5:
            ordered = sorted(self.heights)
            return ordered[min(len(ordered) - 1, int(self.p * len(ordered)))]
        return self.heights[2]


def _model_name(model: Any) -> str:
    """The name a model's sketches are kept under: lower-case, long names pooled."""
    if not isinstance(model, str):
        return ""
    return model.lower() if len(model) <= 100 else "(long model names)"


class LearnedOutputEstimate(OutputEstimate):
    """Output tokens to reserve: the request's cap when it has one; else the learned
    ``quantile`` (p95 by default) of this key's outputs on this model, once
    ``min_samples`` were seen; else the model's across all keys; else the fixed default.

    Memory is bounded: at most ``max_series`` (key, model) sketches of five numbers
    each are kept, and as many per-model sketches, the least recently used dropped
    first; model names longer than 100 characters are all one model (a client chooses
    the name)."""

    def __init__(
        self,
        default: int = 1024,
        per_model: Optional[Dict[str, int]] = None,
        quantile: float = 0.95,
        min_samples: int = 20,
        max_series: int = 10_000,
    ) -> None:
        super().__init__(default, per_model)
        P2Quantile(quantile)  # validates
        if min_samples < 1 or max_series < 1:
            raise ValueError("min_samples and max_series must be at least 1")
        self.quantile = quantile
        self.min_samples = min_samples
        self.max_series = max_series
        self._series: OrderedDict[Tuple[Any, str], P2Quantile] = OrderedDict()
        self._models: OrderedDict[str, P2Quantile] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, key: Any, model: Optional[str], output_tokens: int) -> None:
        """Record the real output tokens of a settled call."""
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
            raise ValueError(f"output_tokens must be a non-negative int, got {output_tokens!r}")
        m = _model_name(model)
        with self._lock:
            series = self._series.pop((key, m), None) or P2Quantile(self.quantile)
            series.add(output_tokens)
            self._series[(key, m)] = series
            while len(self._series) > self.max_series:
                self._series.popitem(last=False)
            overall = self._models.pop(m, None) or P2Quantile(self.quantile)
            overall.add(output_tokens)
            self._models[m] = overall
            while len(self._models) > self.max_series:
                self._models.popitem(last=False)

    def learned(self, key: Any, model: Optional[str]) -> Optional[int]:
        m = _model_name(model)
        with self._lock:
            for sketch in (self._series.get((key, m)), self._models.get(m)):
                if sketch is not None and sketch.count >= self.min_samples:
                    value = sketch.value()
                    return None if value is None else math.ceil(value)
        return None

    def for_key(self, body: Dict[str, Any], key: Any) -> int:
        for cap in self.CAPS:
            if body.get(cap) is not None:
                return super().__call__(body)
        learned = self.learned(key, body.get("model"))
        return learned if learned is not None else super().__call__(body)

    def __len__(self) -> int:
        return len(self._series)
