"""AFT kernels (docs/spec.md §4): y_t = σ(q_t) ⊙ r_t, r_t = Σ_{t'∈S(t)} e^(s_tt' − lse_t) v_t',
s_tt' = k_t' + w_tt'.

State is float32 whatever the inputs' dtype. Three kinds of programs:
- scans (AFT-simple; the unbiased keys beyond AFT-local's and AFT-conv's windows): a running log-sum-exp
  lse_t = log Σ_{t'≤t} e^(k_t') (a per-row running maximum, so no row's keys underflow however far below
  the sequence maximum they lie) and r_t by the stable recurrence r_t = e^(lse_{t−1} − lse_t) r_{t−1} +
  e^(k_t − lse_t) v_t, both as associative scans over time blocks, forwards or backwards in time. Their
  backward runs the adjoint recurrence the other way.
- bands (AFT-local, AFT-conv): each row starts from the scans' (lse, r) of the keys beyond its window,
  then folds in the window's biased keys offset by offset under an online joint maximum.
- tiles (AFT-full): (rows × keys × channels) tiles under an online joint maximum per (row, channel).
Programs take a block of channels within one head: AFT-conv's keys and biases are per head.

One module per op, named as the op and its mixer are: ``simple`` (AFT-simple), ``local`` (AFT-local's
band, which AFT-conv's 1-D form shares: the paper's AFT-conv is AFT-local with a per-head kernel as its
bias), ``full`` (AFT-full); ``scan`` (prefix and suffix scans) and ``common`` hold what they share.
"""

from __future__ import annotations

import warnings
from typing import Any

from .full import aft_full
from .local import aft_local
from .simple import aft_simple

__all__ = ["aft_full", "aft_local", "aft_simple"]


def __getattr__(name: str) -> Any:
    if name == "aft_banded":  # its name until AFT-local's kernel was named as AFT-local is
        warnings.warn("aft_banded is deprecated; use aft_local", DeprecationWarning, stacklevel=2)
        return aft_local
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
