"""AFT-local (a full or factorised bias table, within a window): the keys outside the window from
running sums, the window added offset by offset (or, for short sequences, the band as one matrix) — and
that windowed core, which AFT-conv shares."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...backend import use_kernel
from ...core.checks import (
    check_dims,
    check_flag,
    check_float_tensor,
    check_positive_int,
    check_same_dtype_device,
    compute_dtype,
    empty_output,
)
from ...core.excluded import causal_finite, finite_at_padding, real_only, reinstate
from ...core.packing import Packing
from ...errors import InvalidValueError
from .._typing import recurrent_op
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
from .recurrent import AFTWindowState, last_position, recurrent


def band_offsets(
    seq_len: int, window: int, causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the band's offsets j ∈ (−window, window), or (−window, 0] when causal: the key position t + j of
    every row t, (N, J), and whether it lies inside the sequence."""
    offsets = torch.arange(-(window - 1), 1 if causal else window, device=device)
    columns = torch.arange(seq_len, device=device)[:, None] + offsets[None, :]
    return columns, (columns >= 0) & (columns < seq_len)


def shift_zeros(x: torch.Tensor, dim: int, offset: int) -> torch.Tensor:
    """out[…, i, …] = x[…, i + offset, …] along ``dim``, 0 where i + offset falls outside."""
    length = x.shape[dim]
    if abs(offset) >= length:
        return torch.zeros_like(x)
    zeros = torch.zeros_like(x.narrow(dim, 0, abs(offset)))
    if offset >= 0:
        return torch.cat((x.narrow(dim, offset, length - offset), zeros), dim)
    return torch.cat((zeros, x.narrow(dim, 0, length + offset)), dim)


def pad_zeros(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """x with ``before`` and ``after`` zeros along ``dim``: padded once, so shifted windows are views."""
    zeros = [
        torch.zeros_like(x.narrow(dim, 0, 1)).expand(*x.shape[:dim], n, *x.shape[dim + 1 :])
        for n in (before, after)
    ]
    return torch.cat((zeros[0], x, zeros[1]), dim)


def outside_sum(x: torch.Tensor, dim: int, window: int, causal: bool = False) -> torch.Tensor:
    """Σ over positions i' ≤ i − window (and i' ≥ i + window unless causal) along ``dim``, by a prefix and a
    suffix running sum: nothing is subtracted."""
    before = shift_zeros(torch.cumsum(x, dim), dim, -window)
    if causal:
        return before
    after = shift_zeros(torch.flip(torch.cumsum(torch.flip(x, (dim,)), dim), (dim,)), dim, window)
    return before + after


# The band as one dense (N, G, N) matrix, summed by a matmul, where that matrix is at most DENSE_BAND_SIZE
# times the values' size (so memory stays O(B·N·D)) and the sequence at most DENSE_BAND_REACH band widths
# long. On a 2-core CPU, B = 32, C = 64, forward and backward, offset by offset took 14× the time at
# N = 64, 4× at N = 784 (J = 63), and the same at N = 2048.
DENSE_BAND_SIZE = 1.0
DENSE_BAND_REACH = 16


def dense_weights(exp_band: torch.Tensor, outside: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """(N, G, N): the weight of key s in row t as ``windowed`` sums it — exp_band's entry within the
    window, ``outside`` (N, G, 1) beyond it, none after t when causal (selected away)."""
    seq_len, groups, width = exp_band.shape
    index = torch.arange(seq_len, device=exp_band.device)
    offset = index[None, :] - index[:, None]  # s − t
    seen = offset <= 0 if causal else torch.ones_like(offset, dtype=torch.bool)
    near = seen & (offset.abs() < window)
    column = (offset + window - 1).clamp(0, width - 1)
    on_band = exp_band.gather(-1, column[:, None, :].expand(seq_len, groups, seq_len))
    beyond = torch.where(seen[:, None], outside, torch.zeros((), dtype=outside.dtype, device=outside.device))
    return torch.where(near[:, None], on_band, beyond)


def windowed(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    band: torch.Tensor,
    window: int,
    causal: bool,
    mask: torch.Tensor | None,
    bias: Bias,
) -> torch.Tensor:
    """The core of AFT-local and AFT-conv: biases w_{t,t+j} on the band's offsets (see ``band_offsets``), 0
    elsewhere (positions then still count, unbiased).

    q, values: (B, N, G, C); keys: (B, N, G, C or 1), −inf at padding; band: (N, G or 1, J), −inf where
    t + j is outside the sequence. Keys outside the band come from running sums (a prefix, and a suffix
    when bidirectional), so nothing is subtracted; the band is added offset by offset, O(N·J·G·C) time and
    O(N·G·C) memory, or for short sequences as one dense matrix (``dense_weights``). Returns (B, N, G·C).
    """
    batch, seq_len, groups, channels = values.shape
    exp_keys = torch.exp(keys - finite_shift(keys.amax(1, keepdim=True)))  # 0 at padding
    weighted_values = exp_keys * values
    reference = finite_shift(band.amax(-1, keepdim=True)).clamp_min(0)  # ≥ every bias of the row, the 0s too
    exp_band = torch.exp(band - reference)
    outside = torch.exp(-reference)[None]  # the weight of unbiased keys, relative to the reference

    dense = seq_len <= min(DENSE_BAND_SIZE * batch * channels, DENSE_BAND_REACH * exp_band.shape[-1])
    weights = dense_weights(exp_band, outside[0], window, causal) if dense else None

    def total(x: torch.Tensor) -> torch.Tensor:
        """Keys outside the band unbiased, plus Σ_j exp(w_{t,t+j} − reference_t) x_{t+j} over the band."""
        if weights is not None:
            return torch.einsum("tgs,bsgc->btgc", weights, x)
        result = outside * outside_sum(x, 1, window, causal)
        padded = pad_zeros(x, 1, window - 1, 0 if causal else window - 1)
        for column in range(exp_band.shape[-1]):
            result = result + exp_band[None, ..., column, None] * padded.narrow(1, column, seq_len)
        return result

    num, den = total(weighted_values), total(exp_keys)
    flat = (batch, seq_len, groups * channels)
    sees = sees_a_key(mask, batch, seq_len, causal, q.device)
    return finish(
        q.reshape(flat),
        num.reshape(flat),
        den.expand_as(num).reshape(flat),
        sees,
        keys.expand_as(values).reshape(flat),
        values.reshape(flat),
        bias,
        causal,
    )


def _local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    band_from: Callable[[torch.Tensor], torch.Tensor],
    bias: Bias,
    window: int,
    causal: bool,
    mask: torch.Tensor | None,
    packing: Packing | None = None,
) -> torch.Tensor:
    """AFT-local given ``band_from(columns)`` → the biases w_{t, columns[t, j]} (L, J) of the positions
    t < L of a sequence (L = N, or a packed row's longest segment) and the exact fallback's biases
    (``bias``, zero outside the window). A packed row goes through the kernel, each
    position's band row that of its position within its segment."""
    seq_len = q.shape[1] if packing is None else packing.longest
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v)
    q, k, v = finite_at_padding(q, mask, 1), real_only(k, mask, 1), real_only(v, mask, 1)
    seen = None
    if causal:  # a NaN key or value in the future must not reach earlier rows, nor their gradients
        k, v, seen = causal_finite(k, v, 1, key_channels=True, starts=segment_starts(packing))
    columns, inside = band_offsets(seq_len, window, causal, q.device)
    band = band_from(columns.clamp(0, seq_len - 1)).masked_fill(~inside, float("-inf"))
    if packing is not None or use_kernel("aft_local", q, atomics=needs_grad(q, k, v, band)):
        from ...kernels.aft import aft_local

        bounds = None
        if packing is not None:  # keys past a segment's end are left out by the kernel
            band, bounds = band[packing.positions()], packing.bounds
        out = aft_local(q, k, v, band[:, None], mask, window, bool(causal), bounds)
        return out if seen is None else reinstate(out, seen)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, band = q.to(dtype), k.to(dtype), v.to(dtype), band.to(dtype)
    keys = masked_keys(k, mask)[:, :, None]
    out = windowed(q[:, :, None], keys, v[:, :, None], band[:, None], window, causal, mask, bias)
    return (out if seen is None else reinstate(out, seen)).to(out_dtype)


def _continued(q, k, v, mask, causal, window, pairs, forward, initial_state, output_final_state):
    """Both AFT-local ops in their recurrent form (``recurrent``): the bias of a (row, column) pair is the
    op's own ``pairs(rows, columns)`` (B, T, L) inside the window and 0 outside it (selected away)."""

    def bias(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        near = (rows[:, :, None] - columns[:, None, :]).abs() < window
        band = pairs(rows, columns)
        return torch.where(near, band, torch.zeros_like(band))

    return recurrent(q, k, v, mask, causal, window, bias, forward, initial_state, output_final_state)


@recurrent_op(AFTWindowState)
@packable_aft("aft_local")
def aft_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    window: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    initial_state: AFTWindowState | None = None,
    output_final_state: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTWindowState]:
    """AFT-local: ``aft_full`` with w'_{t,t'} = w_{t,t'} where |t − t'| < window and 0 elsewhere (not
    −inf: positions outside the window still count, with no bias).

    O(N·window·D) time and O(N·D) memory: keys outside the window come from running sums and the window
    is added offset by offset — or, where an N×N matrix is no larger than v and N at most 16 windows,
    summed as that matrix by one matmul. ``aft_local_lowrank`` takes w as factors u w_vᵀ instead.

    Args:
        q, k, v: (B, N, D). w: (N_max, N_max), N ≤ N_max (only its band within ``window`` is read).
        window: s ≥ 1. causal: t sees t' ≤ t. attention_mask: (B, N), True/1 = real token.
        initial_state: causal only — the ``AFTWindowState`` a previous call returned: this call's tokens
            come after those (default None: a fresh sequence).
        output_final_state: causal only — also return the state after this call (default False).
            In this recurrent form (either argument given), a padded position leaves the state unchanged
            and positions count each row's real tokens only (docs/spec.md §7).
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, N, D) in the inputs' dtype, or (that, final_state) with ``output_final_state``.
    """
    mask = check_inputs(q, k, v, attention_mask, recurrent=initial_state is not None or output_final_state)
    causal = check_flag("causal", causal)
    check_float_tensor("w", w, "(N_max, N_max)")
    check_same_dtype_device(q=q, w=w)
    window = check_positive_int("window", window)
    if initial_state is not None or output_final_state:

        def pairs(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            check_table(w, last_position(rows) + 1)
            return w[rows[:, :, None], columns[:, None, :]].to(compute_dtype(q.dtype))

        def forward(q, k, v, mask):
            return aft_local(q, k, v, w, window=window, causal=True, attention_mask=mask)

        return _continued(q, k, v, mask, causal, window, pairs, forward, initial_state, output_final_state)
    seq_len = q.shape[1] if packing is None else packing.longest
    check_table(w, seq_len)
    w = w[:seq_len, :seq_len].to(compute_dtype(w.dtype))

    bias = Bias("table", (w,), (window,))
    return _local(q, k, v, lambda columns: w.gather(1, columns), bias, window, causal, mask, packing)


@recurrent_op(AFTWindowState)
@packable_aft("aft_local")
def aft_local_lowrank(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_u: torch.Tensor,
    w_v: torch.Tensor,
    *,
    window: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    initial_state: AFTWindowState | None = None,
    output_final_state: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTWindowState]:
    """``aft_local`` with the paper's factorised biases w = w_u w_vᵀ, given as w_u, w_v: (N_max, d'):
    only the band's entries u_t·v_t' are formed, O(N·window·d'), never the N×N table. ``initial_state``
    and ``output_final_state`` as for ``aft_local``. ``cu_seqlens`` or ``packing``: packed segments,
    as for the other ops (docs/spec.md §8)."""
    mask = check_inputs(q, k, v, attention_mask, recurrent=initial_state is not None or output_final_state)
    causal = check_flag("causal", causal)
    check_float_tensor("w_u", w_u, "(N_max, rank)")
    check_float_tensor("w_v", w_v, "(N_max, rank)")
    check_same_dtype_device(q=q, w_u=w_u, w_v=w_v)
    check_dims({}, w_u=(w_u, "MR"), w_v=(w_v, "MR"))
    window = check_positive_int("window", window)
    if initial_state is not None or output_final_state:

        def pairs(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            if (last := last_position(rows)) >= w_u.shape[0]:
                raise InvalidValueError(
                    f"w_u and w_v must have a row for position {last}, got {w_u.shape[0]} rows"
                )
            dtype = compute_dtype(q.dtype)
            return torch.einsum("btr,blr->btl", w_u[rows].to(dtype), w_v[columns].to(dtype))

        def forward(q, k, v, mask):
            return aft_local_lowrank(q, k, v, w_u, w_v, window=window, causal=True, attention_mask=mask)

        return _continued(q, k, v, mask, causal, window, pairs, forward, initial_state, output_final_state)
    seq_len = q.shape[1] if packing is None else packing.longest
    if w_u.shape[0] < seq_len:
        raise InvalidValueError(f"w_u and w_v must have N_max ≥ N = {seq_len} rows, got {w_u.shape[0]}")
    dtype = compute_dtype(q.dtype)
    w_u, w_v = w_u[:seq_len].to(dtype), w_v[:seq_len].to(dtype)

    def band_from(columns: torch.Tensor) -> torch.Tensor:
        # Offset by offset over shifted views of w_v: gathering its rows for every (t, j) would keep an
        # (N, J, rank) copy for the backward (64 MB at N=8192, rank 64, window 32). Rows past either end
        # are zeros here and excluded by the caller.
        padded = pad_zeros(w_v, 0, window - 1, 0 if causal else window - 1)
        terms = [(w_u * padded.narrow(0, j, seq_len)).sum(-1) for j in range(columns.shape[1])]
        return torch.stack(terms, 1)

    return _local(q, k, v, band_from, Bias("lowrank", (w_u, w_v), (window,)), window, causal, mask, packing)
