"""AFT-local (a full or factorised bias table, within a window): the keys outside the window from
running sums, the window added offset by offset (or, for short sequences, the band as one matrix) — and
that windowed core, which AFT-conv shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

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
from ...core.excluded import all_finite, causal_finite, finite_at_padding, real_only, reinstate
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
from .exact import Bias, Pieces, finite_shift, laid, pieces_of
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


def dense_weights(
    exp_band: torch.Tensor, outside: torch.Tensor, window: int, causal: bool, row_offset: int, seq_len: int
) -> torch.Tensor:
    """(T, G, L): the weight of key s in row t (at position t + ``row_offset`` of the L) as ``windowed``
    sums it — exp_band's entry (T, G, J) within the window, ``outside`` (T, G, 1) beyond it, none after
    the row when causal (selected away)."""
    rows, groups, width = exp_band.shape
    at = torch.arange(rows, device=exp_band.device) + row_offset
    offset = torch.arange(seq_len, device=exp_band.device)[None, :] - at[:, None]  # s − t
    seen = offset <= 0 if causal else torch.ones_like(offset, dtype=torch.bool)
    near = seen & (offset.abs() < window)
    column = (offset + window - 1).clamp(0, width - 1)
    on_band = exp_band.gather(-1, column[:, None, :].expand(rows, groups, seq_len))
    beyond = torch.where(seen[:, None], outside, torch.zeros((), dtype=outside.dtype, device=outside.device))
    return torch.where(near[:, None], on_band, beyond)


class _Exponentials(torch.autograd.Function):
    """exp(k − max k) and exp(k − max k) ⊙ v of a sequence given in pieces (``Pieces``), each laid into one
    tensor once: as autograd records it, the product would keep a laid-out copy of v for its backward,
    where here the pieces themselves are kept (a context share's own keys and values, held anyway)."""

    @staticmethod
    def forward(ctx, count: int, *pieces: torch.Tensor):
        keys, values = pieces[:count], pieces[count:]
        shift = finite_shift(torch.stack([k.amax(1) for k in keys if k.shape[1]]).amax(0))[:, None]
        exp_keys = torch.cat(keys, 1).sub_(shift).exp_()  # 0 at padding (−inf)
        weighted = torch.cat(values, 1).mul_(exp_keys)
        ctx.save_for_backward(exp_keys, *values)
        return exp_keys, weighted

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_exp: torch.Tensor, grad_weighted: torch.Tensor):
        exp_keys, *values = ctx.saved_tensors
        grad_values = grad_weighted * exp_keys
        through_values = (grad_weighted * torch.cat(values, 1)).sum_to_size(exp_keys.shape)
        grad_keys = through_values.add_(grad_exp).mul_(exp_keys)
        sizes = [v.shape[1] for v in values]
        return None, *grad_keys.split(sizes, 1), *grad_values.split(sizes, 1)


def exponentials(keys: Pieces, values: Pieces) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(k − max k) (0 at padding, −inf keys) and its product with v, over dim 1 (the sequence)."""
    if isinstance(keys, torch.Tensor) or len(keys) == 1:
        keys, values = laid(keys), laid(values)
        exp_keys = torch.exp(keys - finite_shift(keys.amax(1, keepdim=True)))
        return exp_keys, exp_keys * values
    return _Exponentials.apply(len(keys), *keys, *values)


def windowed(
    q: torch.Tensor,
    keys: Pieces,
    values: Pieces,
    band: torch.Tensor,
    window: int,
    causal: bool,
    mask: torch.Tensor | None,
    bias: Bias,
    row_offset: int = 0,
) -> torch.Tensor:
    """The core of AFT-local and AFT-conv: biases w_{t,t+j} on the band's offsets (see ``band_offsets``), 0
    elsewhere (positions then still count, unbiased).

    q: (B, T, G, C), the rows at positions ``row_offset`` … of the L keys; values: (B, L, G, C); keys:
    (B, L, G, C or 1), −inf at padding, both as tensors or pieces (``Pieces``); band: (T, G or 1, J), the
    rows' biases, −inf where t + j is outside the L positions; mask: (B, L) or None; bias: the exact
    recompute's, for the T rows. Keys outside the band come from running sums (a prefix, and a suffix
    when bidirectional), so nothing is subtracted; the band is added offset by offset, O(L·J·G·C) time
    and O(L·G·C) memory, or for short sequences as one dense matrix (``dense_weights``).
    Returns (B, T, G·C).
    """
    batch, rows, groups, channels = q.shape
    keys, values = pieces_of(keys), pieces_of(values)
    seq_len = sum(piece.shape[1] for piece in keys)
    exp_keys, weighted_values = exponentials(keys, values)
    reference = finite_shift(band.amax(-1, keepdim=True)).clamp_min(0)  # ≥ every bias of the row, the 0s too
    exp_band = torch.exp(band - reference)
    outside = torch.exp(-reference)[None]  # the weight of unbiased keys, relative to the reference

    dense = seq_len <= min(DENSE_BAND_SIZE * batch * channels, DENSE_BAND_REACH * exp_band.shape[-1])
    weights = dense_weights(exp_band, outside[0], window, causal, row_offset, seq_len) if dense else None

    def total(x: torch.Tensor) -> torch.Tensor:
        """Keys outside the band unbiased, plus Σ_j exp(w_{t,t+j} − reference_t) x_{t+j} over the band."""
        if weights is not None:
            return torch.einsum("tgs,bsgc->btgc", weights, x)
        result = outside * outside_sum(x, 1, window, causal).narrow(1, row_offset, rows)
        padded = pad_zeros(x, 1, window - 1, 0 if causal else window - 1)
        for column in range(exp_band.shape[-1]):
            result = result + exp_band[None, ..., column, None] * padded.narrow(1, row_offset + column, rows)
        return result

    num, den = total(weighted_values), total(exp_keys)
    flat = (batch, rows, groups * channels)
    sees = sees_a_key(mask, batch, seq_len, causal, q.device).narrow(1, row_offset, rows)
    return finish(
        q.reshape(flat),
        num.reshape(flat),
        den.expand_as(num).reshape(flat),
        sees,
        tuple(k.expand_as(v).flatten(2) for k, v in zip(keys, values, strict=True)),
        tuple(v.flatten(2) for v in values),
        bias,
        causal,
        row_offset,
    )


def banded(
    q: torch.Tensor,
    k: Pieces,
    v: Pieces,
    band: torch.Tensor,
    window: int,
    causal: bool,
    mask: torch.Tensor | None,
    bias: Bias,
    kernel: str,
    row_offset: int = 0,
    packing: Packing | None = None,
) -> torch.Tensor:
    """AFT on a band of biases, the windowed ops' common path (AFT-local's, and a context-parallel
    share's of AFT-local and AFT-conv): ``kernel``'s (``use_kernel``) Triton kernel, or ``windowed``.

    q: (B, T, G, C), the rows at positions ``row_offset`` … of the L keys; k: (B, L, G, C or 1) and v:
    (B, L, G, C), as tensors or pieces (``Pieces``: kept apart on the reference path when nothing must be
    masked); band: (L, G or 1, J), every position's biases on the offsets of ``band_offsets``, −inf where
    t + j is outside the L; mask: (B, L) or None; bias: the exact recompute's for the T rows; packing: a
    packed row (kernel only, T = L). Returns (B, T, G·C) in q's dtype.
    """
    rows = q.shape[1]
    if not isinstance(k, torch.Tensor) and (mask is not None or (causal and not all_finite(*k, *v))):
        k, v = laid(k), laid(v)  # padding or a non-finite key: selected away below, in one tensor
    q = finite_at_padding(q, None if mask is None else mask.narrow(1, row_offset, rows), 1)
    seen = None
    if isinstance(k, torch.Tensor):
        k, v = real_only(k, mask, 1), real_only(v, mask, 1)
        if causal:  # a NaN key or value in the future must not reach earlier rows, nor their gradients
            k, v, seen = causal_finite(k, v, 1, key_channels=True, starts=segment_starts(packing))
    if packing is not None or use_kernel(kernel, q, atomics=needs_grad(q, k, v, band)):
        from ...kernels.aft import aft_local

        bounds = None
        if packing is not None:  # keys past a segment's end are left out by the kernel
            band, bounds = band[packing.positions()], packing.bounds
        k, v, queries = laid(k), laid(v), q.flatten(2)
        if rows < k.shape[1]:  # the kernel's rows are its keys': a share's laid at their offset
            queries = pad_zeros(queries, 1, row_offset, k.shape[1] - row_offset - rows)
        out = aft_local(queries, k.flatten(2), v.flatten(2), band, mask, window, causal, bounds)
        out = out.narrow(1, row_offset, rows)
    else:
        out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        q, band = q.to(dtype), band.narrow(0, row_offset, rows).to(dtype)
        keys = tuple(masked_keys(piece.to(dtype).flatten(2), mask).view_as(piece) for piece in pieces_of(k))
        values = tuple(piece.to(dtype) for piece in pieces_of(v))
        out = windowed(q, keys, values, band, window, causal, mask, bias, row_offset).to(out_dtype)
    if seen is not None:
        out = reinstate(out, seen.narrow(1, row_offset, rows).flatten(2))
    return out


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
    band = local_band(band_from, seq_len, window, causal, q.device)
    q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]  # one group of every channel
    return banded(q, k, v, band, window, causal, mask, bias, "aft_local", packing=packing)


def local_band(
    band_from: Callable[[torch.Tensor], torch.Tensor],
    seq_len: int,
    window: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """(L, 1, J): AFT-local's band of L positions, ``band_from(columns)`` (L, J) on the offsets of
    ``band_offsets`` (columns clamped into the L), −inf where t + j falls outside them."""
    columns, inside = band_offsets(seq_len, window, causal, device)
    return band_from(columns.clamp(0, seq_len - 1)).masked_fill(~inside, float("-inf"))[:, None]


def lowrank_band(w_u: torch.Tensor, w_v: torch.Tensor, window: int, causal: bool, width: int) -> torch.Tensor:
    """(N, J): the band of u w_vᵀ (u, w_v: (N, rank), the rows of N consecutive positions), u_t · w_v[t + j]
    on the offsets of ``band_offsets`` (``width`` = J of them), 0 past either end (the caller's to
    exclude). Offset by offset over shifted views of w_v: gathering its rows for every (t, j) would keep
    an (N, J, rank) copy for the backward (64 MB at N=8192, rank 64, window 32)."""
    padded = pad_zeros(w_v, 0, window - 1, 0 if causal else window - 1)
    terms = [(w_u * padded.narrow(0, j, w_u.shape[0])).sum(-1) for j in range(width)]
    return torch.stack(terms, 1)


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

    def band_from(columns: torch.Tensor) -> torch.Tensor:  # rows past either end: excluded by _local
        return lowrank_band(w_u, w_v, window, causal, columns.shape[1])

    return _local(q, k, v, band_from, Bias("lowrank", (w_u, w_v), (window,)), window, causal, mask, packing)
