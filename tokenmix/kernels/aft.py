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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ._common import (
    exp_difference,
    int8_mask,
    linear_combine,
    load_rows,
    logaddexp,
    row_of,
    slice_offset,
    store_rows,
)


@triton.jit
def _load(ptr, rows, channels, seq_len, dim, other):
    return load_rows(ptr, rows, channels, seq_len, dim, dim, other).to(tl.float32)


@triton.jit
def _store(ptr, x, rows, channels, seq_len, dim):
    store_rows(ptr, x, rows, channels, seq_len, dim, dim)


@triton.jit
def _add(ptr, x, rows, channels, seq_len, dim):
    """Adds x into a float32 (seq_len, dim) buffer, rows and channels in range only."""
    inside = (rows[:, None] >= 0) & (rows[:, None] < seq_len) & (channels[None, :] < dim)
    tl.atomic_add(ptr + rows[:, None].to(tl.int64) * dim + channels[None, :], x, inside)


@triton.jit
def _channels(program, dim, head_dim, BLOCK_D: tl.constexpr):
    """The head and channels (indices into D = heads · head_dim) of a program's block; channels past the
    head's end are set to D, which every load and store leaves out."""
    blocks = tl.cdiv(head_dim, BLOCK_D)
    head = program // blocks
    within = (program % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    return head, tl.where(within < head_dim, head * head_dim + within, dim)


@triton.jit
def _key_columns(head, channels, dim, key_width, KEY_PER_HEAD: tl.constexpr):
    """Columns of the keys (width D, or one per head) that the channels read."""
    if KEY_PER_HEAD:
        return tl.where(channels < dim, head, key_width)
    return channels


@triton.jit
def _keys(k_ptr, mask_ptr, rows, columns, seq_len, width, HAS_MASK: tl.constexpr):
    """Keys (float32) with −inf outside the sequence and at padding."""
    keys = load_rows(k_ptr, rows, columns, seq_len, width, width, float("-inf")).to(tl.float32)
    if HAS_MASK:
        real = tl.load(mask_ptr + rows, (rows < seq_len) & (rows >= 0), 0)
        keys = tl.where(real[:, None] != 0, keys, float("-inf"))
    return keys


@triton.jit
def _add_key_grad(dk_ptr, grad_k, rows, head, channels, seq_len, dim, key_width, KEY_PER_HEAD: tl.constexpr):
    if KEY_PER_HEAD:  # a head's channels share one key
        tl.atomic_add(dk_ptr + rows * key_width + head, tl.sum(grad_k, 1), (rows >= 0) & (rows < seq_len))
    else:
        _add(dk_ptr, grad_k, rows, channels, seq_len, dim)


@triton.jit
def _time(steps, seq_len, REVERSE: tl.constexpr):
    """Positions of scan steps: a reverse scan runs forwards over time reversed."""
    if REVERSE:
        return seq_len - 1 - steps
    return steps


@triton.jit
def _scan_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, ratio_ptr, seq_len, dim, head_dim, key_width,
    REVERSE: tl.constexpr, KEY_PER_HEAD: tl.constexpr, WRITE_OUT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """lse_t and r_t over the keys t' ≤ t (t' ≥ t when REVERSE) at every t; σ(q) ⊙ r too if WRITE_OUT."""
    batch = tl.program_id(1)
    head, channels = _channels(tl.program_id(0), dim, head_dim, BLOCK_D)
    key_columns = _key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = slice_offset(batch, seq_len, dim)
    q_ptr, v_ptr, out_ptr = q_ptr + offset, v_ptr + offset, out_ptr + offset
    lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
    k_ptr += slice_offset(batch, seq_len, key_width)
    mask_ptr += slice_offset(batch, seq_len, 1)
    local = tl.arange(0, BLOCK_T)
    carry_lse = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    carry_ratio = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        steps = start + local
        rows = _time(steps, seq_len, REVERSE)
        keys = _keys(k_ptr, mask_ptr, rows, key_columns, seq_len, key_width, HAS_MASK)
        # lse one step back from a scan of the keys shifted by a step, then lse elementwise.
        before = _keys(
            k_ptr, mask_ptr, _time(steps - 1, seq_len, REVERSE), key_columns, seq_len, key_width, HAS_MASK
        )
        before = tl.where(local[:, None] == 0, float("-inf"), before)
        previous = logaddexp(carry_lse[None, :], tl.associative_scan(before, 0, logaddexp))
        lse = logaddexp(previous, keys)
        decay = exp_difference(previous, lse)
        values = _load(v_ptr, rows, channels, seq_len, dim, 0.0)
        gains, ratio = tl.associative_scan((decay, exp_difference(keys, lse) * values), 0, linear_combine)
        ratio = ratio + gains * carry_ratio[None, :]
        if WRITE_OUT:
            queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
            _store(out_ptr, tl.sigmoid(queries) * ratio, rows, channels, seq_len, dim)
        _store(lse_ptr, lse, rows, channels, seq_len, dim)
        _store(ratio_ptr, ratio, rows, channels, seq_len, dim)
        carry_lse = row_of(lse, local, BLOCK_T - 1)
        carry_ratio = row_of(ratio, local, BLOCK_T - 1)


@triton.jit
def _scan_backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, scan_lse_ptr, lse_ptr, ratio_ptr, dq_ptr, dk_ptr, dv_ptr,
    seq_len, dim, head_dim, key_width, shift,
    REVERSE: tl.constexpr, KEY_PER_HEAD: tl.constexpr, WHOLE_OP: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The scan's share of dk and dv. Key t' reaches the output row t of scan step τ + shift through the
    scan's lse P_τ (t' ≤ τ in scan order), with weight e^(k_t' − P_τ) · e^(P_τ − lse_t), each ≤ 1. With
    a_τ = g_t σ(q_t) e^(P_τ − lse_t): dv_t' = e^(k_t' − P_t') R_t' and
    dk_t' = e^(k_t' − P_t') (v_t' R_t' − Q_t'), where R_τ = Σ_{τ' ≥ τ} e^(P_τ − P_τ') a_τ' and Q_τ likewise
    of a r_t, chained backwards in scan order. WHOLE_OP (AFT-simple: shift 0, the scan is the op): stores
    dq, dk and dv; otherwise adds dk and dv into float32 buffers."""
    batch = tl.program_id(1)
    head, channels = _channels(tl.program_id(0), dim, head_dim, BLOCK_D)
    key_columns = _key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = slice_offset(batch, seq_len, dim)
    grad_ptr, q_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, v_ptr + offset
    scan_lse_ptr, lse_ptr, ratio_ptr = scan_lse_ptr + offset, lse_ptr + offset, ratio_ptr + offset
    dq_ptr, dv_ptr = dq_ptr + offset, dv_ptr + offset
    k_ptr += slice_offset(batch, seq_len, key_width)
    dk_ptr += slice_offset(batch, seq_len, key_width)
    mask_ptr += slice_offset(batch, seq_len, 1)
    local = tl.arange(0, BLOCK_T)
    carry_r = tl.zeros((BLOCK_D,), tl.float32)
    carry_q = tl.zeros((BLOCK_D,), tl.float32)
    blocks = tl.cdiv(seq_len, BLOCK_T)
    for index in range(0, blocks):  # the blocks in reverse, by an ascending loop (scf.for's own form)
        steps = (blocks - 1 - index) * BLOCK_T + local
        rows = _time(steps, seq_len, REVERSE)
        scan_lse = _load(scan_lse_ptr, rows, channels, seq_len, dim, float("-inf"))
        following = _load(
            scan_lse_ptr, _time(steps + 1, seq_len, REVERSE), channels, seq_len, dim, float("inf")
        )
        decay = exp_difference(scan_lse, following)
        out_rows = _time(steps + shift, seq_len, REVERSE)
        lse = _load(lse_ptr, out_rows, channels, seq_len, dim, float("inf"))  # no such row: weight 0
        queries = _load(q_ptr, out_rows, channels, seq_len, dim, 0.0)
        grad = _load(grad_ptr, out_rows, channels, seq_len, dim, 0.0)
        ratio = _load(ratio_ptr, out_rows, channels, seq_len, dim, 0.0)
        adjoint = grad * tl.sigmoid(queries) * exp_difference(scan_lse, lse)
        gains, r_sum = tl.associative_scan((decay, adjoint), 0, linear_combine, reverse=True)
        _, q_sum = tl.associative_scan((decay, adjoint * ratio), 0, linear_combine, reverse=True)
        r_sum = r_sum + gains * carry_r[None, :]
        q_sum = q_sum + gains * carry_q[None, :]
        weights = exp_difference(
            _keys(k_ptr, mask_ptr, rows, key_columns, seq_len, key_width, HAS_MASK), scan_lse
        )
        values = _load(v_ptr, rows, channels, seq_len, dim, 0.0)
        grad_k = weights * (values * r_sum - q_sum)
        if WHOLE_OP:
            _store(dv_ptr, weights * r_sum, rows, channels, seq_len, dim)
            _store(dk_ptr, grad_k, rows, channels, seq_len, dim)
            sigmoid = tl.sigmoid(queries)
            _store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio, rows, channels, seq_len, dim)
        else:
            _add(dv_ptr, weights * r_sum, rows, channels, seq_len, dim)
            _add_key_grad(dk_ptr, grad_k, rows, head, channels, seq_len, dim, key_width, KEY_PER_HEAD)
        carry_r = row_of(r_sum, local, 0)
        carry_q = row_of(q_sum, local, 0)


@triton.jit
def _global_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, ratio_ptr, seq_len, dim,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Bidirectional AFT-simple: one online log-sum-exp and r per channel, then σ(q) ⊙ r at every row."""
    batch = tl.program_id(1)
    _, channels = _channels(tl.program_id(0), dim, dim, BLOCK_D)
    offset = slice_offset(batch, seq_len, dim)
    q_ptr, k_ptr, v_ptr, out_ptr = q_ptr + offset, k_ptr + offset, v_ptr + offset, out_ptr + offset
    mask_ptr += slice_offset(batch, seq_len, 1)
    local = tl.arange(0, BLOCK_T)
    top = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_D,), tl.float32)
    weighted = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        keys = _keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK)
        new_top = tl.maximum(top, tl.max(keys, 0))
        rescale = exp_difference(top, new_top)
        weights = exp_difference(keys, new_top[None, :])
        values = _load(v_ptr, rows, channels, seq_len, dim, 0.0)
        total = total * rescale + tl.sum(weights, 0)
        weighted = weighted * rescale + tl.sum(weights * values, 0)
        top = new_top
    total = tl.where(channels < dim, total, 1.0)  # channels past dim: nothing to divide
    ratio = weighted / total
    tl.store(lse_ptr + slice_offset(batch, dim, 1) + channels, top + tl.log(total), channels < dim)
    tl.store(ratio_ptr + slice_offset(batch, dim, 1) + channels, ratio, channels < dim)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
        _store(out_ptr, tl.sigmoid(queries) * ratio[None, :], rows, channels, seq_len, dim)


@triton.jit
def _global_backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, lse_ptr, ratio_ptr, dq_ptr, dk_ptr, dv_ptr, seq_len, dim,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """With A = Σ_t g_t σ(q_t): dv_t' = e^(k_t' − lse) A, dk_t' = e^(k_t' − lse) A (v_t' − r)."""
    batch = tl.program_id(1)
    _, channels = _channels(tl.program_id(0), dim, dim, BLOCK_D)
    offset = slice_offset(batch, seq_len, dim)
    grad_ptr, q_ptr, k_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, k_ptr + offset, v_ptr + offset
    dq_ptr, dk_ptr, dv_ptr = dq_ptr + offset, dk_ptr + offset, dv_ptr + offset
    mask_ptr += slice_offset(batch, seq_len, 1)
    local = tl.arange(0, BLOCK_T)
    lse = tl.load(lse_ptr + slice_offset(batch, dim, 1) + channels, channels < dim, 0.0)
    ratio = tl.load(ratio_ptr + slice_offset(batch, dim, 1) + channels, channels < dim, 0.0)
    adjoint_sum = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
        grad = _load(grad_ptr, rows, channels, seq_len, dim, 0.0)
        sigmoid = tl.sigmoid(queries)
        adjoint_sum += tl.sum(grad * sigmoid, 0)
        _store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio[None, :], rows, channels, seq_len, dim)
    for start in range(0, seq_len, BLOCK_T):
        rows = start + local
        keys = _keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK)
        weights = exp_difference(keys, lse[None, :]) * adjoint_sum[None, :]
        values = _load(v_ptr, rows, channels, seq_len, dim, 0.0)
        _store(dv_ptr, weights, rows, channels, seq_len, dim)
        _store(dk_ptr, weights * (values - ratio[None, :]), rows, channels, seq_len, dim)


def _scan_grid(batch: int, dim: int, heads: int) -> tuple[tuple[int, int], dict[str, int]]:
    head_dim = dim // heads
    blocks = {"BLOCK_T": 16 if interpreting() else 64, "BLOCK_D": min(64, triton.next_power_of_2(head_dim))}
    blocks["num_warps"] = 8  # the scans' tuples spill registers at 4 (ptxas, sm_90a)
    return (heads * triton.cdiv(head_dim, blocks["BLOCK_D"]), batch), blocks


@torch.library.custom_op("tokenmix::aft_simple", mutates_args=())
def aft_simple_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, N, D); key_mask: (B, N) bool or None. Returns the output (B, N, D) in the inputs'
    dtype and, for the backward, lse and r in float32: (B, N, D) when causal, (B, 1, D) otherwise."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, seq_len, dim = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty(batch, seq_len if causal else 1, dim, dtype=torch.float32)
    ratio = torch.empty_like(lse)
    grid, blocks = _scan_grid(batch, dim, 1)
    mask, has_mask = int8_mask(q, key_mask), key_mask is not None
    if causal:
        _scan_forward_kernel[grid](
            q, k, v, mask, out, lse, ratio, seq_len, dim, dim, dim, REVERSE=False, KEY_PER_HEAD=False,
            WRITE_OUT=True, HAS_MASK=has_mask, **blocks,
        )  # fmt: skip
    else:
        _global_forward_kernel[grid](
            q, k, v, mask, out, lse, ratio, seq_len, dim, HAS_MASK=has_mask, **blocks
        )
    return out, lse, ratio


@aft_simple_forward.register_fake
def _(q, k, v, key_mask, causal):
    rows = q.shape[1] if causal else 1
    state = q.new_empty(q.shape[0], rows, q.shape[2], dtype=torch.float32)
    return torch.empty_like(q), state, torch.empty_like(state)


@torch.library.custom_op("tokenmix::aft_simple_backward", mutates_args=())
def aft_simple_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    lse: torch.Tensor,
    ratio: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    batch, seq_len, dim = q.shape
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid, blocks = _scan_grid(batch, dim, 1)
    mask, has_mask = int8_mask(q, key_mask), key_mask is not None
    if causal:  # the scan is the whole op: its lse and r are the output rows'
        _scan_backward_kernel[grid](
            grad_out, q, k, v, mask, lse, lse, ratio, grad_q, grad_k, grad_v, seq_len, dim, dim, dim, 0,
            REVERSE=False, KEY_PER_HEAD=False, WHOLE_OP=True, HAS_MASK=has_mask, **blocks,
        )  # fmt: skip
    else:
        _global_backward_kernel[grid](
            grad_out, q, k, v, mask, lse, ratio, grad_q, grad_k, grad_v, seq_len, dim, HAS_MASK=has_mask,
            **blocks,
        )  # fmt: skip
    return grad_q, grad_k, grad_v


@aft_simple_backward.register_fake
def _(grad_out, q, k, v, key_mask, lse, ratio, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, causal = inputs
    _, lse, ratio = output
    ctx.save_for_backward(q, k, v, key_mask, lse, ratio)
    ctx.causal = causal


def _backward(ctx, grad_out, grad_lse, grad_ratio):
    q, k, v, key_mask, lse, ratio = ctx.saved_tensors
    return (*aft_simple_backward(grad_out, q, k, v, key_mask, lse, ratio, ctx.causal), None, None)


aft_simple_forward.register_autograd(_backward, setup_context=_setup_context)


def aft_simple(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    return aft_simple_forward(q, k, v, key_mask, causal)[0]


# --------------------------------------------------------------------------------------------------
# AFT-local and AFT-conv: the keys beyond a window from two scans, the window's biased keys as a band
# --------------------------------------------------------------------------------------------------


@triton.jit
def _absorb(top, total, weighted, scores, values):
    """Folds terms e^(scores) with values into a running (max, Σ e^(s − max), Σ e^(s − max) v)."""
    new_top = tl.maximum(top, scores)
    rescale = exp_difference(top, new_top)
    weights = exp_difference(scores, new_top)
    return new_top, total * rescale + weights, weighted * rescale + weights * values


@triton.jit
def _finish_rows(top, total, weighted, q_ptr, out_ptr, lse_ptr, ratio_ptr, rows, channels, seq_len, dim):
    """Stores σ(q) ⊙ r, lse and r of rows from their running (max, Σ e^(s − max), Σ e^(s − max) v); a row
    with no real key outputs 0."""
    sees = total > 0
    ratio = tl.where(sees, weighted / tl.where(sees, total, 1.0), 0.0)
    lse = tl.where(sees, top + tl.log(tl.where(sees, total, 1.0)), float("-inf"))
    queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
    _store(out_ptr, tl.sigmoid(queries) * ratio, rows, channels, seq_len, dim)
    _store(lse_ptr, lse, rows, channels, seq_len, dim)
    _store(ratio_ptr, ratio, rows, channels, seq_len, dim)


@triton.jit
def _band_pointers(band_ptr, rows, head, index, row_stride, head_stride):
    return band_ptr + rows * row_stride + head * head_stride + index


@triton.jit
def _band_forward_kernel(
    q_ptr, k_ptr, v_ptr, band_ptr, mask_ptr, prefix_lse_ptr, prefix_ratio_ptr, suffix_lse_ptr,
    suffix_ratio_ptr, out_ptr, lse_ptr, ratio_ptr,
    seq_len, dim, head_dim, key_width, window, first, last, band_row_stride, band_head_stride,
    CAUSAL: tl.constexpr, KEY_PER_HEAD: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A block of rows t: the unbiased keys beyond the window from the prefix scan's row t − window (and
    the suffix scan's row t + window), then the keys t + j, j ∈ [first, last], each biased by
    band[t, head, j + window − 1]."""
    block, batch = tl.program_id(0), tl.program_id(2)
    head, channels = _channels(tl.program_id(1), dim, head_dim, BLOCK_D)
    key_columns = _key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = slice_offset(batch, seq_len, dim)
    q_ptr, v_ptr, out_ptr = q_ptr + offset, v_ptr + offset, out_ptr + offset
    lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
    prefix_lse_ptr, prefix_ratio_ptr = prefix_lse_ptr + offset, prefix_ratio_ptr + offset
    suffix_lse_ptr, suffix_ratio_ptr = suffix_lse_ptr + offset, suffix_ratio_ptr + offset
    k_ptr += slice_offset(batch, seq_len, key_width)
    mask_ptr += slice_offset(batch, seq_len, 1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    top = tl.full((BLOCK_M, BLOCK_D), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    weighted = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    top, total, weighted = _absorb(
        top, total, weighted,
        _load(prefix_lse_ptr, rows - window, channels, seq_len, dim, float("-inf")),
        _load(prefix_ratio_ptr, rows - window, channels, seq_len, dim, 0.0),
    )  # fmt: skip
    if not CAUSAL:
        top, total, weighted = _absorb(
            top, total, weighted,
            _load(suffix_lse_ptr, rows + window, channels, seq_len, dim, float("-inf")),
            _load(suffix_ratio_ptr, rows + window, channels, seq_len, dim, 0.0),
        )  # fmt: skip
    for shift in range(first, last + 1):
        columns = rows + shift
        keys = _keys(k_ptr, mask_ptr, columns, key_columns, seq_len, key_width, HAS_MASK)
        bias_ptr = _band_pointers(band_ptr, rows, head, shift + window - 1, band_row_stride, band_head_stride)
        bias = tl.load(bias_ptr, (rows >= 0) & (rows < seq_len), 0.0).to(tl.float32)
        values = _load(v_ptr, columns, channels, seq_len, dim, 0.0)
        top, total, weighted = _absorb(top, total, weighted, keys + bias[:, None], values)
    _finish_rows(top, total, weighted, q_ptr, out_ptr, lse_ptr, ratio_ptr, rows, channels, seq_len, dim)


@triton.jit
def _band_backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, band_ptr, mask_ptr, lse_ptr, ratio_ptr, dq_ptr, dk_ptr, dv_ptr,
    dband_ptr, seq_len, dim, head_dim, key_width, window, first, last, band_row_stride, band_head_stride,
    KEY_PER_HEAD: tl.constexpr, BAND_PER_ROW: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A block of keys t', over the rows t = t' − j whose window holds them. With a_t = g_t σ(q_t) and
    p = e^(k_t' + band_tj − lse_t): dv_t' += Σ p a, dk_t' += Σ p a (v_t' − r_t), dband_tj += Σ_channels
    p a (v_t' − r_t) (atomically, across batches and channel blocks, and over rows for a band shared by
    the rows). Also dq_t' = g σ'(q) r."""
    block, batch = tl.program_id(0), tl.program_id(2)
    head, channels = _channels(tl.program_id(1), dim, head_dim, BLOCK_D)
    key_columns = _key_columns(head, channels, dim, key_width, KEY_PER_HEAD)
    offset = slice_offset(batch, seq_len, dim)
    grad_ptr, q_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, v_ptr + offset
    lse_ptr, ratio_ptr, dq_ptr, dv_ptr = (
        lse_ptr + offset,
        ratio_ptr + offset,
        dq_ptr + offset,
        dv_ptr + offset,
    )
    k_ptr += slice_offset(batch, seq_len, key_width)
    dk_ptr += slice_offset(batch, seq_len, key_width)
    mask_ptr += slice_offset(batch, seq_len, 1)
    columns = block * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = _keys(k_ptr, mask_ptr, columns, key_columns, seq_len, key_width, HAS_MASK)
    values = _load(v_ptr, columns, channels, seq_len, dim, 0.0)
    grad_k = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    grad_v = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for shift in range(first, last + 1):
        rows = columns - shift
        inside = (rows >= 0) & (rows < seq_len) & (columns < seq_len)
        bias_ptr = _band_pointers(band_ptr, rows, head, shift + window - 1, band_row_stride, band_head_stride)
        bias = tl.load(bias_ptr, inside, 0.0).to(tl.float32)
        lse = _load(lse_ptr, rows, channels, seq_len, dim, float("inf"))  # no such row: weight 0
        adjoint = _load(grad_ptr, rows, channels, seq_len, dim, 0.0) * tl.sigmoid(
            _load(q_ptr, rows, channels, seq_len, dim, 0.0)
        )
        carried = exp_difference(keys + bias[:, None], lse) * adjoint
        grad_v += carried
        grad_scores = carried * (values - _load(ratio_ptr, rows, channels, seq_len, dim, 0.0))
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
    _add(dv_ptr, grad_v, columns, channels, seq_len, dim)
    _add_key_grad(dk_ptr, grad_k, columns, head, channels, seq_len, dim, key_width, KEY_PER_HEAD)
    sigmoid = tl.sigmoid(_load(q_ptr, columns, channels, seq_len, dim, 0.0))
    grad = _load(grad_ptr, columns, channels, seq_len, dim, 0.0)
    ratio = _load(ratio_ptr, columns, channels, seq_len, dim, 0.0)
    _store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio, columns, channels, seq_len, dim)


def _band_layout(q, k, band, window, causal):
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
    grid = (triton.cdiv(seq_len, block_m), channel_programs, batch)
    sizes = (seq_len, dim, head_dim, key_width, window, first, last)
    strides = (band.stride(0) if band.shape[0] > 1 else 0, band.stride(1) if heads > 1 else 0)
    return grid, blocks, sizes, strides, {"KEY_PER_HEAD": key_width != dim}


def _scan(q, k, v, mask, key_mask, heads, reverse):
    """The scan's (lse, r), float32 (B, N, D)."""
    batch, seq_len, dim = q.shape
    lse = q.new_empty(q.shape, dtype=torch.float32)
    ratio = torch.empty_like(lse)
    grid, blocks = _scan_grid(batch, dim, heads)
    _scan_forward_kernel[grid](  # no output (WRITE_OUT=False): q stands in for its pointer
        q, k, v, mask, q, lse, ratio, seq_len, dim, dim // heads, k.shape[-1], REVERSE=reverse,
        KEY_PER_HEAD=k.shape[-1] != dim, WRITE_OUT=False, HAS_MASK=key_mask is not None, **blocks,
    )  # fmt: skip
    return lse, ratio


@torch.library.custom_op("tokenmix::aft_banded", mutates_args=())
def aft_banded_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band: torch.Tensor,
    key_mask: torch.Tensor | None,
    window: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AFT with biases on a band: q, v (B, N, D); k (B, N, D), or (B, N, H) with one key per head of
    D / H channels; band (N or 1, H or 1, J): the bias of key t + j for row t is band[t, h, j + window − 1]
    for j in (−window, window) (in (−window, 0] when causal), and 0 beyond. key_mask: (B, N) bool or None.
    Returns the output in the inputs' dtype and, for the backward, float32 lse and r of the rows and the
    lse of the prefix and suffix scans (the suffix's empty when causal), (B, N, D) each."""
    q, k, v, band = q.contiguous(), k.contiguous(), v.contiguous(), band.contiguous()
    mask, heads = int8_mask(q, key_mask), band.shape[1]
    prefix_lse, prefix_ratio = _scan(q, k, v, mask, key_mask, heads, reverse=False)
    if causal:  # no suffix: the kernels never read it
        suffix_lse, suffix_ratio = q.new_empty(0, dtype=torch.float32), prefix_ratio
    else:
        suffix_lse, suffix_ratio = _scan(q, k, v, mask, key_mask, heads, reverse=True)
    out = torch.empty_like(q)
    lse, ratio = torch.empty_like(prefix_lse), torch.empty_like(prefix_lse)
    grid, blocks, sizes, strides, flags = _band_layout(q, k, band, window, causal)
    _band_forward_kernel[grid](
        q, k, v, band, mask, prefix_lse, prefix_ratio, suffix_lse, suffix_ratio, out, lse, ratio, *sizes,
        *strides, CAUSAL=causal, HAS_MASK=key_mask is not None, **flags, **blocks,
    )  # fmt: skip
    return out, lse, ratio, prefix_lse, suffix_lse


@aft_banded_forward.register_fake
def _(q, k, v, band, key_mask, window, causal):
    state = q.new_empty(q.shape, dtype=torch.float32)
    suffix = q.new_empty(0, dtype=torch.float32) if causal else torch.empty_like(state)
    return torch.empty_like(q), state, torch.empty_like(state), torch.empty_like(state), suffix


@torch.library.custom_op("tokenmix::aft_banded_backward", mutates_args=())
def aft_banded_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, band = q.contiguous(), k.contiguous(), v.contiguous(), band.contiguous()
    grad_out = grad_out.contiguous()
    mask = int8_mask(q, key_mask)
    grad_q = torch.empty_like(q)
    grad_k, grad_v, grad_band = (
        torch.zeros(x.shape, device=x.device, dtype=torch.float32) for x in (k, v, band)
    )
    grid, blocks, sizes, strides, flags = _band_layout(q, k, band, window, causal)
    _band_backward_kernel[grid](
        grad_out, q, k, v, band, mask, lse, ratio, grad_q, grad_k, grad_v, grad_band, *sizes, *strides,
        BAND_PER_ROW=band.shape[0] > 1, HAS_MASK=key_mask is not None, **flags, **blocks,
    )  # fmt: skip
    scan_grid, scan_blocks = _scan_grid(q.shape[0], q.shape[-1], band.shape[1])
    scan_sizes = sizes[:5]  # seq_len, dim, head_dim, key_width, and window as the scans' shift
    for reverse, scan_lse in ((False, prefix_lse), (True, suffix_lse))[: 1 if causal else 2]:
        _scan_backward_kernel[scan_grid](
            grad_out, q, k, v, mask, scan_lse, lse, ratio, grad_q, grad_k, grad_v, *scan_sizes,
            REVERSE=reverse, WHOLE_OP=False, HAS_MASK=key_mask is not None, **flags, **scan_blocks,
        )  # fmt: skip
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_band.to(band.dtype)


@aft_banded_backward.register_fake
def _(grad_out, q, k, v, band, key_mask, lse, ratio, prefix_lse, suffix_lse, window, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(band)


def _banded_setup_context(ctx, inputs, output):
    q, k, v, band, key_mask, window, causal = inputs
    _, lse, ratio, prefix_lse, suffix_lse = output
    ctx.save_for_backward(q, k, v, band, key_mask, lse, ratio, prefix_lse, suffix_lse)
    ctx.options = (window, causal)


def _banded_backward(ctx, grad_out, *unused):
    grads = aft_banded_backward(grad_out, *ctx.saved_tensors, *ctx.options)
    return (*grads, None, None, None)


aft_banded_forward.register_autograd(_banded_backward, setup_context=_banded_setup_context)


def aft_banded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band: torch.Tensor,
    key_mask: torch.Tensor | None,
    window: int,
    causal: bool,
) -> torch.Tensor:
    return aft_banded_forward(q, k, v, band, key_mask, window, causal)[0]


# --------------------------------------------------------------------------------------------------
# AFT-full: y_td = σ(q_td) Σ_t' e^(w_tt' + k_t'd − lse_td) v_t'd, tiled over (rows, keys, channels)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _scores(w_ptr, k_ptr, mask_ptr, rows, columns, channels, seq_len, dim, table, CAUSAL, HAS_MASK):
    """(M, N, D) tile of w_{t,t'} + k_{t',d}: −inf for keys outside the sequence, padded, or (causal)
    after the row."""
    keys = _keys(k_ptr, mask_ptr, columns, channels, seq_len, dim, HAS_MASK)  # (N, D)
    inside = (rows[:, None] < seq_len) & (columns[None, :] < seq_len)
    if CAUSAL:
        inside = inside & (columns[None, :] <= rows[:, None])
    bias = tl.load(w_ptr + rows[:, None].to(tl.int64) * table + columns[None, :], inside, 0.0).to(tl.float32)
    bias = tl.where(inside, bias, float("-inf"))
    return bias[:, :, None] + keys[None, :, :]


@triton.jit
def _full_forward_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, mask_ptr, out_ptr, lse_ptr, ratio_ptr, seq_len, dim, table,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (row block, channel block, batch): an online joint maximum per (row, channel), as online
    softmax keeps one per row, so no product of separately shifted exponentials can underflow."""
    block, batch = tl.program_id(0), tl.program_id(2)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offset = slice_offset(batch, seq_len, dim)
    q_ptr, k_ptr, v_ptr, out_ptr = q_ptr + offset, k_ptr + offset, v_ptr + offset, out_ptr + offset
    lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
    mask_ptr += slice_offset(batch, seq_len, 1)
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
        values = _load(v_ptr, columns, channels, seq_len, dim, 0.0)
        total = total * rescale + tl.sum(weights, 1)
        weighted = weighted * rescale + tl.sum(weights * values[None, :, :], 1)
        top = new_top
    _finish_rows(top, total, weighted, q_ptr, out_ptr, lse_ptr, ratio_ptr, rows, channels, seq_len, dim)


@triton.jit
def _full_backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, w_ptr, mask_ptr, lse_ptr, ratio_ptr, dk_ptr, dv_ptr, dw_ptr,
    seq_len, dim, table,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (key block, channel block, batch), over the rows that see it, with a_td = g_td σ(q_td) and
    p = e^(w + k − lse): dv_t'd = Σ_t p a, dk_t'd = Σ_t p a (v_t'd − r_td), dw_tt' += Σ_d p a (v − r)
    (added atomically across channel blocks and batches)."""
    block, batch = tl.program_id(0), tl.program_id(2)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offset = slice_offset(batch, seq_len, dim)
    grad_ptr, q_ptr, k_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, k_ptr + offset, v_ptr + offset
    lse_ptr, ratio_ptr, dk_ptr, dv_ptr = (
        lse_ptr + offset,
        ratio_ptr + offset,
        dk_ptr + offset,
        dv_ptr + offset,
    )
    mask_ptr += slice_offset(batch, seq_len, 1)
    columns = block * BLOCK_N + tl.arange(0, BLOCK_N)
    values = _load(v_ptr, columns, channels, seq_len, dim, 0.0)
    grad_k = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    first = (block * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start in range(first, seq_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        scores = _scores(
            w_ptr, k_ptr, mask_ptr, rows, columns, channels, seq_len, dim, table, CAUSAL, HAS_MASK
        )
        lse = _load(lse_ptr, rows, channels, seq_len, dim, float("-inf"))
        weights = exp_difference(scores, lse[:, None, :])  # (M, N, D); 0 for rows that see no key
        queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
        adjoint = _load(grad_ptr, rows, channels, seq_len, dim, 0.0) * tl.sigmoid(queries)
        ratio = _load(ratio_ptr, rows, channels, seq_len, dim, 0.0)
        carried = weights * adjoint[:, None, :]
        grad_v += tl.sum(carried, 0)
        grad_scores = carried * (values[None, :, :] - ratio[:, None, :])
        grad_k += tl.sum(grad_scores, 0)
        inside = (rows[:, None] < seq_len) & (columns[None, :] < seq_len)
        tl.atomic_add(
            dw_ptr + rows[:, None].to(tl.int64) * table + columns[None, :], tl.sum(grad_scores, 2), inside
        )
    _store(dk_ptr, grad_k, columns, channels, seq_len, dim)
    _store(dv_ptr, grad_v, columns, channels, seq_len, dim)


def _full_blocks(dim: int) -> dict[str, int]:
    small = 16
    return {"BLOCK_M": small, "BLOCK_N": small, "BLOCK_D": min(32, triton.next_power_of_2(dim))}


@torch.library.custom_op("tokenmix::aft_full", mutates_args=())
def aft_full_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, N, D); w: (N_max, N_max) with N ≤ N_max; key_mask: (B, N) bool or None. Returns the
    output in the inputs' dtype and, for the backward, lse and r (B, N, D) in float32."""
    q, k, v, w = q.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    batch, seq_len, dim = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty(batch, seq_len, dim, dtype=torch.float32)
    ratio = torch.empty_like(lse)
    blocks = _full_blocks(dim)
    grid = (triton.cdiv(seq_len, blocks["BLOCK_M"]), triton.cdiv(dim, blocks["BLOCK_D"]), batch)
    _full_forward_kernel[grid](
        q, k, v, w, int8_mask(q, key_mask), out, lse, ratio, seq_len, dim, w.shape[1], CAUSAL=causal,
        HAS_MASK=key_mask is not None, **blocks,
    )  # fmt: skip
    return out, lse, ratio


@aft_full_forward.register_fake
def _(q, k, v, w, key_mask, causal):
    state = q.new_empty(q.shape, dtype=torch.float32)
    return torch.empty_like(q), state, torch.empty_like(state)


@torch.library.custom_op("tokenmix::aft_full_backward", mutates_args=())
def aft_full_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    key_mask: torch.Tensor | None,
    lse: torch.Tensor,
    ratio: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, w, grad_out = (
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        w.contiguous(),
        grad_out.contiguous(),
    )
    batch, seq_len, dim = q.shape
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
    blocks = _full_blocks(dim)
    grid = (triton.cdiv(seq_len, blocks["BLOCK_N"]), triton.cdiv(dim, blocks["BLOCK_D"]), batch)
    _full_backward_kernel[grid](
        grad_out, q, k, v, w, int8_mask(q, key_mask), lse, ratio, grad_k, grad_v, grad_w,
        seq_len, dim, w.shape[1], CAUSAL=causal, HAS_MASK=key_mask is not None, **blocks,
    )  # fmt: skip
    sigmoid = torch.sigmoid(q.float())
    grad_q = (grad_out.float() * sigmoid * (1 - sigmoid) * ratio).to(q.dtype)
    return grad_q, grad_k, grad_v, grad_w.to(w.dtype)


@aft_full_backward.register_fake
def _(grad_out, q, k, v, w, key_mask, lse, ratio, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w)


def _full_setup_context(ctx, inputs, output):
    q, k, v, w, key_mask, causal = inputs
    _, lse, ratio = output
    ctx.save_for_backward(q, k, v, w, key_mask, lse, ratio)
    ctx.causal = causal


def _full_backward(ctx, grad_out, grad_lse, grad_ratio):
    q, k, v, w, key_mask, lse, ratio = ctx.saved_tensors
    return (*aft_full_backward(grad_out, q, k, v, w, key_mask, lse, ratio, ctx.causal), None, None)


aft_full_forward.register_autograd(_full_backward, setup_context=_full_setup_context)


def aft_full(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    return aft_full_forward(q, k, v, w, key_mask, causal)[0]
