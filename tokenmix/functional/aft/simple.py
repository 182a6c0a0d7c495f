"""AFT-simple: ``aft_full`` with w = 0 — one softmax per channel (bidirectional) or a chunked prefix scan
carrying the running maximum (causal); its recurrent form."""

from __future__ import annotations

import warnings

import torch

from ...backend import use_kernel
from ...core.checks import (
    check_attention_mask,
    check_flag,
    check_float_tensor,
    compute_dtype,
    empty_output,
)
from ...core.excluded import causal_finite, finite_at_padding, real_only, reinstate
from ...core.packing import Packing
from ...errors import InvalidTypeError, InvalidValueError
from .._typing import recurrent_op
from .common import (
    check_inputs,
    finish,
    masked_keys,
    needs_grad,
    packable_aft,
    sees_a_key,
    segment_starts,
)
from .exact import NO_BIAS, finite_shift
from .recurrent import AFTSimpleState, aft_accumulate, folded, folded_position

SCAN_CHUNK = 64


@recurrent_op(AFTSimpleState)
@packable_aft("aft_simple")
def aft_simple(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    initial_state: AFTSimpleState | None = None,
    output_final_state: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTSimpleState]:
    """AFT-simple: ``aft_full`` with w = 0, ``y_t = σ(q_t) ⊙ Σ softmax_{t'∈S(t)}(k)_{t'} ⊙ v_t'``, O(N·D).

    Bidirectional: one softmax over the sequence per channel. Causal: a prefix scan over chunks carrying
    the running maximum, numerator and denominator per channel.

    Args:
        q, k, v: (B, N, D).
        causal: t sees t' ≤ t (default False).
        attention_mask: (B, N), True/1 = real token (default None: all real).
        initial_state: causal only — the ``AFTSimpleState`` (max, numerator, denominator), each (B, D),
            of the keys before this call, as a previous call's final state (default None: none).
        output_final_state: causal only — also return the state after this call (default False).
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, N, D) in the inputs' dtype, or (that, final_state) with ``output_final_state``.
    """
    if initial_state is not None or output_final_state:
        return _aft_simple_recurrent(q, k, v, causal, attention_mask, initial_state, output_final_state)
    mask = check_inputs(q, k, v, attention_mask)
    causal = check_flag("causal", causal)
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v)
    return _selected(q, k, v, mask, causal, packing)


def _selected(q, k, v, mask, causal: bool, packing=None, running: AFTSimpleState | None = None):
    """aft_simple on checked, non-empty inputs, non-finite entries selected away where they must not
    reach; causal ones continued from ``running`` when given."""
    q, k, v = finite_at_padding(q, mask, 1), real_only(k, mask, 1), real_only(v, mask, 1)
    if causal:  # a NaN key or value in the future must not reach earlier rows, nor their gradients
        k, v, seen = causal_finite(k, v, 1, key_channels=True, starts=segment_starts(packing))
        return reinstate(_aft_simple(q, k, v, mask, True, packing, running), seen)
    return _aft_simple(q, k, v, mask, False, packing)


def _aft_simple_recurrent(q, k, v, causal, attention_mask, initial_state, output_final_state):
    """aft_simple continued from / returning the running (max, numerator, denominator)."""
    if not check_flag("causal", causal):
        raise InvalidValueError("initial_state and output_final_state need causal=True (the recurrent form)")
    check_inputs(q, k, v, attention_mask)
    real = check_attention_mask(attention_mask, q.shape[0], q.shape[1], q.device)  # padding folds nothing
    initial_state = _checked_state(initial_state, q)
    if initial_state is None or q.shape[1] == 0:
        out = aft_simple(q, k, v, causal=True, attention_mask=attention_mask)
    elif real is None and q.shape[1] == 1:  # one token: fold it in, then read the ratio
        state = aft_accumulate(initial_state, k, v)
        ratio = state.numerator[:, None] / state.denominator[:, None]
        out = (torch.sigmoid(q.to(ratio.dtype)) * ratio).to(q.dtype)
        return (out, state) if output_final_state else out
    else:  # the scan started from the state: O(T·D), as from nothing
        out = _selected(q, k, v, real, True, running=initial_state)
    if not output_final_state:
        return out
    return out, aft_accumulate(initial_state, k, v, real)


def _checked_state(state: object, q: torch.Tensor) -> AFTSimpleState | None:
    """The running (max, numerator, denominator) to continue from; None for a fresh sequence (a mixer's
    state before its first chunk included)."""
    if isinstance(state, tuple) and len(state) == 3:  # the NamedTuple this type was before
        warnings.warn(
            "initial_state as a (max, numerator, denominator) tuple is deprecated; pass the AFTSimpleState "
            "a previous call returned",
            DeprecationWarning,
            stacklevel=5,  # the caller of the op (through packable)
        )
        state = AFTSimpleState(*state)
    if state is None or (isinstance(state, AFTSimpleState) and state.empty):
        return None
    if not isinstance(state, AFTSimpleState):
        raise InvalidTypeError(
            "initial_state must be the AFTSimpleState (max, numerator, denominator) a previous call "
            f"returned, got {type(state).__name__}"
        )
    for name in ("max", "numerator", "denominator"):
        part = getattr(state, name)
        check_float_tensor(f"initial_state {name}", part, "(B, D)")
        if tuple(part.shape) != (q.shape[0], q.shape[2]):
            raise InvalidValueError(
                f"initial_state {name} must have shape (B, D) = {(q.shape[0], q.shape[2])}, "
                f"got {tuple(part.shape)}"
            )
    return state


def _aft_simple(
    q, k, v, mask, causal: bool, packing: Packing | None = None, running: AFTSimpleState | None = None
) -> torch.Tensor:
    """aft_simple on checked inputs (see there), causal continued from ``running`` when given; a packed
    row goes through the kernel."""
    if packing is not None or use_kernel("aft_simple", q, atomics=needs_grad(q, k, v)):
        if running is not None:
            return _prepended(q, k, v, mask, running)
        from ...kernels.aft import aft_simple as kernel

        return kernel(q, k, v, mask, bool(causal), None if packing is None else packing.bounds)
    batch, seq_len, _ = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    keys = masked_keys(k, mask)
    if not causal:
        weights = torch.softmax(keys, dim=1)  # every sequence has a real key (see check_inputs)
        return (torch.sigmoid(q) * (weights * v).sum(1, keepdim=True)).to(out_dtype)
    if running is None:
        carry_max = keys.new_full((batch, 1, keys.shape[-1]), float("-inf"))
        carry_num = keys.new_zeros(batch, 1, keys.shape[-1])
        carry_den = keys.new_zeros(batch, 1, keys.shape[-1])
    else:
        parts = (running.max, running.numerator, running.denominator)
        carry_max, carry_num, carry_den = (x.to(dtype)[:, None] for x in parts)
    nums, dens = [], []
    # split, not slices: a slice's backward writes into a zero tensor of the full (B, N, D) each time,
    # which made the scan's backward quadratic in N.
    for chunk, values in zip(keys.split(SCAN_CHUNK, 1), v.split(SCAN_CHUNK, 1), strict=True):
        new_max = torch.maximum(carry_max, chunk.amax(1, keepdim=True)).detach()  # a shift (see finite_shift)
        reference = finite_shift(new_max)
        weights = torch.exp(chunk - reference)
        rescale = torch.exp(carry_max - reference)  # ≤ 1; 0 while nothing was seen
        num = torch.cumsum(weights * values, 1) + rescale * carry_num
        den = torch.cumsum(weights, 1) + rescale * carry_den
        nums.append(num)
        dens.append(den)
        carry_max, carry_num, carry_den = new_max, num[:, -1:], den[:, -1:]
    sees = sees_a_key(mask, batch, seq_len, True, q.device)
    row_offset = 0
    if running is not None:  # its keys: one more, before every row
        key, value = folded(running)
        keys, v, row_offset = (key[:, None].to(dtype), keys), (value[:, None].to(dtype), v), 1
    out = finish(q, torch.cat(nums, 1), torch.cat(dens, 1), sees, keys, v, NO_BIAS, True, row_offset)
    return out.to(out_dtype)


def _prepended(q, k, v, mask, running: AFTSimpleState) -> torch.Tensor:
    """The causal kernel continued from ``running``, which it cannot start from: the state's keys enter as
    one more key before the rows (``folded_position``), seen by all of them, its own row cut away."""
    from ...kernels.aft import aft_simple as kernel

    key, value, seen = folded_position(running)
    keys = torch.cat((key[:, None].to(k.dtype), k), 1)
    values = torch.cat((value[:, None].to(v.dtype), v), 1)
    real = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if mask is None else mask
    real = torch.cat((seen.any(-1)[:, None], real), 1)
    out = kernel(torch.cat((q[:, :1], q), 1), keys, values, real, True, None)
    return out[:, 1:]
