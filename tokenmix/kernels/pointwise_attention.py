"""Pointwise attention as FlashAttention-style tiles: out_i = L_i^(−α) Σ_j φ(scale · q_i·k_j) v_j.

Without a softmax there is no running maximum or rescaling: each query block sums φ(scores)·v over its
key blocks. The backward recomputes the scores: one kernel walks the queries of each key block (dk, dv),
one the keys of each query block (dq), so nothing is accumulated atomically. Accumulation is float32;
float32 inputs use exact (IEEE) dot products, not TF32.

Registered as torch custom ops (``tokenmix::pointwise_attention_fwd`` and ``_bwd``) so torch.compile
traces through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    block_of,
    dot,
    dot_flags,
    int8_mask,
    key_visible,
    load_rows,
    segment_arguments,
    sequence_of,
    slice_offset,
    store_rows,
)

# Activation codes, in the order of the reference's ACTIVATIONS table.
CODES = {"relu": 0, "relu2": 1, "gelu": 2, "softplus": 3, "identity": 4, "relu6": 5, "sigmoid": 6}


@triton.jit
def _phi(s, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return tl.maximum(s, 0.0)
    elif ACTIVATION == 1:
        r = tl.maximum(s, 0.0)
        return r * r
    elif ACTIVATION == 2:
        return 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
    elif ACTIVATION == 3:  # softplus, beta 1, linear above 20 (as torch)
        u = tl.exp(-tl.abs(s))
        y = 1.0 + u
        log1p = tl.log(y) - ((y - 1.0) - u) / y  # log1p(u), accurate for small u
        return tl.where(s > 20.0, s, tl.maximum(s, 0.0) + log1p)
    elif ACTIVATION == 4:
        return s
    elif ACTIVATION == 5:
        return tl.minimum(tl.maximum(s, 0.0), 6.0)
    else:
        return 1.0 / (1.0 + tl.exp(-s))


@triton.jit
def _phi_grad(s, ACTIVATION: tl.constexpr):
    """φ'(s)."""
    if ACTIVATION == 0:
        return tl.where(s > 0.0, 1.0, 0.0)
    elif ACTIVATION == 1:
        return 2.0 * tl.maximum(s, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        return cdf + s * 0.3989422804014327 * tl.exp(-0.5 * s * s)
    elif ACTIVATION == 3:
        return tl.where(s > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-s)))
    elif ACTIVATION == 4:
        return tl.full(s.shape, 1.0, tl.float32)
    elif ACTIVATION == 5:
        return tl.where((s > 0.0) & (s < 6.0), 1.0, 0.0)
    else:
        sig = 1.0 / (1.0 + tl.exp(-s))
        return sig * (1.0 - sig)


@triton.jit
def _sequence(block_program, head_program, cu_ptr, table_ptr, seq_len, heads, VARLEN: tl.constexpr):
    """A program's block of rows, sequence and head: (block, batch, first position, length, batch·head)."""
    sequence, block = block_of(block_program, head_program // heads, table_ptr, VARLEN)
    batch, origin, length = sequence_of(sequence, cu_ptr, seq_len, VARLEN)
    return block, batch, origin, length, batch * heads + head_program % heads


@triton.jit
def _head_pointers(
    q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr, head, batch, origin, seq_len, dim_k, dim_v,
    row_scale_batch_stride,
):  # fmt: skip
    """The rows of one batch·head's sequence, and its batch's key mask and L_i^−α from there."""
    q_ptr += slice_offset(head, seq_len, dim_k) + origin * dim_k
    k_ptr += slice_offset(head, seq_len, dim_k) + origin * dim_k
    v_ptr += slice_offset(head, seq_len, dim_v) + origin * dim_v
    g_ptr += slice_offset(head, seq_len, dim_v) + origin * dim_v
    mask_ptr += slice_offset(batch, seq_len, 1) + origin
    row_scale_ptr += slice_offset(batch, row_scale_batch_stride, 1) + origin
    return q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr


@triton.jit
def _row_scale(row_scale_ptr, rows, seq_len):
    """L_i^−α of the rows as a column, applied before any half-precision cast of what it scales."""
    return tl.load(row_scale_ptr + rows, rows < seq_len, 0.0)[:, None]


@triton.jit
def pointwise_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, row_scale_ptr, cu_ptr, table_ptr, out_ptr,
    total_len, heads, dim_k, dim_v, scale, row_scale_batch_stride,
    ACTIVATION: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One block of rows of one (batch row or segment)·head; positions below count within the sequence."""
    block, batch, origin, seq_len, head = _sequence(
        tl.program_id(0), tl.program_id(1), cu_ptr, table_ptr, total_len, heads, VARLEN
    )
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q_ptr, k_ptr, v_ptr, out_ptr, mask_ptr, row_scale_ptr = _head_pointers(
        q_ptr, k_ptr, v_ptr, out_ptr, mask_ptr, row_scale_ptr, head, batch, origin, total_len, dim_k, dim_v,
        row_scale_batch_stride,
    )  # fmt: skip
    q = load_rows(q_ptr, rows, dk, seq_len, dim_k, dim_k, 0.0)
    row_scale = _row_scale(row_scale_ptr, rows, seq_len)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    end = tl.minimum((block + 1) * BLOCK_M, seq_len) if CAUSAL else seq_len
    for start in range(0, end, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        k = load_rows(k_ptr, columns, dk, seq_len, dim_k, dim_k, 0.0)
        scores = dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        weights = tl.where(
            key_visible(rows, columns, mask_ptr, seq_len, CAUSAL, HAS_MASK), _phi(scores, ACTIVATION), 0.0
        )
        v = load_rows(v_ptr, columns, dv, seq_len, dim_v, dim_v, 0.0)
        acc += dot((weights * row_scale).to(v.dtype), v, PRECISION, UPCAST)
    store_rows(out_ptr, acc, rows, dv, seq_len, dim_v, dim_v)


@triton.jit
def pointwise_attention_bwd_keys_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr, cu_ptr, table_ptr, dk_ptr, dv_ptr,
    total_len, heads, dim_k, dim_v, scale, row_scale_batch_stride,
    ACTIVATION: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key block, over the query blocks that see it (g: grad_out)."""
    block, batch, origin, seq_len, head = _sequence(
        tl.program_id(0), tl.program_id(1), cu_ptr, table_ptr, total_len, heads, VARLEN
    )
    columns = block * BLOCK_N + tl.arange(0, BLOCK_N)
    dk_range, dv_range = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr = _head_pointers(
        q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr, head, batch, origin, total_len, dim_k, dim_v,
        row_scale_batch_stride,
    )  # fmt: skip
    k = load_rows(k_ptr, columns, dk_range, seq_len, dim_k, dim_k, 0.0)
    v = load_rows(v_ptr, columns, dv_range, seq_len, dim_v, dim_v, 0.0)
    grad_k = tl.zeros((BLOCK_N, BLOCK_DK), tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    first = (block * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start in range(first, seq_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = load_rows(q_ptr, rows, dk_range, seq_len, dim_k, dim_k, 0.0)
        g = load_rows(g_ptr, rows, dv_range, seq_len, dim_v, dim_v, 0.0)
        row_scale = _row_scale(row_scale_ptr, rows, seq_len)
        scores = dot(q, tl.trans(k), PRECISION, UPCAST) * scale  # (M, N)
        counted = key_visible(rows, columns, mask_ptr, seq_len, CAUSAL, HAS_MASK)
        weights = tl.where(counted, _phi(scores, ACTIVATION), 0.0) * row_scale
        grad_v += dot(tl.trans(weights).to(q.dtype), g, PRECISION, UPCAST)
        grad_weights = dot(g, tl.trans(v), PRECISION, UPCAST) * row_scale
        grad_scores = tl.where(counted, grad_weights * _phi_grad(scores, ACTIVATION), 0.0)
        grad_k += dot(tl.trans(grad_scores).to(q.dtype), q, PRECISION, UPCAST)
    dk_ptr += slice_offset(head, total_len, dim_k) + origin * dim_k
    dv_ptr += slice_offset(head, total_len, dim_v) + origin * dim_v
    store_rows(dk_ptr, grad_k * scale, columns, dk_range, seq_len, dim_k, dim_k)
    store_rows(dv_ptr, grad_v, columns, dv_range, seq_len, dim_v, dim_v)


@triton.jit
def pointwise_attention_bwd_queries_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr, cu_ptr, table_ptr, dq_ptr,
    total_len, heads, dim_k, dim_v, scale, row_scale_batch_stride,
    ACTIVATION: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """dq of one query block, over the key blocks it sees."""
    block, batch, origin, seq_len, head = _sequence(
        tl.program_id(0), tl.program_id(1), cu_ptr, table_ptr, total_len, heads, VARLEN
    )
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dk_range, dv_range = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr = _head_pointers(
        q_ptr, k_ptr, v_ptr, g_ptr, mask_ptr, row_scale_ptr, head, batch, origin, total_len, dim_k, dim_v,
        row_scale_batch_stride,
    )  # fmt: skip
    q = load_rows(q_ptr, rows, dk_range, seq_len, dim_k, dim_k, 0.0)
    g = load_rows(g_ptr, rows, dv_range, seq_len, dim_v, dim_v, 0.0)
    row_scale = _row_scale(row_scale_ptr, rows, seq_len)
    grad_q = tl.zeros((BLOCK_M, BLOCK_DK), tl.float32)
    end = tl.minimum((block + 1) * BLOCK_M, seq_len) if CAUSAL else seq_len
    for start in range(0, end, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        k = load_rows(k_ptr, columns, dk_range, seq_len, dim_k, dim_k, 0.0)
        v = load_rows(v_ptr, columns, dv_range, seq_len, dim_v, dim_v, 0.0)
        scores = dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        counted = key_visible(rows, columns, mask_ptr, seq_len, CAUSAL, HAS_MASK)
        grad_weights = dot(g, tl.trans(v), PRECISION, UPCAST) * row_scale
        grad_scores = tl.where(counted, grad_weights * _phi_grad(scores, ACTIVATION), 0.0)
        grad_q += dot(grad_scores.to(q.dtype), k, PRECISION, UPCAST)
    dq_ptr += slice_offset(head, total_len, dim_k) + origin * dim_k
    store_rows(dq_ptr, grad_q * scale, rows, dk_range, seq_len, dim_k, dim_k)


def _blocks(dim_k: int, dim_v: int, seq_len: int) -> dict[str, int]:
    small = max(16, min(64, triton.next_power_of_2(seq_len)))
    return {
        "BLOCK_M": small,
        "BLOCK_N": small,
        "BLOCK_DK": max(16, triton.next_power_of_2(dim_k)),
        "BLOCK_DV": max(16, triton.next_power_of_2(dim_v)),
        "num_warps": 8,  # 4 spill registers in the backward at head dim 64 (ptxas, sm_90a)
    }


def _launch(q, v, key_mask, row_scale, activation, causal, cu_seqlens, scale):
    """Everything the three kernels share: (grid, tensors after q, k, v …, sizes, flags and blocks)."""
    batch, heads, seq_len, dim_k = q.shape
    dim_v = v.shape[-1]
    blocks = _blocks(dim_k, dim_v, seq_len)
    # BLOCK_M = BLOCK_N, so one table of row blocks serves queries and keys.
    bounds, table, programs = segment_arguments(q[0, 0], cu_seqlens, blocks["BLOCK_M"])
    flags = {
        "ACTIVATION": CODES[activation],
        "CAUSAL": causal,
        "HAS_MASK": key_mask is not None,
        "VARLEN": cu_seqlens is not None,
        **dot_flags(q.dtype),
        **blocks,
    }
    row_scale = row_scale.to(torch.float32).contiguous()
    sizes = (seq_len, heads, dim_k, dim_v, scale, seq_len if row_scale.shape[0] > 1 else 0)
    tensors = (int8_mask(q, key_mask), row_scale, bounds, table)
    return (programs, batch * heads), tensors, sizes, flags


@torch.library.custom_op("tokenmix::pointwise_attention_fwd", mutates_args=())
def pointwise_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    row_scale: torch.Tensor,
    activation: str,
    scale: float,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k: (B, H, N, Dk) and v: (B, H, N, Dv), one dtype; key_mask: (B, N) bool or None;
    row_scale: (B or 1, N) float32, L_i^(−α); cu_seqlens: None, or with B = 1 the bounds (S + 1,) of
    packed segments, each computed as a sequence of its own. Returns (B, H, N, Dv) in the inputs' dtype."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    grid, tensors, sizes, flags = _launch(q, v, key_mask, row_scale, activation, causal, cu_seqlens, scale)
    pointwise_attention_fwd_kernel[grid](q, k, v, *tensors, out, *sizes, **flags)
    return out


@pointwise_attention_fwd.register_fake
def _(q, k, v, key_mask, row_scale, activation, scale, causal, cu_seqlens=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("tokenmix::pointwise_attention_bwd", mutates_args=())
def pointwise_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    row_scale: torch.Tensor,
    activation: str,
    scale: float,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad = grad_out.to(q.dtype).contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid, tensors, sizes, flags = _launch(q, v, key_mask, row_scale, activation, causal, cu_seqlens, scale)
    pointwise_attention_bwd_keys_kernel[grid](q, k, v, grad, *tensors, grad_k, grad_v, *sizes, **flags)
    pointwise_attention_bwd_queries_kernel[grid](q, k, v, grad, *tensors, grad_q, *sizes, **flags)
    return grad_q, grad_k, grad_v


@pointwise_attention_bwd.register_fake
def _(grad_out, q, k, v, key_mask, row_scale, activation, scale, causal, cu_seqlens=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, row_scale, activation, scale, causal, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, key_mask, row_scale, cu_seqlens)
    ctx.options = (activation, scale, causal)


def _backward(ctx, grad_out):
    q, k, v, key_mask, row_scale, cu_seqlens = ctx.saved_tensors
    grads = pointwise_attention_bwd(grad_out, q, k, v, key_mask, row_scale, *ctx.options, cu_seqlens)
    return (*grads, None, None, None, None, None, None)


pointwise_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
