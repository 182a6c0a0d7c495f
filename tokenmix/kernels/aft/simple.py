"""AFT-simple: causal through the scan, bidirectional through one pass of global sums per channel
block; the forward and backward custom ops and the autograd function."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (
    exp_difference,
    int8_mask,
    row_offset,
    sequence_of,
    slice_offset,
)
from .common import (
    aft_channels,
    aft_keys,
    aft_load,
    aft_store,
)
from .scan import aft_scan_bwd_kernel, aft_scan_fwd_kernel, scan_launch


@triton.jit
def aft_simple_global_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, cu_ptr, out_ptr, lse_ptr, ratio_ptr, total_len, dim,
    HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Bidirectional AFT-simple: one online log-sum-exp and r per channel of a sequence (a batch row, or
    a packed segment when VARLEN), then σ(q) ⊙ r at every row."""
    sequence = tl.program_id(1)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    _, channels = aft_channels(tl.program_id(0), dim, dim, BLOCK_D)
    offset = row_offset(batch, origin, total_len, dim)
    q_ptr, k_ptr, v_ptr, out_ptr = q_ptr + offset, k_ptr + offset, v_ptr + offset, out_ptr + offset
    mask_ptr += row_offset(batch, origin, total_len, 1)
    local = tl.arange(0, BLOCK_T)
    top = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_D,), tl.float32)
    weighted = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        keys = aft_keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK)
        new_top = tl.maximum(top, tl.max(keys, 0))
        rescale = exp_difference(top, new_top)
        weights = exp_difference(keys, new_top[None, :])
        values = aft_load(v_ptr, rows, channels, seq_len, dim, 0.0)
        total = total * rescale + tl.sum(weights, 0)
        weighted = weighted * rescale + tl.sum(weights * values, 0)
        top = new_top
    total = tl.where(channels < dim, total, 1.0)  # channels past dim: nothing to divide
    ratio = weighted / total
    tl.store(lse_ptr + slice_offset(sequence, dim, 1) + channels, top + tl.log(total), channels < dim)
    tl.store(ratio_ptr + slice_offset(sequence, dim, 1) + channels, ratio, channels < dim)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        queries = aft_load(q_ptr, rows, channels, seq_len, dim, 0.0)
        aft_store(out_ptr, tl.sigmoid(queries) * ratio[None, :], rows, channels, seq_len, dim)


@triton.jit
def aft_simple_global_bwd_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, cu_ptr, lse_ptr, ratio_ptr, dq_ptr, dk_ptr, dv_ptr, total_len,
    dim, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """With A = Σ_t g_t σ(q_t): dv_t' = e^(k_t' − lse) A, dk_t' = e^(k_t' − lse) A (v_t' − r)."""
    sequence = tl.program_id(1)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    _, channels = aft_channels(tl.program_id(0), dim, dim, BLOCK_D)
    offset = row_offset(batch, origin, total_len, dim)
    grad_ptr, q_ptr, k_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, k_ptr + offset, v_ptr + offset
    dq_ptr, dk_ptr, dv_ptr = dq_ptr + offset, dk_ptr + offset, dv_ptr + offset
    mask_ptr += row_offset(batch, origin, total_len, 1)
    local = tl.arange(0, BLOCK_T)
    lse = tl.load(lse_ptr + slice_offset(sequence, dim, 1) + channels, channels < dim, 0.0)
    ratio = tl.load(ratio_ptr + slice_offset(sequence, dim, 1) + channels, channels < dim, 0.0)
    adjoint_sum = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        queries = aft_load(q_ptr, rows, channels, seq_len, dim, 0.0)
        grad = aft_load(grad_ptr, rows, channels, seq_len, dim, 0.0)
        sigmoid = tl.sigmoid(queries)
        adjoint_sum += tl.sum(grad * sigmoid, 0)
        aft_store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio[None, :], rows, channels, seq_len, dim)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        keys = aft_keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK)
        weights = exp_difference(keys, lse[None, :]) * adjoint_sum[None, :]
        values = aft_load(v_ptr, rows, channels, seq_len, dim, 0.0)
        aft_store(dv_ptr, weights, rows, channels, seq_len, dim)
        aft_store(dk_ptr, weights * (values - ratio[None, :]), rows, channels, seq_len, dim)


@torch.library.custom_op("tokenmix::aft_simple_fwd", mutates_args=())
def aft_simple_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, N, D); key_mask: (B, N) bool or None; cu_seqlens: None, or with B = 1 the bounds
    (S + 1,) of packed segments, each a sequence of its own. Returns the output (B, N, D) in the inputs'
    dtype and, for the backward, lse and r in float32: (B, N, D) when causal, else one row per sequence,
    (B, 1, D) or (S, 1, D)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _, seq_len, dim = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty(_state_shape(q, causal, cu_seqlens), dtype=torch.float32)
    ratio = torch.empty_like(lse)
    grid, blocks, bounds, flags = scan_launch(q, 1, key_mask, cu_seqlens)
    mask = int8_mask(q, key_mask)
    if causal:
        aft_scan_fwd_kernel[grid](
            q, k, v, mask, bounds, out, lse, ratio, seq_len, dim, dim, dim, REVERSE=False, KEY_PER_HEAD=False,
            WRITE_OUT=True, **flags, **blocks,
        )  # fmt: skip
    else:
        aft_simple_global_fwd_kernel[grid](
            q, k, v, mask, bounds, out, lse, ratio, seq_len, dim, **flags, **blocks
        )
    return out, lse, ratio


def _state_shape(q: torch.Tensor, causal: bool, cu_seqlens: torch.Tensor | None) -> tuple[int, int, int]:
    if causal:
        return tuple(q.shape)
    return (q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1, 1, q.shape[2])


@aft_simple_fwd.register_fake
def _(q, k, v, key_mask, causal, cu_seqlens=None):
    state = q.new_empty(_state_shape(q, causal, cu_seqlens), dtype=torch.float32)
    return torch.empty_like(q), state, torch.empty_like(state)


@torch.library.custom_op("tokenmix::aft_simple_bwd", mutates_args=())
def aft_simple_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    lse: torch.Tensor,
    ratio: torch.Tensor,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    _, seq_len, dim = q.shape
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid, blocks, bounds, flags = scan_launch(q, 1, key_mask, cu_seqlens)
    mask = int8_mask(q, key_mask)
    if causal:  # the scan is the whole op: its lse and r are the output rows'
        aft_scan_bwd_kernel[grid](
            grad_out, q, k, v, mask, bounds, lse, lse, ratio, grad_q, grad_k, grad_v, seq_len, dim, dim, dim,
            0, REVERSE=False, KEY_PER_HEAD=False, WHOLE_OP=True, **flags, **blocks,
        )  # fmt: skip
    else:
        aft_simple_global_bwd_kernel[grid](
            grad_out, q, k, v, mask, bounds, lse, ratio, grad_q, grad_k, grad_v, seq_len, dim, **flags,
            **blocks,
        )  # fmt: skip
    return grad_q, grad_k, grad_v


@aft_simple_bwd.register_fake
def _(grad_out, q, k, v, key_mask, lse, ratio, causal, cu_seqlens=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, causal, cu_seqlens = inputs
    _, lse, ratio = output
    ctx.save_for_backward(q, k, v, key_mask, lse, ratio, cu_seqlens)
    ctx.causal = causal


def _backward(ctx, grad_out, grad_lse, grad_ratio):
    q, k, v, key_mask, lse, ratio, cu_seqlens = ctx.saved_tensors
    return (
        *aft_simple_bwd(grad_out, q, k, v, key_mask, lse, ratio, ctx.causal, cu_seqlens),
        None,
        None,
        None,
    )


aft_simple_fwd.register_autograd(_backward, setup_context=_setup_context)


def aft_simple(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    return aft_simple_fwd(q, k, v, key_mask, causal, cu_seqlens)[0]
