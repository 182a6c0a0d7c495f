"""Attention Free Transformer ops (Zhai et al. 2021; docs/spec.md §4): AFT-full, AFT-simple, AFT-local and
AFT-conv (1-D and 2-D).

    y_t = σ(q_t) ⊙ Σ_{t'∈S(t)} exp(k_t' + w_{t,t'}) ⊙ v_t' / Σ_{t'∈S(t)} exp(k_t' + w_{t,t'})

S(t) = the real t' (and t' ≤ t when causal). q, k, v: (B, N, D).

Numerics: the sums are computed with matmuls (or a prefix scan) after subtracting a separate maximum of
k (per channel) and of w (per row), which cannot overflow. Separate maxima can underflow, though: when
the keys that dominate k and the positions that dominate row t of w differ, every product
exp(k − max k)·exp(w − max w) may round to 0 and the ratio to 0/0. Every (batch, row, channel) whose
denominator comes out below ``_TINY`` while it sees a real key is therefore recomputed exactly with the
joint maximum of k_t' + w_{t,t'} over its own terms, as online softmax does. Half-precision inputs are
computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ..backend import use_kernel
from ..errors import InvalidTypeError, InvalidValueError
from ._aft_exact import NO_BIAS, Bias, recompute_underflowed
from ._checks import (
    check_attention_mask,
    check_dims,
    check_flag,
    check_float_tensor,
    check_positive_int,
    check_same_dtype_device,
    compute_dtype,
    empty_output,
)
from ._chunks import compact, last_real
from ._excluded import causal_finite, finite_at_padding, finite_part, real_only, reinstate, seen_in_window
from ._varlen import Packing, call_packed, kernel_packing

__all__ = [
    "AFTWindowState",
    "aft_accumulate",
    "aft_cached",
    "aft_conv",
    "aft_full",
    "aft_local",
    "aft_local_lowrank",
    "aft_simple",
]

# A denominator below this (relative to its separate maxima) is recomputed with the joint maximum; far
# above the dtype's smallest normal number, so entries kept from the fast path keep full precision.
_TINY = {torch.float32: 2.0**-60, torch.float64: 2.0**-600}
# Elements of one block: score rows × keys (× batch) in aft_full, flagged entries × keys in the fallback.
_BLOCK_ELEMENTS = 1 << 22
_SCAN_CHUNK = 64


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, recurrent=False
):
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, tensor, "(B, N, D)")
    check_same_dtype_device(q=q, k=k, v=v)
    sizes = check_dims({}, q=(q, "BND"), k=(k, "BND"), v=(v, "BND"))
    mask = check_attention_mask(attention_mask, sizes["B"], sizes["N"], q.device)
    # A sequence with no real token: every position counts (its outputs are unspecified) — except in a
    # recurrent chunk, where padding only must leave the state alone.
    if mask is not None and not recurrent:
        mask = mask | ~mask.any(1, keepdim=True)
    return mask


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether a backward will run: the AFT kernels' backward adds with atomics (see ``use_kernel``)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _whole_through_kernel(name: str, arguments: dict, *weights: str) -> Packing | None:
    """The plan of a packed call (``cu_seqlens``) that goes whole through ``name``'s kernel, which takes
    the segments itself; None when it goes segment by segment (``call_packed``): on the reference path,
    and for inputs the op's own checks will name."""
    if (packing := kernel_packing(arguments, q=1, k=1, v=1)) is None:
        return None
    tensors = [arguments[n] for n in ("q", "k", "v", *weights) if isinstance(arguments[n], torch.Tensor)]
    return packing if use_kernel(name, arguments["q"], atomics=_needs_grad(*tensors)) else None


def _starts(packing: Packing | None) -> torch.Tensor | None:
    """Where each position's segment starts, for the causal NaN bookkeeping; None when not packed."""
    return None if packing is None else packing.starts()


def _check_table(w: torch.Tensor, seq_len: int) -> None:
    if w.shape[0] != w.shape[1] or w.shape[0] < seq_len:
        raise InvalidValueError(
            f"w must be a square (N_max, N_max) table with N_max ≥ N = {seq_len}, got shape {tuple(w.shape)}"
        )


def _masked_keys(k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """k with padded positions at −inf, so they vanish from every max and exp."""
    return k if mask is None else k.masked_fill(~mask[..., None], float("-inf"))


def _finite(m: torch.Tensor) -> torch.Tensor:
    """A maximum as a shift: detached (every result here is invariant to the shift, so its gradient
    through the shift is exactly 0 and skipping it saves a backward pass), and finite (a maximum over no
    terms is −inf; any finite stand-in works there, since all its terms are 0)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()


def _finish(
    q: torch.Tensor,
    num: torch.Tensor,
    den: torch.Tensor,
    sees_a_key: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: Bias,
    causal: bool,
) -> torch.Tensor:
    """σ(q) ⊙ num/den, with underflowed denominators recomputed exactly and key-less rows set to 0."""
    flagged = (den < _TINY[den.dtype]) & sees_a_key
    # Entries that are flagged or see no key divide by 1, selected (not multiplied) away: their tiny or
    # zero den would give the backward num/den² = inf, and inf·0 = NaN in the gradients of k, v and w.
    ratio = num / torch.where(flagged | ~sees_a_key, torch.ones_like(den), den)
    return torch.sigmoid(q) * recompute_underflowed(ratio, flagged, keys, values, bias, causal)


def _sees_a_key(mask: torch.Tensor | None, batch: int, seq_len: int, causal: bool, device) -> torch.Tensor:
    """(B, N, 1): whether row t has at least one real key in S(t)."""
    if mask is None:
        return torch.ones(1, seq_len, 1, dtype=torch.bool, device=device)
    counts = mask.cumsum(1) if causal else mask.sum(1, keepdim=True).expand(batch, seq_len)
    return (counts > 0)[..., None]


def aft_simple(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """AFT-simple: ``aft_full`` with w = 0, ``y_t = σ(q_t) ⊙ Σ softmax_{t'∈S(t)}(k)_{t'} ⊙ v_t'``, O(N·D).

    Bidirectional: one softmax over the sequence per channel. Causal: a prefix scan over chunks carrying
    the running maximum, numerator and denominator per channel.

    Args:
        q, k, v: (B, N, D).
        causal: t sees t' ≤ t (default False).
        attention_mask: (B, N), True/1 = real token (default None: all real).
        initial_state: causal only — the (max, numerator, denominator) (B, D) of the keys before this
            call, as a previous call's final state (default None: none).
        output_final_state: causal only — also return the state after this call (default False).
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).

    Returns:
        (B, N, D) in the inputs' dtype, or (that, final_state) with ``output_final_state``.
    """
    if cu_seqlens is not None:  # packed segments (docs/spec.md §8): whole through the kernel, if it runs
        arguments = locals()  # only here: a traced locals() breaks torch.compile's graph
        if (packing := _whole_through_kernel("aft_simple", arguments)) is None:
            return call_packed(aft_simple, arguments, q=1, k=1, v=1)
    else:
        packing = None
    if initial_state is not None or output_final_state:
        return _aft_simple_recurrent(q, k, v, causal, attention_mask, initial_state, output_final_state)
    mask = _check(q, k, v, attention_mask)
    causal = check_flag("causal", causal)
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v)
    q, k, v = finite_at_padding(q, mask, 1), real_only(k, mask, 1), real_only(v, mask, 1)
    if causal:  # a NaN key or value in the future must not reach earlier rows, nor their gradients
        k, v, seen = causal_finite(k, v, 1, key_channels=True, starts=_starts(packing))
        return reinstate(_aft_simple(q, k, v, mask, True, packing), seen)
    return _aft_simple(q, k, v, mask, False, packing)


def _aft_simple_recurrent(q, k, v, causal, attention_mask, initial_state, output_final_state):
    """aft_simple continued from / returning the running (max, numerator, denominator)."""
    if not check_flag("causal", causal):
        raise InvalidValueError("initial_state and output_final_state need causal=True (the recurrent form)")
    _check(q, k, v, attention_mask)
    real = check_attention_mask(attention_mask, q.shape[0], q.shape[1], q.device)  # padding folds nothing
    if initial_state is not None:
        if not isinstance(initial_state, tuple) or len(initial_state) != 3:
            raise InvalidTypeError("initial_state must be a (max, numerator, denominator) tuple")
        for name, part in zip(("max", "numerator", "denominator"), initial_state, strict=True):
            check_float_tensor(f"initial_state {name}", part, "(B, D)")
            if tuple(part.shape) != (q.shape[0], q.shape[2]):
                raise InvalidValueError(
                    f"initial_state {name} must have shape (B, D) = {(q.shape[0], q.shape[2])}, "
                    f"got {tuple(part.shape)}"
                )
    if initial_state is None or q.shape[1] == 0:
        out = aft_simple(q, k, v, causal=True, attention_mask=attention_mask)
    elif real is None and q.shape[1] == 1:  # one token: fold it in, then read the ratio
        state = aft_accumulate(initial_state, k, v)
        out = (torch.sigmoid(q.to(state[1].dtype)) * state[1][:, None] / state[2][:, None]).to(q.dtype)
        return (out, state) if output_final_state else out
    else:  # the keys so far are one term under their running maximum
        out = aft_cached(q, k, v, None, key_mask=real, running=initial_state).to(q.dtype)
    if not output_final_state:
        return out
    return out, aft_accumulate(initial_state, k, v, real)


def _aft_simple(q, k, v, mask, causal: bool, packing: Packing | None = None) -> torch.Tensor:
    """aft_simple on checked inputs (see there); a packed row goes through the kernel."""
    if packing is not None or use_kernel("aft_simple", q, atomics=_needs_grad(q, k, v)):
        from ..kernels.aft import aft_simple as kernel

        return kernel(q, k, v, mask, bool(causal), None if packing is None else packing.bounds)
    batch, seq_len, _ = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    keys = _masked_keys(k, mask)
    if not causal:
        weights = torch.softmax(keys, dim=1)  # every sequence has a real key (see _check)
        return (torch.sigmoid(q) * (weights * v).sum(1, keepdim=True)).to(out_dtype)
    carry_max = keys.new_full((batch, 1, keys.shape[-1]), float("-inf"))
    carry_num = keys.new_zeros(batch, 1, keys.shape[-1])
    carry_den = keys.new_zeros(batch, 1, keys.shape[-1])
    nums, dens = [], []
    # split, not slices: a slice's backward writes into a zero tensor of the full (B, N, D) each time,
    # which made the scan's backward quadratic in N.
    for chunk, values in zip(keys.split(_SCAN_CHUNK, 1), v.split(_SCAN_CHUNK, 1), strict=True):
        new_max = torch.maximum(carry_max, chunk.amax(1, keepdim=True)).detach()  # a shift (see _finite)
        reference = _finite(new_max)
        weights = torch.exp(chunk - reference)
        rescale = torch.exp(carry_max - reference)  # ≤ 1; 0 while nothing was seen
        num = torch.cumsum(weights * values, 1) + rescale * carry_num
        den = torch.cumsum(weights, 1) + rescale * carry_den
        nums.append(num)
        dens.append(den)
        carry_max, carry_num, carry_den = new_max, num[:, -1:], den[:, -1:]
    sees = _sees_a_key(mask, batch, seq_len, True, q.device)
    return _finish(q, torch.cat(nums, 1), torch.cat(dens, 1), sees, keys, v, NO_BIAS, True).to(out_dtype)


def aft_full(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """AFT-full: ``y_t = σ(q_t) ⊙ Σ exp(k_t' + w_{t,t'}) ⊙ v_t' / Σ exp(k_t' + w_{t,t'})`` over t' ∈ S(t).

    Computed as matmuls of exp(w − max_row w) with exp(k − max k) ⊙ v and exp(k − max k) over blocks of
    rows (memory O(rows·N + N·D), never (B, N, N, D)); underflowed entries are recomputed exactly.

    Args:
        q, k, v: (B, N, D). w: (N_max, N_max) pairwise position biases, N ≤ N_max; its top-left N×N
            block is used. causal: t sees t' ≤ t. attention_mask: (B, N), True/1 = real token.
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).

    Returns:
        (B, N, D) in the inputs' dtype.
    """
    if cu_seqlens is not None:  # packed segments (docs/spec.md §8): whole through the kernel, if it runs
        arguments = locals()  # only here: a traced locals() breaks torch.compile's graph
        if (packing := _whole_through_kernel("aft_full", arguments, "w")) is None:
            return call_packed(aft_full, arguments, q=1, k=1, v=1)
    else:
        packing = None
    mask = _check(q, k, v, attention_mask)
    causal = check_flag("causal", causal)
    check_float_tensor("w", w, "(N_max, N_max)")
    check_same_dtype_device(q=q, w=w)
    _check_table(w, q.shape[1] if packing is None else packing.longest)
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v, w)
    q, k, v = finite_at_padding(q, mask, 1), real_only(k, mask, 1), real_only(v, mask, 1)
    if not causal:
        return _aft_full(q, k, v, w, mask, False, packing)
    # The row blocks multiply future keys and values by 0: compute with finite ones, then mark the
    # entries (row, channel) whose own terms are not.
    k, v, seen = causal_finite(k, v, 1, key_channels=True, starts=_starts(packing))
    return reinstate(_aft_full(q, k, v, w, mask, True, packing), seen)


def _aft_full(q, k, v, w, mask, causal: bool, packing: Packing | None = None) -> torch.Tensor:
    """aft_full on checked inputs (see there); a packed row goes through the kernel."""
    batch, seq_len, _ = q.shape
    if packing is not None or use_kernel("aft_full", q, atomics=_needs_grad(q, k, v, w)):
        from ..kernels.aft import aft_full as kernel

        return kernel(q, k, v, w, mask, bool(causal), None if packing is None else packing.bounds)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, w = q.to(dtype), k.to(dtype), v.to(dtype), w[:seq_len, :seq_len].to(dtype)
    keys = _masked_keys(k, mask)
    rows = max(1, min(seq_len, _BLOCK_ELEMENTS // max(1, batch * seq_len)))
    positions = torch.arange(seq_len, device=q.device)
    blocks = []
    for start in range(0, seq_len, rows):
        end = min(seq_len, start + rows)
        key_end = end if causal else seq_len
        if causal or not blocks:  # causal blocks see a growing prefix: its own key maximum
            visible_keys = keys[:, :key_end]
            exp_keys = torch.exp(visible_keys - _finite(visible_keys.amax(1, keepdim=True)))
            # Numerator and denominator in one matmul: [exp(k) ⊙ v, exp(k)].
            stacked = torch.cat((exp_keys * v[:, :key_end], exp_keys), dim=-1)
        bias = w[start:end, :key_end]
        if mask is not None:
            bias = bias.masked_fill(~mask[:, None, :key_end], float("-inf"))
        if causal:
            bias = bias.masked_fill(positions[start:end, None] < positions[None, :key_end], float("-inf"))
        exp_bias = torch.exp(bias - _finite(bias.amax(-1, keepdim=True)))  # (B or 1, rows, keys)
        blocks.append(torch.matmul(exp_bias, stacked))
    num, den = torch.cat(blocks, 1).chunk(2, dim=-1)
    sees = _sees_a_key(mask, batch, seq_len, causal, q.device)

    return _finish(q, num, den, sees, keys, v, Bias("table", (w,)), causal).to(out_dtype)


def _offsets(
    seq_len: int, window: int, causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the band's offsets j ∈ (−window, window), or (−window, 0] when causal: the key position t + j of
    every row t, (N, J), and whether it lies inside the sequence."""
    offsets = torch.arange(-(window - 1), 1 if causal else window, device=device)
    columns = torch.arange(seq_len, device=device)[:, None] + offsets[None, :]
    return columns, (columns >= 0) & (columns < seq_len)


def _shifted(x: torch.Tensor, dim: int, offset: int) -> torch.Tensor:
    """out[…, i, …] = x[…, i + offset, …] along ``dim``, 0 where i + offset falls outside."""
    length = x.shape[dim]
    if abs(offset) >= length:
        return torch.zeros_like(x)
    zeros = torch.zeros_like(x.narrow(dim, 0, abs(offset)))
    if offset >= 0:
        return torch.cat((x.narrow(dim, offset, length - offset), zeros), dim)
    return torch.cat((zeros, x.narrow(dim, 0, length + offset)), dim)


def _padded(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """x with ``before`` and ``after`` zeros along ``dim``: padded once, so shifted windows are views."""
    zeros = [
        torch.zeros_like(x.narrow(dim, 0, 1)).expand(*x.shape[:dim], n, *x.shape[dim + 1 :])
        for n in (before, after)
    ]
    return torch.cat((zeros[0], x, zeros[1]), dim)


def _outside_sum(x: torch.Tensor, dim: int, window: int, causal: bool = False) -> torch.Tensor:
    """Σ over positions i' ≤ i − window (and i' ≥ i + window unless causal) along ``dim``, by a prefix and a
    suffix running sum: nothing is subtracted."""
    before = _shifted(torch.cumsum(x, dim), dim, -window)
    if causal:
        return before
    after = _shifted(torch.flip(torch.cumsum(torch.flip(x, (dim,)), dim), (dim,)), dim, window)
    return before + after


def _windowed(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    band: torch.Tensor,
    window: int,
    causal: bool,
    mask: torch.Tensor | None,
    bias: Bias,
) -> torch.Tensor:
    """The core of AFT-local and AFT-conv: biases w_{t,t+j} on the band's offsets (see ``_offsets``), 0
    elsewhere (positions then still count, unbiased).

    q, values: (B, N, G, C); keys: (B, N, G, C or 1), −inf at padding; band: (N, G or 1, J), −inf where
    t + j is outside the sequence. Keys outside the band come from running sums (a prefix, and a suffix
    when bidirectional), so nothing is subtracted; the band is added offset by offset. O(N·J·G·C) time,
    O(N·G·C) memory. Returns (B, N, G·C).
    """
    batch, seq_len, groups, channels = values.shape
    exp_keys = torch.exp(keys - _finite(keys.amax(1, keepdim=True)))  # 0 at padding
    weighted_values = exp_keys * values
    reference = _finite(band.amax(-1, keepdim=True)).clamp_min(0)  # ≥ every bias of the row, the 0s too
    exp_band = torch.exp(band - reference)
    outside = torch.exp(-reference)[None]  # the weight of unbiased keys, relative to the reference

    def total(x: torch.Tensor) -> torch.Tensor:
        """Keys outside the band unbiased, plus Σ_j exp(w_{t,t+j} − reference_t) x_{t+j} over the band."""
        result = outside * _outside_sum(x, 1, window, causal)
        padded = _padded(x, 1, window - 1, 0 if causal else window - 1)
        for column in range(exp_band.shape[-1]):
            result = result + exp_band[None, ..., column, None] * padded.narrow(1, column, seq_len)
        return result

    num, den = total(weighted_values), total(exp_keys)
    flat = (batch, seq_len, groups * channels)
    sees = _sees_a_key(mask, batch, seq_len, causal, q.device)
    return _finish(
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
        k, v, seen = causal_finite(k, v, 1, key_channels=True, starts=_starts(packing))
    columns, inside = _offsets(seq_len, window, causal, q.device)
    band = band_from(columns.clamp(0, seq_len - 1)).masked_fill(~inside, float("-inf"))
    if packing is not None or use_kernel("aft_local", q, atomics=_needs_grad(q, k, v, band)):
        from ..kernels.aft import aft_banded

        bounds = None
        if packing is not None:  # keys past a segment's end are left out by the kernel
            band, bounds = band[packing.positions()], packing.bounds
        out = aft_banded(q, k, v, band[:, None], mask, window, bool(causal), bounds)
        return out if seen is None else reinstate(out, seen)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, band = q.to(dtype), k.to(dtype), v.to(dtype), band.to(dtype)
    keys = _masked_keys(k, mask)[:, :, None]
    out = _windowed(q[:, :, None], keys, v[:, :, None], band[:, None], window, causal, mask, bias)
    return (out if seen is None else reinstate(out, seen)).to(out_dtype)


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
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTWindowState]:
    """AFT-local: ``aft_full`` with w'_{t,t'} = w_{t,t'} where |t − t'| < window and 0 elsewhere (not
    −inf: positions outside the window still count, with no bias).

    O(N·window·D) time and O(N·D) memory, never N×N: keys outside the window come from running sums and
    the window is added offset by offset. ``aft_local_lowrank`` takes w as factors u w_vᵀ instead.

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

    Returns:
        (B, N, D) in the inputs' dtype, or (that, final_state) with ``output_final_state``.
    """
    if cu_seqlens is not None:  # packed segments (docs/spec.md §8): whole through the kernel, if it runs
        arguments = locals()  # only here: a traced locals() breaks torch.compile's graph
        if (packing := _whole_through_kernel("aft_local", arguments, "w")) is None:
            return call_packed(aft_local, arguments, q=1, k=1, v=1)
    else:
        packing = None
    mask = _check(q, k, v, attention_mask, recurrent=initial_state is not None or output_final_state)
    causal = check_flag("causal", causal)
    check_float_tensor("w", w, "(N_max, N_max)")
    check_same_dtype_device(q=q, w=w)
    window = check_positive_int("window", window)
    if initial_state is not None or output_final_state:

        def bias(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            _check_table(w, _last_position(rows) + 1)
            near = (rows[:, :, None] - columns[:, None, :]).abs() < window
            pairs = w[rows[:, :, None], columns[:, None, :]].to(compute_dtype(q.dtype))
            return torch.where(near, pairs, torch.zeros_like(pairs))

        def forward(q, k, v, mask):
            return aft_local(q, k, v, w, window=window, causal=True, attention_mask=mask)

        return _recurrent(q, k, v, mask, causal, window, bias, forward, initial_state, output_final_state)
    seq_len = q.shape[1] if packing is None else packing.longest
    _check_table(w, seq_len)
    w = w[:seq_len, :seq_len].to(compute_dtype(w.dtype))

    bias = Bias("table", (w,), (window,))
    return _local(q, k, v, lambda columns: w.gather(1, columns), bias, window, causal, mask, packing)


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
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTWindowState]:
    """``aft_local`` with the paper's factorised biases w = w_u w_vᵀ, given as w_u, w_v: (N_max, d'):
    only the band's entries u_t·v_t' are formed, O(N·window·d'), never the N×N table. ``initial_state``
    and ``output_final_state`` as for ``aft_local``. ``cu_seqlens``: packed segments, as for the
    other ops (docs/spec.md §8)."""
    if cu_seqlens is not None:  # packed segments (docs/spec.md §8): whole through the kernel, if it runs
        arguments = locals()  # only here: a traced locals() breaks torch.compile's graph
        if (packing := _whole_through_kernel("aft_local", arguments, "w_u", "w_v")) is None:
            return call_packed(aft_local_lowrank, arguments, q=1, k=1, v=1)
    else:
        packing = None
    mask = _check(q, k, v, attention_mask, recurrent=initial_state is not None or output_final_state)
    causal = check_flag("causal", causal)
    check_float_tensor("w_u", w_u, "(N_max, rank)")
    check_float_tensor("w_v", w_v, "(N_max, rank)")
    check_same_dtype_device(q=q, w_u=w_u, w_v=w_v)
    check_dims({}, w_u=(w_u, "MR"), w_v=(w_v, "MR"))
    window = check_positive_int("window", window)
    if initial_state is not None or output_final_state:

        def bias(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            if (last := _last_position(rows)) >= w_u.shape[0]:
                raise InvalidValueError(
                    f"w_u and w_v must have a row for position {last}, got {w_u.shape[0]} rows"
                )
            dtype = compute_dtype(q.dtype)
            pairs = torch.einsum("btr,blr->btl", w_u[rows].to(dtype), w_v[columns].to(dtype))
            near = (rows[:, :, None] - columns[:, None, :]).abs() < window
            return torch.where(near, pairs, torch.zeros_like(pairs))

        def forward(q, k, v, mask):
            return aft_local_lowrank(q, k, v, w_u, w_v, window=window, causal=True, attention_mask=mask)

        return _recurrent(q, k, v, mask, causal, window, bias, forward, initial_state, output_final_state)
    seq_len = q.shape[1] if packing is None else packing.longest
    if w_u.shape[0] < seq_len:
        raise InvalidValueError(f"w_u and w_v must have N_max ≥ N = {seq_len} rows, got {w_u.shape[0]}")
    dtype = compute_dtype(q.dtype)
    w_u, w_v = w_u[:seq_len].to(dtype), w_v[:seq_len].to(dtype)

    def band_from(columns: torch.Tensor) -> torch.Tensor:
        # Offset by offset over shifted views of w_v: gathering its rows for every (t, j) would keep an
        # (N, J, rank) copy for the backward (64 MB at N=8192, rank 64, window 32). Rows past either end
        # are zeros here and excluded by the caller.
        padded = _padded(w_v, 0, window - 1, 0 if causal else window - 1)
        terms = [(w_u * padded.narrow(0, j, seq_len)).sum(-1) for j in range(columns.shape[1])]
        return torch.stack(terms, 1)

    return _local(q, k, v, band_from, Bias("lowrank", (w_u, w_v), (window,)), window, causal, mask, packing)


def _aft_conv_2d(q, k, v, w, mask):
    """AFT-conv over an (X, Y) grid: q, v (B, X, Y, H, C); k (B, X, Y, H); w (H, Kx, Ky), odd sizes;
    mask (B, X, Y) or None."""
    batch, size_x, size_y, heads, head_dim = q.shape
    kernel_x, kernel_y = w.shape[1:]
    centre_x, centre_y = kernel_x // 2, kernel_y // 2
    keys = k[..., None] if mask is None else k[..., None].masked_fill(~mask[..., None, None], float("-inf"))
    exp_keys = torch.exp(keys - _finite(keys.amax((1, 2), keepdim=True)))  # (B, X, Y, H, 1), 0 at padding
    weighted_values = exp_keys * v
    reference = _finite(w.amax((1, 2))).clamp_min(0)  # (H,): ≥ every tap and the 0 outside
    exp_taps = torch.exp(w - reference[:, None, None])
    outside_weight = torch.exp(-reference)[:, None]

    def total(x: torch.Tensor) -> torch.Tensor:
        """Keys outside the window unbiased (rows far in x, then near rows far in y), taps inside."""
        far_rows = _outside_sum(x.sum(2, keepdim=True), 1, centre_x + 1)
        far_columns = _outside_sum(x, 2, centre_y + 1)
        near_rows = sum(_shifted(far_columns, 1, dx) for dx in range(-centre_x, centre_x + 1))
        padded = _padded(_padded(x, 1, centre_x, centre_x), 2, centre_y, centre_y)
        inside = 0
        for ix in range(kernel_x):
            for iy in range(kernel_y):
                window = padded.narrow(1, ix, size_x).narrow(2, iy, size_y)
                inside = inside + exp_taps[:, ix, iy, None] * window
        return outside_weight * (far_rows + near_rows) + inside

    flat = (batch, size_x * size_y, heads * head_dim)
    flat_mask = None if mask is None else mask.reshape(batch, -1)
    sees = _sees_a_key(flat_mask, batch, size_x * size_y, False, q.device)
    num, den = total(weighted_values), total(exp_keys)
    out = _finish(
        q.reshape(flat),
        num.reshape(flat),
        den.expand_as(num).reshape(flat),
        sees,
        keys.expand_as(v).reshape(flat),
        v.reshape(flat),
        Bias("conv2d", (w,), (head_dim, size_y)),
        False,
    )
    return out.view(q.shape)


def aft_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    initial_state: AFTWindowState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTWindowState]:
    """AFT-conv: per head h, ``aft_full`` over the head's channels with k_t broadcast across them and
    w_{t,t'} = w[h, t' − t + P] inside the kernel's window, 0 outside (P = K // 2 centred, K odd; or
    P = K − 1 and t' ≤ t when causal); in 2-D the same per axis. The paper's
    conv(e^k ⊙ v, e^w − 1) + Σ e^k ⊙ v form, computed without subtracting: O(N·K·D) time, O(N·D) memory.

    Args:
        q, v: (B, N, H, Dh), or (B, X, Y, H, Dh) for a 2-D grid. k: (B, N, H) or (B, X, Y, H), one key per
            head. w: (H, K), or (H, Kx, Ky) in 2-D. causal: t sees t' ≤ t (1-D only).
        attention_mask: (B, N), or (B, X, Y) in 2-D; True/1 = real position.
        initial_state: causal 1-D only — the ``AFTWindowState`` a previous call returned: this call's tokens
            come after those (default None: a fresh sequence).
        output_final_state: causal 1-D only — also return the state after this call (default False).
            In this recurrent form (either argument given), a padded position leaves the state unchanged
            and positions count each row's real tokens only (docs/spec.md §7).
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).

    Returns:
        q's shape, in the inputs' dtype, or (that, final_state) with ``output_final_state``.
    """
    if cu_seqlens is not None:  # packed segments (docs/spec.md §8): whole through the kernel, if it runs
        arguments = locals()  # only here: a traced locals() breaks torch.compile's graph
        one_d = isinstance(q, torch.Tensor) and q.dim() == 4  # a 2-D grid is not packed through the kernel
        if (packing := _whole_through_kernel("aft_conv", arguments, "w") if one_d else None) is None:
            return call_packed(aft_conv, arguments, q=1, k=1, v=1)
    else:
        packing = None
    if isinstance(q, torch.Tensor) and q.dim() == 5:
        if initial_state is not None or output_final_state:
            raise InvalidValueError("initial_state and output_final_state need the causal 1-D form")
        return _aft_conv_2d_checked(q, k, v, w, causal, attention_mask)
    check_float_tensor("q", q, "(B, N, H, Dh)")
    check_float_tensor("k", k, "(B, N, H)")
    check_float_tensor("v", v, "(B, N, H, Dh)")
    check_float_tensor("w", w, "(H, K)")
    check_same_dtype_device(q=q, k=k, v=v, w=w)
    sizes = check_dims({}, q=(q, "BNHC"), k=(k, "BNH"), v=(v, "BNHC"), w=(w, "HK"))
    batch, seq_len = q.shape[:2]
    kernel_size = sizes["K"]
    causal = check_flag("causal", causal)
    if kernel_size == 0:
        raise InvalidValueError(f"w must hold at least one tap (H, K ≥ 1), got shape {tuple(w.shape)}")
    if not causal and kernel_size % 2 == 0:
        raise InvalidValueError(
            f"a centred (causal=False) kernel needs an odd size K, got w of shape {tuple(w.shape)}"
        )
    mask = check_attention_mask(attention_mask, batch, seq_len, q.device)
    if initial_state is not None or output_final_state:
        return _aft_conv_recurrent(q, k, v, w, mask, causal, initial_state, output_final_state)
    if mask is not None:
        mask = mask | ~mask.any(1, keepdim=True)
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v, w)
    q, k, v = finite_at_padding(q, mask, 1), real_only(k, mask, 1), real_only(v, mask, 1)
    if causal:  # a NaN key or value in the future must not reach earlier rows, nor their gradients
        k, bad_keys = finite_part(k)
        v, bad_values = finite_part(v)
        seen = seen_in_window(bad_keys[..., None] | bad_values, 1, None, starts=_starts(packing))
        return reinstate(_aft_conv(q, k, v, w, mask, True, packing), seen)
    return _aft_conv(q, k, v, w, mask, False, packing)


def _aft_conv_recurrent(q, k, v, w, mask, causal, initial_state, output_final_state):
    """Causal 1-D aft_conv as the windowed recurrence over channels: each head's key over its channels,
    its tap w[h, K − 1 − (t − t')] as the bias of (t, t')."""
    heads, head_dim, kernel_size = q.shape[2], q.shape[3], w.shape[1]

    def bias(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        taps = columns[:, None, :] - rows[:, :, None] + kernel_size - 1
        inside = (taps >= 0) & (taps < kernel_size)
        per_head = w[:, taps.clamp(0, kernel_size - 1)].permute(1, 2, 3, 0)  # (B, T, L, H)
        per_head = torch.where(inside[..., None], per_head, torch.zeros_like(per_head))
        return per_head.repeat_interleave(head_dim, dim=-1)

    def forward(q, k, v, mask):
        q, v = q.unflatten(-1, (heads, head_dim)), v.unflatten(-1, (heads, head_dim))
        k = k[..., ::head_dim]
        return aft_conv(q, k, v, w, causal=True, attention_mask=mask).flatten(-2)

    flat_q, flat_v = q.flatten(-2), v.flatten(-2)
    keys = k.repeat_interleave(head_dim, dim=-1)
    result = _recurrent(
        flat_q, keys, flat_v, mask, causal, kernel_size, bias, forward, initial_state, output_final_state
    )
    if output_final_state:
        return result[0].unflatten(-1, (heads, head_dim)), result[1]
    return result.unflatten(-1, (heads, head_dim))


def _aft_conv(q, k, v, w, mask, causal: bool, packing: Packing | None = None) -> torch.Tensor:
    """1-D aft_conv on checked inputs (see there); a packed row goes through the kernel."""
    batch, seq_len, heads, head_dim = q.shape
    kernel_size = w.shape[1]
    window = kernel_size if causal else kernel_size // 2 + 1
    if packing is not None or use_kernel("aft_conv", q, atomics=_needs_grad(q, k, v, w)):
        from ..kernels.aft import aft_banded

        flat, bounds = (batch, seq_len, heads * head_dim), None if packing is None else packing.bounds
        out = aft_banded(q.reshape(flat), k, v.reshape(flat), w[None], mask, window, bool(causal), bounds)
        return out.view(q.shape)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, w = q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype)
    _, inside = _offsets(seq_len, window, causal, q.device)
    band = w[None].expand(seq_len, -1, -1).masked_fill(~inside[:, None, :], float("-inf"))  # (N, H, K)
    centre = kernel_size - 1 if causal else kernel_size // 2
    keys = _masked_keys(k, mask)[..., None]  # (B, N, H, 1)
    out = _windowed(q, keys, v, band, window, causal, mask, Bias("conv", (w,), (head_dim, centre)))
    return out.view(batch, seq_len, heads, head_dim).to(out_dtype)


def _aft_conv_2d_checked(q, k, v, w, causal, attention_mask):
    check_float_tensor("q", q, "(B, X, Y, H, Dh)")
    check_float_tensor("k", k, "(B, X, Y, H)")
    check_float_tensor("v", v, "(B, X, Y, H, Dh)")
    check_float_tensor("w", w, "(H, Kx, Ky)")
    check_same_dtype_device(q=q, k=k, v=v, w=w)
    check_dims({}, q=(q, "BXYHC"), k=(k, "BXYH"), v=(v, "BXYHC"), w=(w, "HIJ"))
    if check_flag("causal", causal):
        raise InvalidValueError("aft_conv on a 2-D grid is bidirectional only (causal=False)")
    if w.shape[1] % 2 == 0 or w.shape[2] % 2 == 0:
        raise InvalidValueError(f"a 2-D kernel needs odd sizes (Kx, Ky), got w of shape {tuple(w.shape)}")
    batch, size_x, size_y = q.shape[:3]
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (
            batch,
            size_x,
            size_y,
        ):
            shape = (
                tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            )
            raise InvalidValueError(
                f"attention_mask must have shape (B, X, Y) = {(batch, size_x, size_y)}, got {shape}"
            )
        flat = check_attention_mask(attention_mask.reshape(batch, -1), batch, size_x * size_y, q.device)
        mask = (flat | ~flat.any(1, keepdim=True)).view(batch, size_x, size_y)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v, w)
    if mask is not None:  # padded values selected away (0·NaN = NaN)
        v = torch.where(mask[..., None, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    if use_kernel("aft_conv", q, atomics=_needs_grad(q, k, v, w)):
        return _aft_conv_2d_kernel(q, k, v, w, mask)
    return _aft_conv_2d(q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype), mask).to(out_dtype)


def _aft_conv_2d_kernel(q, k, v, w, mask):
    """2-D aft_conv through the band kernel. With the grid flattened row-major (t = x·Y + y), every key
    within Px rows and Py columns of t lies at a flat offset |j| < W = Px·Y + Py + 1: the band holds the
    tap there, and 0 (unbiased) at the span's other offsets (columns farther than Py, wrapping across
    rows); keys beyond the span come from the kernel's prefix and suffix scans. O(N·W·D) time."""
    from ..kernels.aft import aft_banded

    batch, size_x, size_y, heads, head_dim = q.shape
    kernel_x, kernel_y = w.shape[1:]
    centre_x, centre_y = kernel_x // 2, kernel_y // 2
    length = size_x * size_y
    window = min(centre_x * size_y + centre_y, length - 1) + 1
    positions = torch.arange(length, device=q.device)
    targets = positions[:, None] + torch.arange(1 - window, window, device=q.device)[None, :]  # (N, J)
    dx = targets.div(size_y, rounding_mode="floor") - (positions // size_y)[:, None]
    dy = targets.remainder(size_y) - (positions % size_y)[:, None]
    taps = w[:, (dx + centre_x).clamp(0, kernel_x - 1), (dy + centre_y).clamp(0, kernel_y - 1)]  # (H, N, J)
    inside = (dx.abs() <= centre_x) & (dy.abs() <= centre_y)
    band = torch.where(inside, taps, torch.zeros((), dtype=w.dtype, device=w.device))
    in_grid = (targets >= 0) & (targets < length)
    band = band.masked_fill(~in_grid, float("-inf")).permute(1, 0, 2)  # (N, H, J)
    flat = (batch, length, heads * head_dim)
    key_mask = None if mask is None else mask.reshape(batch, length)
    out = aft_banded(
        q.reshape(flat), k.reshape(batch, length, heads), v.reshape(flat), band, key_mask, window, False
    )
    return out.view(q.shape)


def aft_accumulate(
    running: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold unbiased keys k (B, J, D) with values v (B, J, D) — those ``mask`` (B, J) selects — into
    running (max, numerator, denominator), each (B, D), relative to the running maximum: the state of
    AFT decoding for keys whose bias is 0. A row that has seen no key holds (−inf, 0, 0)."""
    dtype = compute_dtype(k.dtype)
    k, v = k.to(dtype), v.to(dtype)
    if mask is not None:
        k = k.masked_fill(~mask[..., None], float("-inf"))
        v = real_only(v, mask, 1)
    new_max = k.amax(1) if k.shape[1] else k.new_full((k.shape[0], k.shape[2]), float("-inf"))
    if running is not None:
        new_max = torch.maximum(running[0], new_max)
    new_max = new_max.detach()  # a shift: the results are invariant to it (see _finite)
    shift = _finite(new_max)
    weights = torch.exp(k - shift[:, None])
    numerator, denominator = (weights * v).sum(1), weights.sum(1)
    if running is not None:
        rescale = torch.exp(running[0] - shift)
        numerator, denominator = numerator + rescale * running[1], denominator + rescale * running[2]
    return new_max, numerator, denominator


def aft_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    key_mask: torch.Tensor | None = None,
    running: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal AFT continued from a state: the newest T queries q (B, T, D) over explicit keys k, values
    v (B, L, D), L ≥ T, the last T being the queries' own (causal offsets aligned to the end), with
    biases ``bias`` (B, T, L) or per channel (B, T, L, D) (None: 0), real keys ``key_mask`` (B, L), and
    older keys folded into ``running`` (see ``aft_accumulate``) with bias 0. Every (row, channel) is
    computed under the joint maximum of its own terms. → (B, T, D)."""
    use_kernel(
        "aft_full", q, unsupported="a chunk continued from a decoding state runs on the reference path"
    )
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    queries, length = q.shape[1], k.shape[1]
    allowed = (
        torch.arange(length, device=q.device)[None, :]
        <= (length - queries + torch.arange(queries, device=q.device))[:, None]
    )
    allowed = allowed[None] if key_mask is None else allowed[None] & key_mask[:, None, :]  # (B, T, L)
    values = v if key_mask is None else real_only(v, key_mask, 1)
    if running is not None:  # the folded keys as one more term, seen by every query
        seen = torch.isfinite(running[0])  # (B, D)
        denominator = torch.where(seen, running[2], torch.ones_like(running[2]))
        folded_key = torch.where(seen, running[0] + torch.log(denominator), torch.zeros_like(running[0]))
        folded_value = running[1] / denominator
    rows = max(1, _BLOCK_ELEMENTS // max(1, q.shape[0] * (length + 1) * q.shape[2]))
    outputs = []
    for start in range(0, queries, rows):
        block = slice(start, min(queries, start + rows))
        scores = (
            k[:, None]
            if bias is None
            else k[:, None] + (bias[:, block] if bias.dim() == 4 else bias[:, block, :, None]).to(dtype)
        )
        scores = scores.expand(q.shape[0], block.stop - block.start, length, q.shape[2])
        visible = allowed[:, block, :, None].expand_as(scores)
        terms_values = values[:, None].expand_as(scores)
        if running is not None:
            extra = folded_key[:, None, None].expand(-1, scores.shape[1], 1, -1)
            scores = torch.cat((scores, extra), 2)
            visible = torch.cat((visible, seen[:, None, None].expand(-1, scores.shape[1], 1, -1)), 2)
            terms_values = torch.cat((terms_values, folded_value[:, None, None].expand_as(extra)), 2)
        visible = visible | ~visible.any(2, keepdim=True)  # a padded query that sees nothing: anything
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.exp(scores - _finite(scores.amax(2, keepdim=True)))
        terms = torch.where(visible, weights * terms_values, torch.zeros((), dtype=dtype, device=q.device))
        outputs.append(terms.sum(2) / weights.sum(2))
    out = torch.sigmoid(q) * torch.cat(outputs, 1)
    return out


class AFTWindowState(NamedTuple):
    """Causal AFT-local's or AFT-conv's recurrent state: each row's next position (its count of real
    tokens), its last window − 1 real keys and values one by one (right-aligned, with their positions
    and which slots are in use), and every older key folded into running (max, numerator, denominator)
    (see ``aft_accumulate``), whose bias is 0."""

    positions: torch.Tensor  # (B,) long
    keys: torch.Tensor  # (B, s − 1, D)
    values: torch.Tensor  # (B, s − 1, D)
    key_positions: torch.Tensor  # (B, s − 1) long
    key_real: torch.Tensor  # (B, s − 1) bool
    running: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (B, D) each


def _empty_window_state(k: torch.Tensor, v: torch.Tensor, kept: int) -> AFTWindowState:
    batch, channels, dtype = k.shape[0], k.shape[-1], compute_dtype(k.dtype)
    return AFTWindowState(
        torch.zeros(batch, dtype=torch.long, device=k.device),
        k.new_zeros(batch, kept, channels),
        v.new_zeros(batch, kept, v.shape[-1]),
        torch.zeros(batch, kept, dtype=torch.long, device=k.device),
        torch.zeros(batch, kept, dtype=torch.bool, device=k.device),
        (
            torch.full((batch, channels), float("-inf"), dtype=dtype, device=k.device),
            torch.zeros(batch, v.shape[-1], dtype=dtype, device=k.device),
            torch.zeros(batch, channels, dtype=dtype, device=k.device),
        ),
    )


def _check_window_state(state: object, q: torch.Tensor, kept: int) -> None:
    if not isinstance(state, AFTWindowState):
        raise InvalidTypeError(
            f"initial_state must be the AFTWindowState a previous call returned, got {type(state).__name__}"
        )
    expected = (q.shape[0], kept, q.shape[-1])
    if tuple(state.keys.shape) != expected or state.positions.shape != (q.shape[0],):
        raise InvalidValueError(
            f"initial_state holds keys of shape {tuple(state.keys.shape)}; this call needs (B, s − 1, D) = "
            f"{expected}"
        )


def _last_position(rows: torch.Tensor) -> int:
    """The largest query position, for a bound check — a host sync, so skipped inside a compiled graph
    (whose caller bounds positions by the state's capacity instead)."""
    return -1 if torch.compiler.is_compiling() or rows.numel() == 0 else int(rows.max())


def _recurrent(q, k, v, mask, causal, window, bias, forward, initial_state, output_final_state):
    if not causal:
        raise InvalidValueError("initial_state and output_final_state need causal=True (the recurrent form)")
    return _window_recurrent(q, k, v, mask, window, bias, forward, initial_state, output_final_state)


def _window_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    window: int,
    bias: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    forward: Callable[..., torch.Tensor],
    initial_state: AFTWindowState | None,
    output_final_state: bool,
):
    """Causal AFT over a chunk q, k, v (B, T, D) continued from ``initial_state``: keys within
    ``window`` − 1 positions of a query carry ``bias(query_positions (B, T), key_positions (B, L))``
    ((B, T, L) or (B, T, L, D), 0 outside the window), older ones count unbiased. Each row's real tokens
    (``mask``) are moved to its front first, so a padded position leaves the state unchanged and positions
    count real tokens only. Without a state the chunk is ``forward(q, k, v, mask)``, the op itself."""
    kept = window - 1
    if initial_state is not None:
        _check_window_state(initial_state, q, kept)
    chunk = compact(mask, q.shape[0], q.shape[1], q.device)
    q, k, v = chunk.gather(q), chunk.gather(k), chunk.gather(v)
    state = initial_state if initial_state is not None else _empty_window_state(k, v, kept)
    steps = state.positions[:, None] + torch.arange(q.shape[1], device=q.device)  # (B, T)
    keys = torch.cat((state.keys.to(k.dtype), k), 1)
    values = torch.cat((state.values.to(v.dtype), v), 1)
    key_positions = torch.cat((state.key_positions, steps), 1)
    valid = chunk.valid if chunk.valid is not None else torch.ones_like(steps, dtype=torch.bool)
    real = torch.cat((state.key_real, valid), 1)
    if initial_state is None:  # positions start at 0 and the chunk's padding comes last: the op itself
        out = forward(q, k, v, chunk.valid)
    else:
        terms = bias(steps, key_positions.clamp_min(0))
        out = aft_cached(q, keys, values, terms, key_mask=real, running=state.running).to(q.dtype)
    out = chunk.scatter(out)
    if not output_final_state:
        return out
    # Keys older than the newest window − 1 real ones now count unbiased.
    end = kept + chunk.counts
    older = real & (torch.arange(keys.shape[1], device=q.device)[None, :] < (end - kept)[:, None])
    final = AFTWindowState(
        state.positions + chunk.counts,
        *(last_real(t, chunk, kept) for t in (keys, values, key_positions, real)),
        aft_accumulate(state.running, keys, values, older),
    )
    return out, final
