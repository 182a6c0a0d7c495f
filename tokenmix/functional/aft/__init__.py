"""Attention Free Transformer ops (Zhai et al. 2021; docs/spec.md §4): AFT-full, AFT-simple, AFT-local and
AFT-conv (1-D and 2-D).

    y_t = σ(q_t) ⊙ Σ_{t'∈S(t)} exp(k_t' + w_{t,t'}) ⊙ v_t' / Σ_{t'∈S(t)} exp(k_t' + w_{t,t'})

S(t) = the real t' (and t' ≤ t when causal). q, k, v: (B, N, D).

Numerics: the sums are computed with matmuls (or a prefix scan) after subtracting a separate maximum of
k (per channel) and of w (per row), which cannot overflow. Separate maxima can underflow, though: when
the keys that dominate k and the positions that dominate row t of w differ, every product
exp(k − max k)·exp(w − max w) may round to 0 and the ratio to 0/0. Every (batch, row, channel) whose
denominator comes out below ``common.TINY`` while it sees a real key is therefore recomputed exactly with the
joint maximum of k_t' + w_{t,t'} over its own terms, as online softmax does. Half-precision inputs are
computed in float32.

One module per algorithm: ``full`` (AFT-full), ``simple`` (AFT-simple), ``local`` (AFT-local and the
windowed core it shares with AFT-conv), ``conv`` (AFT-conv, 1-D and 2-D), ``recurrent`` (continuing from a
decoding state), ``exact`` (the exact recomputation of underflowed denominators); ``common`` holds what
they share.
"""

from .conv import aft_conv
from .full import aft_full
from .local import aft_local, aft_local_lowrank
from .recurrent import AFTSimpleState, AFTWindowState, aft_accumulate, aft_cached, aft_full_cached
from .simple import aft_simple

__all__ = [
    "AFTSimpleState",
    "AFTWindowState",
    "aft_accumulate",
    "aft_cached",
    "aft_conv",
    "aft_full",
    "aft_full_cached",
    "aft_local",
    "aft_local_lowrank",
    "aft_simple",
]
