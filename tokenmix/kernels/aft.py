"""AFT-simple as one pass over time: y_t = σ(q_t) ⊙ r_t, r_t = Σ_{t'∈S(t)} e^(k_t' − lse_t) v_t'.

Causal: lse_t = log Σ_{t'≤t} e^(k_t') is a running log-sum-exp (a per-row running maximum, so no row's
keys underflow however far below the sequence maximum they lie), and r_t follows the stable recurrence
r_t = e^(lse_{t−1} − lse_t) r_{t−1} + e^(k_t − lse_t) v_t, both as associative scans over time blocks.
The backward runs the adjoint recurrence in reverse. Bidirectional: one online log-sum-exp per channel.
Programs: one per (batch, block of channels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ._common import exp_difference, int8_mask, last_row, linear_combine, load_rows, logaddexp, store_rows


@triton.jit
def _load(ptr, rows, channels, seq_len, dim, other):
    return load_rows(ptr, rows, channels, seq_len, dim, dim, other).to(tl.float32)


@triton.jit
def _keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK: tl.constexpr):
    """Keys (float32) with −inf outside the sequence and at padding."""
    keys = _load(k_ptr, rows, channels, seq_len, dim, float("-inf"))
    if HAS_MASK:
        real = tl.load(mask_ptr + rows, (rows < seq_len) & (rows >= 0), 0)
        keys = tl.where(real[:, None] != 0, keys, float("-inf"))
    return keys


@triton.jit
def _store(ptr, x, rows, channels, seq_len, dim):
    store_rows(ptr, x, rows, channels, seq_len, dim, dim)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, ratio_ptr, seq_len, dim,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(1)
    channels = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offset = batch * seq_len * dim
    q_ptr, k_ptr, v_ptr, out_ptr = q_ptr + offset, k_ptr + offset, v_ptr + offset, out_ptr + offset
    mask_ptr += batch * seq_len
    local = tl.arange(0, BLOCK_T)
    if CAUSAL:
        lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
        carry_lse = tl.full((BLOCK_D,), float("-inf"), tl.float32)
        carry_ratio = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, seq_len, BLOCK_T):
            rows = start + local
            keys = _keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK)
            # lse_{t−1} from a scan of the keys one row back, then lse_t elementwise.
            before = _keys(k_ptr, mask_ptr, rows - 1, channels, seq_len, dim, HAS_MASK)
            before = tl.where(local[:, None] == 0, float("-inf"), before)
            previous = logaddexp(carry_lse[None, :], tl.associative_scan(before, 0, logaddexp))
            lse = logaddexp(previous, keys)
            decay = exp_difference(previous, lse)
            values = _load(v_ptr, rows, channels, seq_len, dim, 0.0)
            gains, ratio = tl.associative_scan((decay, exp_difference(keys, lse) * values), 0, linear_combine)
            ratio = ratio + gains * carry_ratio[None, :]
            queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
            _store(out_ptr, tl.sigmoid(queries) * ratio, rows, channels, seq_len, dim)
            _store(lse_ptr, lse, rows, channels, seq_len, dim)
            _store(ratio_ptr, ratio, rows, channels, seq_len, dim)
            carry_lse = last_row(lse, local, BLOCK_T)
            carry_ratio = last_row(ratio, local, BLOCK_T)
    else:
        lse_ptr, ratio_ptr = lse_ptr + batch * dim, ratio_ptr + batch * dim
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
        tl.store(lse_ptr + channels, top + tl.log(total), channels < dim)
        tl.store(ratio_ptr + channels, ratio, channels < dim)
        for start in range(0, seq_len, BLOCK_T):
            rows = start + local
            queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
            _store(out_ptr, tl.sigmoid(queries) * ratio[None, :], rows, channels, seq_len, dim)


@triton.jit
def _backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, lse_ptr, ratio_ptr, dq_ptr, dk_ptr, dv_ptr, seq_len, dim,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """With a_t = g_t σ(q_t): dv_t' = e^(k_t' − lse_t') R_t', dk_t' = e^(k_t' − lse_t') (v_t' R_t' − Q_t'),
    where R_t' = Σ_{t∈T(t')} e^(lse_t' − lse_t) a_t and Q_t' likewise of a_t r_t (T(t'): rows that see
    t'). Causal: the factors e^(lse_t' − lse_t) ≤ 1 chain backwards in time."""
    batch = tl.program_id(1)
    channels = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offset = batch * seq_len * dim
    grad_ptr, q_ptr, k_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, k_ptr + offset, v_ptr + offset
    dq_ptr, dk_ptr, dv_ptr = dq_ptr + offset, dk_ptr + offset, dv_ptr + offset
    mask_ptr += batch * seq_len
    local = tl.arange(0, BLOCK_T)
    if CAUSAL:
        lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
        carry_r = tl.zeros((BLOCK_D,), tl.float32)
        carry_q = tl.zeros((BLOCK_D,), tl.float32)
        for block in range(tl.cdiv(seq_len, BLOCK_T) - 1, -1, -1):
            rows = block * BLOCK_T + local
            lse = _load(lse_ptr, rows, channels, seq_len, dim, float("-inf"))
            following = _load(lse_ptr, rows + 1, channels, seq_len, dim, float("inf"))
            decay = tl.where(rows[:, None] + 1 < seq_len, exp_difference(lse, following), 0.0)
            ratio = _load(ratio_ptr, rows, channels, seq_len, dim, 0.0)
            queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
            adjoint = _load(grad_ptr, rows, channels, seq_len, dim, 0.0) * tl.sigmoid(queries)
            adjoint = tl.where(lse == float("-inf"), 0.0, adjoint)  # a row with no key outputs 0
            gains, r_sum = tl.associative_scan((decay, adjoint), 0, linear_combine, reverse=True)
            _, q_sum = tl.associative_scan((decay, adjoint * ratio), 0, linear_combine, reverse=True)
            r_sum = r_sum + gains * carry_r[None, :]
            q_sum = q_sum + gains * carry_q[None, :]
            keys = _keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK)
            weights = exp_difference(keys, lse)
            values = _load(v_ptr, rows, channels, seq_len, dim, 0.0)
            _store(dv_ptr, weights * r_sum, rows, channels, seq_len, dim)
            _store(dk_ptr, weights * (values * r_sum - q_sum), rows, channels, seq_len, dim)
            sigmoid = tl.sigmoid(queries)
            grad = _load(grad_ptr, rows, channels, seq_len, dim, 0.0)
            _store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio, rows, channels, seq_len, dim)
            carry_r = tl.sum(tl.where(local[:, None] == 0, r_sum, 0.0), 0)
            carry_q = tl.sum(tl.where(local[:, None] == 0, q_sum, 0.0), 0)
    else:
        lse = tl.load(lse_ptr + batch * dim + channels, channels < dim, 0.0)
        ratio = tl.load(ratio_ptr + batch * dim + channels, channels < dim, 0.0)
        adjoint_sum = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, seq_len, BLOCK_T):
            rows = start + local
            queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
            grad = _load(grad_ptr, rows, channels, seq_len, dim, 0.0)
            adjoint_sum += tl.sum(grad * tl.sigmoid(queries), 0)
            sigmoid = tl.sigmoid(queries)
            _store(dq_ptr, grad * sigmoid * (1.0 - sigmoid) * ratio[None, :], rows, channels, seq_len, dim)
        for start in range(0, seq_len, BLOCK_T):
            rows = start + local
            keys = _keys(k_ptr, mask_ptr, rows, channels, seq_len, dim, HAS_MASK)
            weights = exp_difference(keys, lse[None, :]) * adjoint_sum[None, :]
            values = _load(v_ptr, rows, channels, seq_len, dim, 0.0)
            _store(dv_ptr, weights, rows, channels, seq_len, dim)
            _store(dk_ptr, weights * (values - ratio[None, :]), rows, channels, seq_len, dim)


def _launch(q: torch.Tensor) -> tuple[tuple[int, int], dict[str, int]]:
    batch, _, dim = q.shape
    blocks = {"BLOCK_T": 16 if interpreting() else 64, "BLOCK_D": min(64, triton.next_power_of_2(dim))}
    return (triton.cdiv(dim, blocks["BLOCK_D"]), batch), blocks


@torch.library.custom_op("tokenmix::aft_simple", mutates_args=())
def aft_simple_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, N, D); key_mask: (B, N) bool or None. Returns the output (B, N, D) in the inputs'
    dtype and, for the backward, lse and r in float32: (B, N, D) when causal, (B, 1, D) otherwise."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, seq_len, dim = q.shape
    rows = seq_len if causal else 1
    out = torch.empty_like(q)
    lse = q.new_empty(batch, rows, dim, dtype=torch.float32)
    ratio = torch.empty_like(lse)
    grid, blocks = _launch(q)
    _forward_kernel[grid](
        q, k, v, int8_mask(q, key_mask), out, lse, ratio, seq_len, dim, CAUSAL=causal,
        HAS_MASK=key_mask is not None, **blocks,
    )  # fmt: skip
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
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid, blocks = _launch(q)
    _backward_kernel[grid](
        grad_out, q, k, v, int8_mask(q, key_mask), lse, ratio, grad_q, grad_k, grad_v, q.shape[1], q.shape[2],
        CAUSAL=causal, HAS_MASK=key_mask is not None, **blocks,
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
    bias = tl.load(w_ptr + rows[:, None] * table + columns[None, :], inside, 0.0).to(tl.float32)
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
    offset = batch * seq_len * dim
    q_ptr, k_ptr, v_ptr, out_ptr = q_ptr + offset, k_ptr + offset, v_ptr + offset, out_ptr + offset
    lse_ptr, ratio_ptr = lse_ptr + offset, ratio_ptr + offset
    mask_ptr += batch * seq_len
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
    sees = total > 0  # a row with no real key outputs 0
    ratio = tl.where(sees, weighted / tl.where(sees, total, 1.0), 0.0)
    lse = tl.where(sees, top + tl.log(tl.where(sees, total, 1.0)), float("-inf"))
    queries = _load(q_ptr, rows, channels, seq_len, dim, 0.0)
    _store(out_ptr, tl.sigmoid(queries) * ratio, rows, channels, seq_len, dim)
    _store(lse_ptr, lse, rows, channels, seq_len, dim)
    _store(ratio_ptr, ratio, rows, channels, seq_len, dim)


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
    offset = batch * seq_len * dim
    grad_ptr, q_ptr, k_ptr, v_ptr = grad_ptr + offset, q_ptr + offset, k_ptr + offset, v_ptr + offset
    lse_ptr, ratio_ptr, dk_ptr, dv_ptr = (
        lse_ptr + offset,
        ratio_ptr + offset,
        dk_ptr + offset,
        dv_ptr + offset,
    )
    mask_ptr += batch * seq_len
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
        tl.atomic_add(dw_ptr + rows[:, None] * table + columns[None, :], tl.sum(grad_scores, 2), inside)
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
