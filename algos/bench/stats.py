"""Confidence intervals and paired tests over seeds, for the benchmark tables.

Conventions: ``values`` are one number per seed (NaN / None dropped); intervals are Student-t
intervals of the mean, ``mean +- t_{n-1, (1+level)/2} * s / sqrt(n)`` with the sample standard
deviation ``s`` (ddof 1). A paired comparison takes the per-seed differences ``a_i - b_i`` of two
methods run with the same seeds (seed i of both methods draws the same prompts, and their
pretrained evaluations are identical) and reports their mean, its interval and the two-sided
p-value of the paired t-test (``scipy.stats.ttest_rel``). With fewer than two finite pairs the
interval and p-value are NaN: one seed says nothing about confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Interval", "PairedTest", "mean_interval", "paired_test"]


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the half-width of its ``level`` confidence interval."""

    mean: float
    half_width: float
    n: int
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def __str__(self) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a"
        if not math.isfinite(self.half_width):
            return f"{_fmt(self.mean)} (n={self.n})"
        return f"{_fmt(self.mean)} ± {_fmt(self.half_width, 2)}"

    def to_json(self) -> dict[str, float | int | None]:
        return {"mean": _finite(self.mean), "ci_half_width": _finite(self.half_width), "n": self.n, "level": self.level}


@dataclass(frozen=True)
class PairedTest:
    """Per-seed differences ``a - b``: their mean interval and the paired t-test's two-sided p-value."""

    difference: Interval
    p_value: float

    def __str__(self) -> str:
        if self.difference.n == 0:
            return "n/a"
        p = "n/a" if not math.isfinite(self.p_value) else (f"{self.p_value:.2g}" if self.p_value >= 1e-3 else "<0.001")
        return f"{self.difference} (p={p})"

    def to_json(self) -> dict[str, object]:
        return {"difference": self.difference.to_json(), "p_value": _finite(self.p_value)}


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _fmt(value: float, digits: int = 3) -> str:
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}g}"


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=float)


def mean_interval(values: Sequence[float | None], level: float = 0.95) -> Interval:
    """Student-t interval of the mean of the finite ``values`` (half-width NaN for fewer than 2)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")
    from scipy import stats

    array = _clean(values)
    n = len(array)
    if n == 0:
        return Interval(math.nan, math.nan, 0, level)
    if n == 1:
        return Interval(float(array[0]), math.nan, 1, level)
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * array.std(ddof=1) / math.sqrt(n))
    return Interval(float(array.mean()), half, n, level)


def paired_test(a: Sequence[float | None], b: Sequence[float | None], level: float = 0.95) -> PairedTest:
    """Paired comparison of ``a`` and ``b`` (same length, element i = seed i of each method).

    Pairs where either value is missing or non-finite are dropped. When every difference is
    identical (up to rounding) the t statistic is undefined: the p-value is 1 for a zero difference, 0 otherwise.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_test needs one value per seed for both methods; got {len(a)} and {len(b)}")
    from scipy import stats

    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    differences = [x - y for x, y in pairs]
    interval = mean_interval(differences, level)
    if len(pairs) < 2:
        return PairedTest(interval, math.nan)
    # equal differences up to rounding (identical runs, or a constant offset): t is undefined
    if np.ptp(differences) <= 1e-12 * max(1.0, float(np.max(np.abs(differences)))):
        return PairedTest(interval, 1.0 if abs(float(np.mean(differences))) <= 1e-12 else 0.0)
    result = stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
    return PairedTest(interval, float(result.pvalue))
