"""When ``compare`` calls two mixers told apart: Welch's t-test on their seeds' metric, Holm's correction
over every pair of a table, at ``ALPHA``; with fewer than ``MIN_SEEDS`` seeds of either, never.

Welch's test does not assume equal variances (the Welch–Satterthwaite degrees of freedom); its two-sided
p-value is the regularised incomplete beta I_{ν/(ν+t²)}(ν/2, 1/2), evaluated by its continued fraction
(Lentz's method), as numerical libraries do; the tests check it against SciPy where SciPy is installed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

ALPHA = 0.05
MIN_SEEDS = 3  # two seeds estimate a spread too poorly for a test to mean anything
_TINY = 1e-300


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), a, b > 0, x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that ``a`` and ``b`` (two or more values each) share a mean.
    Two samples without spread: 0 if their means differ, 1 if not."""
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    part_a, part_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    error = part_a + part_b
    if error == 0.0:
        return 0.0 if mean_a != mean_b else 1.0
    t = (mean_a - mean_b) / math.sqrt(error)
    freedom = error**2 / (part_a**2 / (len(a) - 1) + part_b**2 / (len(b) - 1))
    return incomplete_beta(freedom / 2.0, 0.5, freedom / (freedom + t * t))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (the family-wise error held at the level over all of them)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def pair_tests(values: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """Every pair of a table (``values``: each mixer's metric over its seeds), in name order:
    ``{"a", "b", "p", "p_holm", "apart"}``; p is None (and nothing apart) below ``MIN_SEEDS`` seeds."""
    pairs = list(combinations(sorted(values), 2))
    enough = all(len(v) >= MIN_SEEDS for v in values.values())
    if not enough:
        return [{"a": a, "b": b, "p": None, "p_holm": None, "apart": False} for a, b in pairs]
    p_values = [welch_p(values[a], values[b]) for a, b in pairs]
    return [
        {"a": a, "b": b, "p": p, "p_holm": adjusted, "apart": adjusted < ALPHA}
        for (a, b), p, adjusted in zip(pairs, p_values, holm(p_values), strict=True)
    ]


__all__ = ["ALPHA", "MIN_SEEDS", "holm", "incomplete_beta", "pair_tests", "welch_p"]
