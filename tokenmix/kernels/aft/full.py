"""AFT-full: y_td = σ(q_td) Σ_t' e^(w_tt' + k_t'd − lse_td) v_t'd, tiled over (rows, keys, channels)
under an online joint maximum per (row, channel)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (
    block_of,
    exp_difference,
    int8_mask,
    row_offset,
    segment_arguments,
    sequence_of,
)
from .common import (
    aft_finish_rows,
    aft_keys,
    aft_load,
    aft_store,
)


@triton.jit
def _scores(w_ptr, k_ptr, mask_ptr, rows, columns, channels, seq_len, dim, table, CAUSAL, HAS_MASK):
    """(M, N, D) tile of w_{t,t'} + k_{t',d}: −inf for keys outside the sequence, padded, or (causal)
    after the row."""
    keys = aft_keys(k_ptr, mask_ptr, columns, channels, seq_len, dim, HAS_MASK)  # (N, D)
    inside = (rows[:, None] < seq_len) & (columns[None, :] < seq_len)
    if CAUSAL:
        inside = inside & (columns[None, :] <= rows[:, None])
    bias = tl.load(w_ptr + rows[:, None].to(tl.int64) * table + columns[None, :], inside, 0.0).to(tl.float32)
    bias = tl.where(inside, bias, float("-inf"))
    return bias[:, :, None] + keys[None, :, :]


@triton.jit
def aft_full_fwd_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, mask_ptr, cu_ptr, table_ptr, out_ptr, lse_ptr, ratio_ptr, total_len, dim,
    table, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (row block, channel block, batch): an online joint maximum per (row, channel), as online
    softmax keeps one per row, so no product of separately shifted exponentials can underflow. With
    VARLEN the sequence is a packed segment, and w is indexed by positions within it."""
    sequence, block = block_of(tl.program_id(0), tl.program_id(2), table_ptr, VARLEN)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offset = row_offset(batch, origin, total_len, dim)
    q_ptr, k_ptr, v_ptr, out_ptr = q_ptr + offset, k_ptr + offset, v_ptr + offset, out_ptr + offset
    lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
    mask_ptr += row_offset(batch, origin, total_len, 1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    top = tl.full((BLOCK_M, BLOCK_D), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    weighted = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end = tl.minimum((block + 1) * BLOCK_M, seq_len) if CAUSAL else seq_len
    for start in range(0, end, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        scores = _scores(
            w_ptr, k_ptr, mask_ptr, rows, columns, channels, seq_len, dim, table, CAUSAL, HAS_MASK
        )
        new_top = tl.maximum(top, tl.max(scores, 1))
        rescale = exp_difference(top, new_top)
        weights = exp_difference(scores, new_top[:, None, :])
        values = aft_load(v_ptr, columns, channels, seq_len, dim, 0.0)
        total = total * rescale + tl.sum(weights, 1)
        weighted = weighted * rescale + tl.sum(weights * values[None, :, :], 1)
        top = new_top
    aft_finish_rows(top, total, weighted, q_ptr, out_ptr, lse_ptr, ratio_ptr, rows, channels, seq_len, dim)


@triton.jit
def aft_full_bwd_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, w_ptr, mask_ptr, cu_ptr, table_ptr, lse_ptr, ratio_ptr, dk_ptr, dv_ptr,
    dw_ptr, total_len, dim, table, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (key block, channel block, batch), over the rows that see it, with a_td = g_td σ(q_td) and
    p = e^(w + k − lse): dv_t'd = Σ_t p a, dk_t'd = Σ_t p a (v_t'd − r_td), dw_tt' += Σ_d p a (v − r)
    (added atomically across channel blocks and batches)."""
    sequence, block = block_of(tl.program_id(0), tl.program_id(2), table_ptr, VARLEN)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offset = row_offset(batch, origin, total_len, dim)
    grad_ptr, q_ptr, k_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, k_ptr + offset, v_ptr + offset
    lse_ptr, ratio_ptr, dk_ptr, dv_ptr = (
        lse_ptr + offset,
        ratio_ptr + offset,
        dk_ptr + offset,
        dv_ptr + offset,
    )
    mask_ptr += row_offset(batch, origin, total_len, 1)
    columns = block * BLOCK_N + tl.arange(0, BLOCK_N)
    values = aft_load(v_ptr, columns, channels, seq_len, dim, 0.0)
    grad_k = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    first = (block * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start in range(first, seq_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        scores = _scores(
            w_ptr, k_ptr, mask_ptr, rows, columns, channels, seq_len, dim, table, CAUSAL, HAS_MASK
        )
        lse = aft_load(lse_ptr, rows, channels, seq_len, dim, float("-inf"))
        weights = exp_difference(scores, lse[:, None, :])  # (M, N, D); 0 for rows that see no key
        queries = aft_load(q_ptr, rows, channels, seq_len, dim, 0.0)
        adjoint = aft_load(grad_ptr, rows, channels, seq_len, dim, 0.0) * tl.sigmoid(queries)
        ratio = aft_load(ratio_ptr, rows, channels, seq_len, dim, 0.0)
        carried = weights * adjoint[:, None, :]
        grad_v += tl.sum(carried, 0)
        grad_scores = carried * (values[None, :, :] - ratio[:, None, :])
        grad_k += tl.sum(grad_scores, 0)
        inside = (rows[:, None] < seq_len) & (columns[None, :] < seq_len)
        tl.atomic_add(
            dw_ptr + rows[:, None].to(tl.int64) * table + columns[None, :], tl.sum(grad_scores, 2), inside
        )
    aft_store(dk_ptr, grad_k, columns, channels, seq_len, dim)
    aft_store(dv_ptr, grad_v, columns, channels, seq_len, dim)


def _full_blocks(dim: int) -> dict[str, int]:
    small = 16
    return {"BLOCK_M": small, "BLOCK_N": small, "BLOCK_D": min(32, triton.next_power_of_2(dim))}


def _launch(q, key_mask, causal, cu_seqlens, block):
    """Grid and flags of the AFT-full kernels, whose programs take blocks of ``block`` rows (or keys)."""
    batch, _, dim = q.shape
    blocks = _full_blocks(dim)
    bounds, table, programs = segment_arguments(q[0], cu_seqlens, blocks[block])
    grid = (programs, triton.cdiv(dim, blocks["BLOCK_D"]), batch)
    flags = {"CAUSAL": causal, "HAS_MASK": key_mask is not None, "VARLEN": cu_seqlens is not None, **blocks}
    return grid, (int8_mask(q, key_mask), bounds, table), flags


@torch.library.custom_op("tokenmix::aft_full_fwd", mutates_args=())
def aft_full_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, N, D); w: (N_max, N_max) with N ≤ N_max (each segment's length ≤ N_max, packed);
    key_mask: (B, N) bool or None; cu_seqlens: None, or with B = 1 the bounds (S + 1,) of packed segments,
    each a sequence of its own. Returns the output in the inputs' dtype and, for the backward, lse and r
    (B, N, D) in float32."""
    q, k, v, w = q.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    _, seq_len, dim = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape, dtype=torch.float32)
    ratio = torch.empty_like(lse)
    grid, tensors, flags = _launch(q, key_mask, causal, cu_seqlens, "BLOCK_M")
    aft_full_fwd_kernel[grid](q, k, v, w, *tensors, out, lse, ratio, seq_len, dim, w.shape[1], **flags)
    return out, lse, ratio


@aft_full_fwd.register_fake
def _(q, k, v, w, key_mask, causal, cu_seqlens=None):
    state = q.new_empty(q.shape, dtype=torch.float32)
    return torch.empty_like(q), state, torch.empty_like(state)


@torch.library.custom_op("tokenmix::aft_full_bwd", mutates_args=())
def aft_full_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    key_mask: torch.Tensor | None,
    lse: torch.Tensor,
    ratio: torch.Tensor,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, w, grad_out = (x.contiguous() for x in (q, k, v, w, grad_out))
    _, seq_len, dim = q.shape
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
    grid, tensors, flags = _launch(q, key_mask, causal, cu_seqlens, "BLOCK_N")
    aft_full_bwd_kernel[grid](
        grad_out, q, k, v, w, *tensors, lse, ratio, grad_k, grad_v, grad_w, seq_len, dim, w.shape[1], **flags
    )
    sigmoid = torch.sigmoid(q.float())
    grad_q = (grad_out.float() * sigmoid * (1 - sigmoid) * ratio).to(q.dtype)
    return grad_q, grad_k, grad_v, grad_w.to(w.dtype)


@aft_full_bwd.register_fake
def _(grad_out, q, k, v, w, key_mask, lse, ratio, causal, cu_seqlens=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w)


def _full_setup_context(ctx, inputs, output):
    q, k, v, w, key_mask, causal, cu_seqlens = inputs
    _, lse, ratio = output
    ctx.save_for_backward(q, k, v, w, key_mask, lse, ratio, cu_seqlens)
    ctx.causal = causal


def _full_backward(ctx, grad_out, grad_lse, grad_ratio):
    q, k, v, w, key_mask, lse, ratio, cu_seqlens = ctx.saved_tensors
    grads = aft_full_bwd(grad_out, q, k, v, w, key_mask, lse, ratio, ctx.causal, cu_seqlens)
    return (*grads, None, None, None)


aft_full_fwd.register_autograd(_full_backward, setup_context=_full_setup_context)


def aft_full(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    return aft_full_fwd(q, k, v, w, key_mask, causal, cu_seqlens)[0]
