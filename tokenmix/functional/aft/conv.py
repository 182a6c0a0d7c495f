"""AFT-conv: per-head keys and a learned kernel of biases, over a sequence (1-D, also causal and
recurrent) or a grid (2-D, bidirectional)."""

from __future__ import annotations

import torch

from ...backend import use_kernel
from ...core.checks import (
    check_attention_mask,
    check_dims,
    check_flag,
    check_float_tensor,
    check_same_dtype_device,
    compute_dtype,
    empty_output,
)
from ...core.excluded import all_finite, finite_at_padding, finite_part, real_only, reinstate, seen_in_window
from ...core.packing import Packing
from ...errors import InvalidValueError
from .._typing import recurrent_op
from .common import (
    finish,
    masked_keys,
    needs_grad,
    packable_aft,
    sees_a_key,
    segment_starts,
)
from .exact import Bias, finite_shift
from .local import band_offsets, outside_sum, pad_zeros, shift_zeros, windowed
from .recurrent import AFTWindowState, recurrent


@recurrent_op(AFTWindowState)
@packable_aft("aft_conv", one_d=True)
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
    packing: Packing | None = None,
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
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        q's shape, in the inputs' dtype, or (that, final_state) with ``output_final_state``.
    """
    if isinstance(q, torch.Tensor) and q.dim() == 5:
        if initial_state is not None or output_final_state:
            raise InvalidValueError("initial_state and output_final_state need the causal 1-D form")
        return _aft_conv_2d_checked(q, k, v, w, causal, attention_mask)
    check_float_tensor("q", q, "(B, N, H, Dh)")
    check_float_tensor("k", k, "(B, N, H)")
    check_float_tensor("v", v, "(B, N, H, Dh)")
    check_float_tensor("w", w, "(H, K)")
    check_same_dtype_device(q=q, k=k, v=v, w=w)
    check_dims({}, q=(q, "BNHC"), k=(k, "BNH"), v=(v, "BNHC"), w=(w, "HK"))
    batch, seq_len = q.shape[:2]
    causal = check_flag("causal", causal)
    check_conv_kernel(w, causal)
    mask = check_attention_mask(attention_mask, batch, seq_len, q.device)
    if initial_state is not None or output_final_state:
        return _aft_conv_recurrent(q, k, v, w, mask, causal, initial_state, output_final_state)
    if mask is not None:
        mask = mask | ~mask.any(1, keepdim=True)
    if q.numel() == 0:
        return empty_output(q.shape, q, k, v, w)
    q, k, v = finite_at_padding(q, mask, 1), real_only(k, mask, 1), real_only(v, mask, 1)
    if not causal or all_finite(k, v):
        return _aft_conv(q, k, v, w, mask, causal, packing)
    # A NaN key or value in the future must not reach earlier rows, nor their gradients.
    k, bad_keys = finite_part(k)
    v, bad_values = finite_part(v)
    seen = seen_in_window(bad_keys[..., None] | bad_values, 1, None, starts=segment_starts(packing))
    return reinstate(_aft_conv(q, k, v, w, mask, True, packing), seen)


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
    result = recurrent(
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
    if packing is not None or use_kernel("aft_conv", q, atomics=needs_grad(q, k, v, w)):
        from ...kernels.aft import aft_local

        flat, bounds = (batch, seq_len, heads * head_dim), None if packing is None else packing.bounds
        out = aft_local(q.reshape(flat), k, v.reshape(flat), w[None], mask, window, bool(causal), bounds)
        return out.view(q.shape)
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, w = q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype)
    band = conv_band(w, seq_len, causal)
    centre = kernel_size - 1 if causal else kernel_size // 2
    keys = masked_keys(k, mask)[..., None]  # (B, N, H, 1)
    out = windowed(q, keys, v, band, window, causal, mask, Bias("conv", (w,), (head_dim, centre)))
    return out.view(batch, seq_len, heads, head_dim).to(out_dtype)


def _aft_conv_2d_checked(q, k, v, w, causal, attention_mask):
    check_float_tensor("q", q, "(B, X, Y, H, Dh)")
    check_float_tensor("k", k, "(B, X, Y, H)")
    check_float_tensor("v", v, "(B, X, Y, H, Dh)")
    check_float_tensor("w", w, "(H, Kx, Ky)")
    check_same_dtype_device(q=q, k=k, v=v, w=w)
    check_dims({}, q=(q, "BXYHC"), k=(k, "BXYH"), v=(v, "BXYHC"), w=(w, "HIJ"))
    check_grid_kernel(w, causal)
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
    if use_kernel("aft_conv", q, atomics=needs_grad(q, k, v, w)):
        return _aft_conv_2d_kernel(q, k, v, w, mask)
    return _aft_conv_2d(q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype), mask).to(out_dtype)


def check_conv_kernel(w: torch.Tensor, causal: bool) -> None:
    """A 1-D kernel's rules, in the op and its context-parallel form: w (H, K), K ≥ 1, odd when centred."""
    if w.shape[1] == 0:
        raise InvalidValueError(f"w must hold at least one tap (H, K ≥ 1), got shape {tuple(w.shape)}")
    if not causal and w.shape[1] % 2 == 0:
        raise InvalidValueError(
            f"a centred (causal=False) kernel needs an odd size K, got w of shape {tuple(w.shape)}"
        )


def conv_band(w: torch.Tensor, seq_len: int, causal: bool) -> torch.Tensor:
    """(N, H, K): a 1-D kernel w (H, K) as the band of every one of N positions (its taps on the offsets
    of ``band_offsets``), −inf where t + j falls outside the N."""
    window = w.shape[1] if causal else w.shape[1] // 2 + 1
    _, inside = band_offsets(seq_len, window, causal, w.device)
    return w[None].expand(seq_len, -1, -1).masked_fill(~inside[:, None, :], float("-inf"))


def check_grid_kernel(w: torch.Tensor, causal: object) -> None:
    """A 2-D kernel's rules, in the op and its context-parallel form: bidirectional, odd sizes (centred)."""
    if check_flag("causal", causal):
        raise InvalidValueError("aft_conv on a 2-D grid is bidirectional only (causal=False)")
    if w.shape[1] % 2 == 0 or w.shape[2] % 2 == 0:
        raise InvalidValueError(f"a 2-D kernel needs odd sizes (Kx, Ky), got w of shape {tuple(w.shape)}")


def _aft_conv_2d(q, k, v, w, mask):
    """AFT-conv over an (X, Y) grid: q, v (B, X, Y, H, C); k (B, X, Y, H); w (H, Kx, Ky), odd sizes;
    mask (B, X, Y) or None."""
    batch, size_x, size_y, heads, head_dim = q.shape
    kernel_x, kernel_y = w.shape[1:]
    centre_x, centre_y = kernel_x // 2, kernel_y // 2
    keys = k[..., None] if mask is None else k[..., None].masked_fill(~mask[..., None, None], float("-inf"))
    exp_keys = torch.exp(
        keys - finite_shift(keys.amax((1, 2), keepdim=True))
    )  # (B, X, Y, H, 1), 0 at padding
    weighted_values = exp_keys * v
    reference = finite_shift(w.amax((1, 2))).clamp_min(0)  # (H,): ≥ every tap and the 0 outside
    exp_taps = torch.exp(w - reference[:, None, None])
    outside_weight = torch.exp(-reference)[:, None]

    def total(x: torch.Tensor) -> torch.Tensor:
        """Keys outside the window unbiased (rows far in x, then near rows far in y), taps inside."""
        far_rows = outside_sum(x.sum(2, keepdim=True), 1, centre_x + 1)
        far_columns = outside_sum(x, 2, centre_y + 1)
        near_rows = sum(shift_zeros(far_columns, 1, dx) for dx in range(-centre_x, centre_x + 1))
        padded = pad_zeros(pad_zeros(x, 1, centre_x, centre_x), 2, centre_y, centre_y)
        inside = 0
        for ix in range(kernel_x):
            for iy in range(kernel_y):
                window = padded.narrow(1, ix, size_x).narrow(2, iy, size_y)
                inside = inside + exp_taps[:, ix, iy, None] * window
        return outside_weight * (far_rows + near_rows) + inside

    flat = (batch, size_x * size_y, heads * head_dim)
    flat_mask = None if mask is None else mask.reshape(batch, -1)
    sees = sees_a_key(flat_mask, batch, size_x * size_y, False, q.device)
    num, den = total(weighted_values), total(exp_keys)
    out = finish(
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


def _aft_conv_2d_kernel(q, k, v, w, mask):
    """2-D aft_conv through the band kernel. With the grid flattened row-major (t = x·Y + y), every key
    within Px rows and Py columns of t lies at a flat offset |j| < W = Px·Y + Py + 1: the band holds the
    tap there, and 0 (unbiased) at the span's other offsets (columns farther than Py, wrapping across
    rows); keys beyond the span come from the kernel's prefix and suffix scans. O(N·W·D) time, so the grid
    is flattened along whichever axis gives the narrower span (the op is symmetric in the two axes)."""
    from ...kernels.aft import aft_local

    batch, size_x, size_y, heads, head_dim = q.shape
    kernel_x, kernel_y = w.shape[1:]
    centre_x, centre_y = kernel_x // 2, kernel_y // 2
    if centre_y * size_x + centre_x < centre_x * size_y + centre_y:  # column-major is narrower
        transposed = _aft_conv_2d_kernel(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), w.transpose(1, 2),
            None if mask is None else mask.transpose(1, 2),
        )  # fmt: skip
        return transposed.transpose(1, 2)
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
    out = aft_local(
        q.reshape(flat), k.reshape(batch, length, heads), v.reshape(flat), band, key_mask, window, False
    )
    return out.view(q.shape)
