"""AFT-local and AFT-conv: the keys beyond a window from two scans, the window's biased keys folded in
as a band, offset by offset, under an online joint maximum."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...backend import interpreting
from .._common import (
    block_of,
    exp_difference,
    int8_mask,
    row_offset,
    segment_arguments,
    sequence_of,
)
from .common import (
    aft_absorb,
    aft_add,
    aft_add_key_grad,
    aft_channels,
    aft_finish_rows,
    aft_key_columns,
    aft_keys,
    aft_load,
    aft_store,
)
from .scan import aft_scan_bwd_kernel, scan_launch, scan_state


@triton.jit
def band_offset(rows, head, index, row_stride, head_stride):
    """Where the band's entry (rows, head, index) lies, in 64 bits (N·H·W passes 2**31)."""
    return tl.cast(rows, tl.int64) * row_stride + head * head_stride + index


@triton.jit
def _band_pointers(band_ptr, rows, head, index, row_stride, head_stride):
    return band_ptr + band_offset(rows, head, index, row_stride, head_stride)


@triton.jit
def aft_band_fwd_kernel(
    q_ptr, k_ptr, v_ptr, band_ptr, mask_ptr, prefix_lse_ptr, prefix_ratio_ptr, suffix_lse_ptr,
    suffix_ratio_ptr, cu_ptr, table_ptr, out_ptr, lse_ptr, ratio_ptr,
    total_len, dim, head_dim, key_width, window, first, last, band_row_stride, band_head_stride,
    CAUSAL: tl.constexpr, KEY_PER_HEAD: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A block of rows t: the unbiased keys beyond the window from the prefix scan's row t − window (and
    the suffix scan's row t + window), then the keys t + j, j ∈ [first, last], each biased by
    band[t, head, j + window − 1] (t counts within a packed segment, and the band's rows are the packed
    row's when VARLEN)."""
    sequence, block = block_of(tl.program_id(0), tl.program_id(2), table_ptr, VARLEN)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    head, channels = aft_channels(tl.program_id(1), dim, head_dim, BLOCK_D)
    key_columns = aft_key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = row_offset(batch, origin, total_len, dim)
    q_ptr, v_ptr, out_ptr = q_ptr + offset, v_ptr + offset, out_ptr + offset
    lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
    prefix_lse_ptr, prefix_ratio_ptr = prefix_lse_ptr + offset, prefix_ratio_ptr + offset
    suffix_lse_ptr, suffix_ratio_ptr = suffix_lse_ptr + offset, suffix_ratio_ptr + offset
    k_ptr += row_offset(batch, origin, total_len, key_width)
    mask_ptr += row_offset(batch, origin, total_len, 1)
    band_ptr += origin * band_row_stride
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    top = tl.full((BLOCK_M, BLOCK_D), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    weighted = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    top, total, weighted = aft_absorb(
        top, total, weighted,
        aft_load(prefix_lse_ptr, rows - window, channels, seq_len, dim, float("-inf")),
        aft_load(prefix_ratio_ptr, rows - window, channels, seq_len, dim, 0.0),
    )  # fmt: skip
    if not CAUSAL:
        top, total, weighted = aft_absorb(
            top, total, weighted,
            aft_load(suffix_lse_ptr, rows + window, channels, seq_len, dim, float("-inf")),
            aft_load(suffix_ratio_ptr, rows + window, channels, seq_len, dim, 0.0),
        )  # fmt: skip
    for shift in range(first, last + 1):
        columns = rows + shift
        keys = aft_keys(k_ptr, mask_ptr, columns, key_columns, seq_len, key_width, HAS_MASK)
        bias_ptr = _band_pointers(band_ptr, rows, head, shift + window - 1, band_row_stride, band_head_stride)
        bias = tl.load(bias_ptr, (rows >= 0) & (rows < seq_len), 0.0).to(tl.float32)
        values = aft_load(v_ptr, columns, channels, seq_len, dim, 0.0)
        top, total, weighted = aft_absorb(top, total, weighted, keys + bias[:, None], values)
    aft_finish_rows(top, total, weighted, q_ptr, out_ptr, lse_ptr, ratio_ptr, rows, channels, seq_len, dim)


@triton.jit
def aft_band_bwd_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, band_ptr, mask_ptr, cu_ptr, table_ptr, lse_ptr, ratio_ptr, dq_ptr,
    dk_ptr, dv_ptr, dband_ptr, total_len, dim, head_dim, key_width, window, first, last, band_row_stride,
    band_head_stride, KEY_PER_HEAD: tl.constexpr, BAND_PER_ROW: tl.constexpr, HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A block of keys t', over the rows t = t' − j whose window holds them. With a_t = g_t σ(q_t) and
    p = e^(k_t' + band_tj − lse_t): dv_t' += Σ p a, dk_t' += Σ p a (v_t' − r_t), dband_tj += Σ_channels
    p a (v_t' − r_t) (atomically, across batches and channel blocks, and over rows for a band shared by
    the rows). Also dq_t' = g σ'(q) r."""
    sequence, block = block_of(tl.program_id(0), tl.program_id(2), table_ptr, VARLEN)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    head, channels = aft_channels(tl.program_id(1), dim, head_dim, BLOCK_D)
    key_columns = aft_key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = row_offset(batch, origin, total_len, dim)
    grad_ptr, q_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, v_ptr + offset
    lse_ptr, ratio_ptr, dq_ptr, dv_ptr = (
        lse_ptr + offset,
        ratio_ptr + offset,
        dq_ptr + offset,
        dv_ptr + offset,
    )
    k_ptr += row_offset(batch, origin, total_len, key_width)
    dk_ptr += row_offset(batch, origin, total_len, key_width)
    mask_ptr += row_offset(batch, origin, total_len, 1)
    band_ptr += origin * band_row_stride
    if BAND_PER_ROW:
        dband_ptr += origin * band_row_stride
    columns = block * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = aft_keys(k_ptr, mask_ptr, columns, key_columns, seq_len, key_width, HAS_MASK)
    values = aft_load(v_ptr, columns, channels, seq_len, dim, 0.0)
    grad_k = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    grad_v = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for shift in range(first, last + 1):
        rows = columns - shift
        inside = (rows >= 0) & (rows < seq_len) & (columns < seq_len)
        bias_ptr = _band_pointers(band_ptr, rows, head, shift + window - 1, band_row_stride, band_head_stride)
        bias = tl.load(bias_ptr, inside, 0.0).to(tl.float32)
        lse = aft_load(lse_ptr, rows, channels, seq_len, dim, float("inf"))  # no such row: weight 0
        adjoint = aft_load(grad_ptr, rows, channels, seq_len, dim, 0.0) * tl.sigmoid(
            aft_load(q_ptr, rows, channels, seq_len, dim, 0.0)
        )
        carried = exp_difference(keys + bias[:, None], lse) * adjoint
        grad_v += carried
        grad_scores = carried * (values - aft_load(ratio_ptr, rows, channels, seq_len, dim, 0.0))
        grad_k += grad_scores
        if BAND_PER_ROW:
            dband_ptrs = _band_pointers(
                dband_ptr, rows, head, shift + window - 1, band_row_stride, band_head_stride
            )
            tl.atomic_add(dband_ptrs, tl.sum(grad_scores, 1), inside)
        else:  # one bias for every row: one sum, one atomic
            tl.atomic_add(
                _band_pointers(dband_ptr, 0, head, shift + window - 1, 0, band_head_stride),
                tl.sum(grad_scores),
            )
    aft_add(dv_ptr, grad_v, columns, channels, seq_len, dim)
    aft_add_key_grad(dk_ptr, grad_k, columns, head, channels, seq_len, dim, key_width, KEY_PER_HEAD)
    sigmoid = tl.sigmoid(aft_load(q_ptr, columns, channels, seq_len, dim, 0.0))
    grad = aft_load(grad_ptr, columns, channels, seq_len, dim, 0.0)
    ratio = aft_load(ratio_ptr, columns, channels, seq_len, dim, 0.0)
    aft_store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio, columns, channels, seq_len, dim)


class BandLaunch(NamedTuple):
    """What the band kernels are launched with: the grid (row blocks, channel blocks of every head,
    batch; with packed segments, the listed blocks of every segment in place of the first and last),
    block sizes, the segment bounds and block table (stand-ins without segments), sizes (N, D, head
    width, key width, window, first and last offset), the bias table's strides (row, head; 0 where
    shared) and constexpr flags."""

    grid: tuple[int, int, int]
    blocks: dict[str, int]
    segments: tuple[torch.Tensor, torch.Tensor]
    sizes: tuple[int, ...]
    strides: tuple[int, int]
    flags: dict[str, bool]


def band_launch(q, k, band, key_mask, window, causal, cu_seqlens) -> BandLaunch:
    """Launch arguments shared by the band kernels."""
    batch, seq_len, dim = q.shape
    heads = band.shape[1]
    head_dim = dim // heads
    key_width = k.shape[-1]
    first = max(1 - window, 1 - seq_len)
    last = 0 if causal else min(window - 1, seq_len - 1)
    block_m = 16 if interpreting() else 32
    blocks = {"BLOCK_M": block_m, "BLOCK_D": min(64, triton.next_power_of_2(head_dim))}
    channel_programs = heads * triton.cdiv(head_dim, blocks["BLOCK_D"])
    bounds, table, programs = segment_arguments(q[0], cu_seqlens, block_m)
    grid = (programs, channel_programs, batch)
    sizes = (seq_len, dim, head_dim, key_width, window, first, last)
    strides = (band.stride(0) if band.shape[0] > 1 else 0, band.stride(1) if heads > 1 else 0)
    flags = {
        "KEY_PER_HEAD": key_width != dim,
        "HAS_MASK": key_mask is not None,
        "VARLEN": cu_seqlens is not None,
    }
    return BandLaunch(grid, blocks, (bounds, table), sizes, strides, flags)


@torch.library.custom_op("tokenmix::aft_local_fwd", mutates_args=())
def aft_local_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band: torch.Tensor,
    key_mask: torch.Tensor | None,
    window: int,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AFT with biases on a band: q, v (B, N, D); k (B, N, D), or (B, N, H) with one key per head of
    D / H channels; band (N or 1, H or 1, J): the bias of key t + j for row t is band[t, h, j + window − 1]
    for j in (−window, window) (in (−window, 0] when causal), and 0 beyond. key_mask: (B, N) bool or None.
    cu_seqlens: None, or with B = 1 the bounds (S + 1,) of packed segments, each a sequence of its own
    (no key beyond its segment; the band's rows stay the packed row's). Returns the output in the inputs'
    dtype and, for the backward, float32 lse and r of the rows and the lse of the prefix and suffix scans
    (the suffix's empty when causal), (B, N, D) each."""
    q, k, v, band = q.contiguous(), k.contiguous(), v.contiguous(), band.contiguous()
    mask, heads = int8_mask(q, key_mask), band.shape[1]
    prefix_lse, prefix_ratio = scan_state(q, k, v, mask, key_mask, heads, False, cu_seqlens)
    if causal:  # no suffix: the kernels never read it
        suffix_lse, suffix_ratio = q.new_empty(0, dtype=torch.float32), prefix_ratio
    else:
        suffix_lse, suffix_ratio = scan_state(q, k, v, mask, key_mask, heads, True, cu_seqlens)
    out = torch.empty_like(q)
    lse, ratio = torch.empty_like(prefix_lse), torch.empty_like(prefix_lse)
    grid, blocks, segments, sizes, strides, flags = band_launch(
        q, k, band, key_mask, window, causal, cu_seqlens
    )
    aft_band_fwd_kernel[grid](
        q, k, v, band, mask, prefix_lse, prefix_ratio, suffix_lse, suffix_ratio, *segments, out, lse, ratio,
        *sizes, *strides, CAUSAL=causal, **flags, **blocks,
    )  # fmt: skip
    return out, lse, ratio, prefix_lse, suffix_lse


@aft_local_fwd.register_fake
def _(q, k, v, band, key_mask, window, causal, cu_seqlens=None):
    state = q.new_empty(q.shape, dtype=torch.float32)
    suffix = q.new_empty(0, dtype=torch.float32) if causal else torch.empty_like(state)
    return torch.empty_like(q), state, torch.empty_like(state), torch.empty_like(state), suffix


@torch.library.custom_op("tokenmix::aft_local_bwd", mutates_args=())
def aft_local_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band: torch.Tensor,
    key_mask: torch.Tensor | None,
    lse: torch.Tensor,
    ratio: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_lse: torch.Tensor,
    window: int,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, band = q.contiguous(), k.contiguous(), v.contiguous(), band.contiguous()
    grad_out = grad_out.contiguous()
    mask = int8_mask(q, key_mask)
    grad_q = torch.empty_like(q)
    grad_k, grad_v, grad_band = (
        torch.zeros(x.shape, device=x.device, dtype=torch.float32) for x in (k, v, band)
    )
    grid, blocks, segments, sizes, strides, flags = band_launch(
        q, k, band, key_mask, window, causal, cu_seqlens
    )
    aft_band_bwd_kernel[grid](
        grad_out, q, k, v, band, mask, *segments, lse, ratio, grad_q, grad_k, grad_v, grad_band, *sizes,
        *strides, BAND_PER_ROW=band.shape[0] > 1, **flags, **blocks,
    )  # fmt: skip
    scan_grid, scan_blocks, bounds, _ = scan_launch(q, band.shape[1], key_mask, cu_seqlens)
    scan_sizes = sizes[:5]  # seq_len, dim, head_dim, key_width, and window as the scans' shift
    for reverse, scan_lse in ((False, prefix_lse), (True, suffix_lse))[: 1 if causal else 2]:
        aft_scan_bwd_kernel[scan_grid](
            grad_out, q, k, v, mask, bounds, scan_lse, lse, ratio, grad_q, grad_k, grad_v, *scan_sizes,
            REVERSE=reverse, WHOLE_OP=False, **flags, **scan_blocks,
        )  # fmt: skip
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_band.to(band.dtype)


@aft_local_bwd.register_fake
def _(grad_out, q, k, v, band, key_mask, lse, ratio, prefix_lse, suffix_lse, window, causal, cu_seqlens=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(band)


def _local_setup_context(ctx, inputs, output):
    q, k, v, band, key_mask, window, causal, cu_seqlens = inputs
    _, lse, ratio, prefix_lse, suffix_lse = output
    ctx.save_for_backward(q, k, v, band, key_mask, lse, ratio, prefix_lse, suffix_lse, cu_seqlens)
    ctx.options = (window, causal)


def _local_backward(ctx, grad_out, *unused):
    *saved, cu_seqlens = ctx.saved_tensors
    grads = aft_local_bwd(grad_out, *saved, *ctx.options, cu_seqlens)
    return (*grads, None, None, None, None)


aft_local_fwd.register_autograd(_local_backward, setup_context=_local_setup_context)


def aft_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band: torch.Tensor,
    key_mask: torch.Tensor | None,
    window: int,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    return aft_local_fwd(q, k, v, band, key_mask, window, causal, cu_seqlens)[0]
