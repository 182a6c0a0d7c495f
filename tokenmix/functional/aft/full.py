"""AFT-full: pairwise position biases w (N_max, N_max), as matmuls over blocks of rows."""

from __future__ import annotations

import torch

from ...backend import use_kernel
from ...core.checks import (
    check_flag,
    check_float_tensor,
    check_same_dtype_device,
    compute_dtype,
    empty_output,
)
from ...core.excluded import causal_finite, finite_at_padding, real_only, reinstate
from ...core.packing import Packing
from . import exact
from .common import (
    check_inputs,
    check_table,
    finish,
    masked_keys,
    needs_grad,
    packable_aft,
    sees_a_key,
    segment_starts,
)
from .exact import Bias, finite_shift


@packable_aft("aft_full")
def aft_full(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    packing: Packing | None = None,
) -> torch.Tensor:
    """AFT-full: ``y_t = σ(q_t) ⊙ Σ exp(k_t' + w_{t,t'}) ⊙ v_t' / Σ exp(k_t' + w_{t,t'})`` over t' ∈ S(t).

    Computed as matmuls of exp(w − max_row w) with exp(k − max k) ⊙ v and exp(k − max k) over blocks of
    rows (memory O(rows·N + N·D), never (B, N, N, D)); underflowed entries are recomputed exactly.

    Args:
        q, k, v: (B, N, D). w: (N_max, N_max) pairwise position biases, N ≤ N_max; its top-left N×N
            block is used. causal: t sees t' ≤ t. attention_mask: (B, N), True/1 = real token.
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, N, D) in the inputs' dtype.
    """
    mask = check_inputs(q, k, v, attention_mask)
    causal = check_flag("causal", causal)
    check_float_tensor("w", w, "(N_max, N_max)")
    check_same_dtype_device(q=q, w=w)
    check_table(w, q.shape[1] if packing is None else packing.longest)
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v, w)
    q, k, v = finite_at_padding(q, mask, 1), real_only(k, mask, 1), real_only(v, mask, 1)
    if not causal:
        return _aft_full(q, k, v, w, mask, False, packing)
    # The row blocks multiply future keys and values by 0: compute with finite ones, then mark the
    # entries (row, channel) whose own terms are not.
    k, v, seen = causal_finite(k, v, 1, key_channels=True, starts=segment_starts(packing))
    return reinstate(_aft_full(q, k, v, w, mask, True, packing), seen)


def _aft_full(q, k, v, w, mask, causal: bool, packing: Packing | None = None) -> torch.Tensor:
    """aft_full on checked inputs (see there); a packed row goes through the kernel."""
    batch, seq_len, _ = q.shape
    if packing is not None or use_kernel("aft_full", q, atomics=needs_grad(q, k, v, w)):
        from ...kernels.aft import aft_full as kernel

        return kernel(q, k, v, w, mask, bool(causal), None if packing is None else packing.bounds)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, w = q.to(dtype), k.to(dtype), v.to(dtype), w[:seq_len, :seq_len].to(dtype)
    keys = masked_keys(k, mask)
    rows = max(1, min(seq_len, exact.BLOCK_ELEMENTS // max(1, batch * seq_len)))
    positions = torch.arange(seq_len, device=q.device)
    blocks = []
    for start in range(0, seq_len, rows):
        end = min(seq_len, start + rows)
        key_end = end if causal else seq_len
        if causal or not blocks:  # causal blocks see a growing prefix: its own key maximum
            stacked = stacked_terms(keys[:, :key_end], v[:, :key_end])
        key_mask = None if mask is None else mask[:, :key_end]
        bias = w[start:end, :key_end]
        blocks.append(row_sums(bias, stacked, key_mask, positions[start:end] if causal else None))
    num, den = torch.cat(blocks, 1).chunk(2, dim=-1)
    sees = sees_a_key(mask, batch, seq_len, causal, q.device)

    return finish(q, num, den, sees, keys, v, Bias("table", (w,)), causal).to(out_dtype)


def stacked_terms(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[exp(k − max k) ⊙ v, exp(k − max k)] (B, L, 2D), the maximum per channel over the L keys (−inf at
    padding): numerator and denominator of every row in one matmul."""
    exp_keys = torch.exp(keys - finite_shift(keys.amax(1, keepdim=True)))
    return torch.cat((exp_keys * values, exp_keys), dim=-1)


def row_sums(
    bias: torch.Tensor, stacked: torch.Tensor, key_mask: torch.Tensor | None, rows_at: torch.Tensor | None
) -> torch.Tensor:
    """(B, T, 2D): exp(w − max_row w) @ ``stacked`` for T rows of biases ``bias`` (T, L) over the L keys
    of ``stacked`` (``stacked_terms``), padded keys (``key_mask`` (B, L) False) and, when ``rows_at`` (T,)
    gives the rows' positions, keys after a row's own selected away."""
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask[:, None, :], float("-inf"))
    if rows_at is not None:
        later = rows_at[:, None] < torch.arange(bias.shape[-1], device=bias.device)
        bias = bias.masked_fill(later, float("-inf"))
    exp_bias = torch.exp(bias - finite_shift(bias.amax(-1, keepdim=True)))  # (B or 1, rows, keys)
    return torch.matmul(exp_bias, stacked)
