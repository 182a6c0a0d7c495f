"""The scans (AFT-simple; the unbiased keys beyond AFT-local's and AFT-conv's windows): a running
log-sum-exp and the stable ratio recurrence as associative scans over time blocks, forwards or backwards
in time; their backward runs the adjoint recurrence the other way."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...backend import interpreting
from .._common import (
    exp_difference,
    linear_combine,
    logaddexp,
    row_of,
    row_offset,
    segment_bounds,
    sequence_of,
)
from .common import (
    aft_add,
    aft_add_key_grad,
    aft_channels,
    aft_key_columns,
    aft_keys,
    aft_load,
    aft_store,
    aft_time,
)


@triton.jit
def aft_scan_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, cu_ptr, out_ptr, lse_ptr, ratio_ptr, total_len, dim, head_dim, key_width,
    REVERSE: tl.constexpr, KEY_PER_HEAD: tl.constexpr, WRITE_OUT: tl.constexpr, HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """lse_t and r_t over the keys t' ≤ t (t' ≥ t when REVERSE) at every t of one sequence (a batch row,
    or a packed segment when VARLEN); σ(q) ⊙ r too if WRITE_OUT."""
    batch, origin, seq_len = sequence_of(tl.program_id(1), cu_ptr, total_len, VARLEN)
    head, channels = aft_channels(tl.program_id(0), dim, head_dim, BLOCK_D)
    key_columns = aft_key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = row_offset(batch, origin, total_len, dim)
    q_ptr, v_ptr, out_ptr = q_ptr + offset, v_ptr + offset, out_ptr + offset
    lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
    k_ptr += row_offset(batch, origin, total_len, key_width)
    mask_ptr += row_offset(batch, origin, total_len, 1)
    local = tl.arange(0, BLOCK_T)
    carry_lse = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    carry_ratio = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        steps = start + local
        rows = aft_time(steps, seq_len, REVERSE)
        keys = aft_keys(k_ptr, mask_ptr, rows, key_columns, seq_len, key_width, HAS_MASK)
        # lse one step back from a scan of the keys shifted by a step, then lse elementwise.
        before = aft_keys(
            k_ptr, mask_ptr, aft_time(steps - 1, seq_len, REVERSE), key_columns, seq_len, key_width, HAS_MASK
        )
        before = tl.where(local[:, None] == 0, float("-inf"), before)
        previous = logaddexp(carry_lse[None, :], tl.associative_scan(before, 0, logaddexp))
        lse = logaddexp(previous, keys)
        decay = exp_difference(previous, lse)
        values = aft_load(v_ptr, rows, channels, seq_len, dim, 0.0)
        gains, ratio = tl.associative_scan((decay, exp_difference(keys, lse) * values), 0, linear_combine)
        ratio = ratio + gains * carry_ratio[None, :]
        if WRITE_OUT:
            queries = aft_load(q_ptr, rows, channels, seq_len, dim, 0.0)
            aft_store(out_ptr, tl.sigmoid(queries) * ratio, rows, channels, seq_len, dim)
        aft_store(lse_ptr, lse, rows, channels, seq_len, dim)
        aft_store(ratio_ptr, ratio, rows, channels, seq_len, dim)
        carry_lse = row_of(lse, local, BLOCK_T - 1)
        carry_ratio = row_of(ratio, local, BLOCK_T - 1)


@triton.jit
def aft_scan_bwd_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, cu_ptr, scan_lse_ptr, lse_ptr, ratio_ptr, dq_ptr, dk_ptr,
    dv_ptr, total_len, dim, head_dim, key_width, shift,
    REVERSE: tl.constexpr, KEY_PER_HEAD: tl.constexpr, WHOLE_OP: tl.constexpr, HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The scan's share of dk and dv. Key t' reaches the output row t of scan step τ + shift through the
    scan's lse P_τ (t' ≤ τ in scan order), with weight e^(k_t' − P_τ) · e^(P_τ − lse_t), each ≤ 1. With
    a_τ = g_t σ(q_t) e^(P_τ − lse_t): dv_t' = e^(k_t' − P_t') R_t' and
    dk_t' = e^(k_t' − P_t') (v_t' R_t' − Q_t'), where R_τ = Σ_{τ' ≥ τ} e^(P_τ − P_τ') a_τ' and Q_τ likewise
    of a r_t, chained backwards in scan order. WHOLE_OP (AFT-simple: shift 0, the scan is the op): stores
    dq, dk and dv; otherwise adds dk and dv into float32 buffers."""
    batch, origin, seq_len = sequence_of(tl.program_id(1), cu_ptr, total_len, VARLEN)
    head, channels = aft_channels(tl.program_id(0), dim, head_dim, BLOCK_D)
    key_columns = aft_key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = row_offset(batch, origin, total_len, dim)
    grad_ptr, q_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, v_ptr + offset
    scan_lse_ptr, lse_ptr, ratio_ptr = scan_lse_ptr + offset, lse_ptr + offset, ratio_ptr + offset
    dq_ptr, dv_ptr = dq_ptr + offset, dv_ptr + offset
    k_ptr += row_offset(batch, origin, total_len, key_width)
    dk_ptr += row_offset(batch, origin, total_len, key_width)
    mask_ptr += row_offset(batch, origin, total_len, 1)
    local = tl.arange(0, BLOCK_T)
    carry_r = tl.zeros((BLOCK_D,), tl.float32)
    carry_q = tl.zeros((BLOCK_D,), tl.float32)
    blocks = tl.cdiv(seq_len, BLOCK_T)
    for index in range(0, blocks):  # the blocks in reverse, by an ascending loop (scf.for's own form)
        steps = (blocks - 1 - index) * BLOCK_T + local
        rows = aft_time(steps, seq_len, REVERSE)
        scan_lse = aft_load(scan_lse_ptr, rows, channels, seq_len, dim, float("-inf"))
        following = aft_load(
            scan_lse_ptr, aft_time(steps + 1, seq_len, REVERSE), channels, seq_len, dim, float("inf")
        )
        decay = exp_difference(scan_lse, following)
        out_rows = aft_time(steps + shift, seq_len, REVERSE)
        lse = aft_load(lse_ptr, out_rows, channels, seq_len, dim, float("inf"))  # no such row: weight 0
        queries = aft_load(q_ptr, out_rows, channels, seq_len, dim, 0.0)
        grad = aft_load(grad_ptr, out_rows, channels, seq_len, dim, 0.0)
        ratio = aft_load(ratio_ptr, out_rows, channels, seq_len, dim, 0.0)
        adjoint = grad * tl.sigmoid(queries) * exp_difference(scan_lse, lse)
        gains, r_sum = tl.associative_scan((decay, adjoint), 0, linear_combine, reverse=True)
        _, q_sum = tl.associative_scan((decay, adjoint * ratio), 0, linear_combine, reverse=True)
        r_sum = r_sum + gains * carry_r[None, :]
        q_sum = q_sum + gains * carry_q[None, :]
        weights = exp_difference(
            aft_keys(k_ptr, mask_ptr, rows, key_columns, seq_len, key_width, HAS_MASK), scan_lse
        )
        values = aft_load(v_ptr, rows, channels, seq_len, dim, 0.0)
        grad_k = weights * (values * r_sum - q_sum)
        if WHOLE_OP:
            aft_store(dv_ptr, weights * r_sum, rows, channels, seq_len, dim)
            aft_store(dk_ptr, grad_k, rows, channels, seq_len, dim)
            sigmoid = tl.sigmoid(queries)
            aft_store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio, rows, channels, seq_len, dim)
        else:
            aft_add(dv_ptr, weights * r_sum, rows, channels, seq_len, dim)
            aft_add_key_grad(dk_ptr, grad_k, rows, head, channels, seq_len, dim, key_width, KEY_PER_HEAD)
        carry_r = row_of(r_sum, local, 0)
        carry_q = row_of(q_sum, local, 0)


class ScanLaunch(NamedTuple):
    """A scan kernel's grid (channel blocks of every head, sequences: batch rows or packed segments), its
    block sizes and warps, the segment bounds (q stands in when there are none) and flags."""

    grid: tuple[int, int]
    blocks: dict[str, int]
    bounds: torch.Tensor
    flags: dict[str, bool]


def scan_launch(
    q: torch.Tensor, heads: int, key_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> ScanLaunch:
    """How the scans run over q (B, N, D) with ``heads`` heads."""
    batch, _, dim = q.shape
    head_dim = dim // heads
    blocks = {"BLOCK_T": 16 if interpreting() else 64, "BLOCK_D": min(64, triton.next_power_of_2(head_dim))}
    blocks["num_warps"] = 8  # the scans' tuples spill registers at 4 (ptxas, sm_90a)
    bounds = segment_bounds(q, cu_seqlens)  # one program per sequence: no table of blocks
    sequences = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    grid = (heads * triton.cdiv(head_dim, blocks["BLOCK_D"]), sequences)
    return ScanLaunch(
        grid, blocks, bounds, {"HAS_MASK": key_mask is not None, "VARLEN": cu_seqlens is not None}
    )


def scan_state(q, k, v, mask, key_mask, heads, reverse, cu_seqlens=None):
    """The scan's (lse, r), float32 (B, N, D)."""
    _, seq_len, dim = q.shape
    lse = q.new_empty(q.shape, dtype=torch.float32)
    ratio = torch.empty_like(lse)
    grid, blocks, bounds, flags = scan_launch(q, heads, key_mask, cu_seqlens)
    aft_scan_fwd_kernel[grid](  # no output (WRITE_OUT=False): q stands in for its pointer
        q, k, v, mask, bounds, q, lse, ratio, seq_len, dim, dim // heads, k.shape[-1], REVERSE=reverse,
        KEY_PER_HEAD=k.shape[-1] != dim, WRITE_OUT=False, **flags, **blocks,
    )  # fmt: skip
    return lse, ratio
