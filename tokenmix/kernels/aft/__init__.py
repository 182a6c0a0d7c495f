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

One module per algorithm: ``scan`` (prefix and suffix scans), ``simple`` (AFT-simple), ``banded``
(AFT-local, AFT-conv), ``full`` (AFT-full); ``common`` holds what they share.
"""

from .banded import aft_banded
from .full import aft_full
from .simple import aft_simple

__all__ = ["aft_banded", "aft_full", "aft_simple"]
