"""Triton building blocks shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logaddexp(x, y):
    """log(eˣ + eʸ), −inf when both are −inf."""
    top = tl.maximum(x, y)
    u = tl.exp(-tl.abs(tl.where(top == float("-inf"), 0.0, x - y)))
    sum_ = 1.0 + u
    log1p = tl.log(sum_) - ((sum_ - 1.0) - u) / sum_  # log1p(u), accurate for small u
    return tl.where(top == float("-inf"), float("-inf"), top + log1p)


@triton.jit
def linear_combine(decay_1, value_1, decay_2, value_2):
    """Composition of h ← decay·h + value steps, for tl.associative_scan (forward or reverse)."""
    return decay_1 * decay_2, value_1 * decay_2 + value_2


@triton.jit
def last_row(x, rows, BLOCK: tl.constexpr):
    """Row BLOCK − 1 of a (BLOCK, C) tile, as (C,)."""
    return tl.sum(tl.where(rows[:, None] == BLOCK - 1, x, 0.0), 0)


@triton.jit
def exp_difference(x, y):
    """e^(x − y), 0 where x is −inf (also when y is)."""
    return tl.exp(tl.where(x == float("-inf"), float("-inf"), x - y))
