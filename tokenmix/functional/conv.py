"""Lightweight and dynamic convolutions (Wu et al. 2019; docs/spec.md §5).

x: (B, N, C) with H heads; channel c belongs to head h(c) = c // (C/H) (contiguous blocks, as fairseq's
LightweightConv1dTBC), and a head's channels share its kernel:

    y[b, t, c] = Σ_{j=0}^{K−1} W̃[h(c), j] · x[b, t + j − P, c]

W̃ = softmax over the K taps (``weight_softmax``) or the raw weight; P = (K − 1) // 2 (centred) or K − 1
(causal). Terms outside [0, N) or at padded positions are 0 (no renormalisation).

Two execution paths compute the same sum: a sliding window (grouped ``conv1d`` for lightconv, one
multiply-add per tap for dynamic_conv; memory O(N·C)) and a band matrix (the
(B·H, N, N) banded kernel times the (B·H, N, C/H) input), faster for short sequences on the CPU. The
op picks by length; both are tested against the reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backend import use_kernel
from ..core.checks import (
    check_attention_mask,
    check_dims,
    check_flag,
    check_float_tensor,
    check_same_dtype_device,
    compute_dtype,
    empty_output,
)
from ..core.excluded import all_finite, finite_at_padding, finite_part, real_only, reinstate, seen_in_window
from ..core.packing import Packing, packable
from ..core.state import DecodingState
from ..errors import InvalidValueError
from ._typing import recurrent_op

__all__ = ["ConvWindowState", "dynamic_conv", "lightconv"]


@dataclass
class ConvWindowState(DecodingState):
    """Causal lightconv's and dynamic_conv's recurrent state: the last K − 1 inputs before the next call
    (zeros before the sequence's start; padding as 0), constant in size. The ``lightconv`` and
    ``dynamic_conv`` mixers hold this state itself, with the last K − 1 real inputs."""

    inputs: torch.Tensor | None = None  # (B, K − 1, C)


# The band-matrix path is taken when K ≥ min_kernel_size and N ≤ max_length_per_tap · K: band costs
# grow as N² and windows as N·K. Measured on the CPU with benchmarks/conv.py (B=8, C=256, H=8): the band
# wins up to N ≈ 4K from K = 31 (lightconv) and K = 15 (dynamic_conv), and never for smaller kernels.
BAND_RULE = {"lightconv": (31, 4), "dynamic_conv": (15, 4)}


def _use_band(op_name: str, seq_len: int, kernel_size: int) -> bool:
    min_kernel_size, max_length_per_tap = BAND_RULE[op_name]
    return kernel_size >= min_kernel_size and seq_len <= max_length_per_tap * kernel_size


def _prepare(
    x: torch.Tensor,
    weight: torch.Tensor,
    attention_mask: torch.Tensor | None,
    weight_softmax: bool,
    layout: str,
    x_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate, zero the padded positions of x, normalise the kernel; return x (in ``x_dtype``, by
    default the compute dtype), the kernel (in the compute dtype) and the head count."""
    check_float_tensor("x", x, "(B, N, C)")
    check_float_tensor("weight", weight, layout)
    check_same_dtype_device(x=x, weight=weight)
    heads = weight.shape[-2]
    if heads == 0 or x.shape[-1] % heads:
        raise InvalidValueError(
            f"the number of heads H = weight.shape[-2] = {heads} must divide the channels C = x.shape[-1] = "
            f"{x.shape[-1]}"
        )
    if weight.shape[-1] == 0:
        raise InvalidValueError("kernel_size K = weight.shape[-1] must be at least 1")
    mask = check_attention_mask(attention_mask, x.shape[0], x.shape[1], x.device)
    dtype = compute_dtype(x.dtype)
    x = x.to(x_dtype or dtype)
    x = real_only(x, mask, 1)
    if weight.dim() == 4:  # dynamic_conv: a padded row's own kernel, like a query, stays finite
        weight = finite_at_padding(weight, mask, 1)
    kernel = weight.to(dtype)
    return x, (kernel.softmax(-1) if weight_softmax else kernel), heads


def _left_padding(kernel_size: int, causal: bool) -> int:
    return kernel_size - 1 if causal else (kernel_size - 1) // 2


def _band(kernel: torch.Tensor, seq_len: int, causal: bool) -> torch.Tensor:
    """Rows of taps (..., N, K) — row t is output t's kernel — as banded (..., N, N) matrices:
    band[..., t, s] = kernel[..., t, s − t + P] where 0 ≤ s − t + P < K, else 0."""
    kernel_size = kernel.shape[-1]
    positions = torch.arange(seq_len, device=kernel.device)
    taps = positions[None, :] - positions[:, None] + _left_padding(kernel_size, causal)  # (N, N)
    inside = (taps >= 0) & (taps < kernel_size)
    band = kernel.gather(-1, taps.clamp(0, kernel_size - 1).expand(*kernel.shape[:-1], seq_len))
    return torch.where(inside, band, torch.zeros((), dtype=band.dtype, device=band.device))  # selected away


def _by_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) → (B, H, N, C/H)."""
    batch, seq_len, channels = x.shape
    return x.view(batch, seq_len, heads, channels // heads).transpose(1, 2)


def _from_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, H, N, C/H) → (B, N, C)."""
    batch, heads, seq_len, width = y.shape
    return y.transpose(1, 2).reshape(batch, seq_len, heads * width)


def lightconv_window(x: torch.Tensor, kernel: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Sliding-window path: a depthwise ``conv1d`` whose C filters repeat each head's kernel."""
    kernel_size = kernel.shape[-1]
    left = _left_padding(kernel_size, causal)
    filters = kernel.repeat_interleave(x.shape[-1] // heads, dim=0)[:, None, :]  # (C, 1, K)
    padded = F.pad(x.transpose(1, 2), (left, kernel_size - 1 - left))
    return F.conv1d(padded, filters, groups=x.shape[-1]).transpose(1, 2)


def lightconv_band(x: torch.Tensor, kernel: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Band-matrix path: (H, N, N) banded kernels times the (B, H, N, C/H) input."""
    seq_len = x.shape[1]
    band = _band(kernel[:, None, :].expand(heads, seq_len, kernel.shape[-1]), seq_len, causal)
    return _from_heads(band @ _by_head(x, heads))


def dynamic_conv_window(x: torch.Tensor, kernel: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Sliding-window path: one fused multiply-add per tap, each over the shifted input with that tap of
    every position's kernel broadcast across the head's channels. Memory O(N·C): autograd keeps only
    views of the input and kernel."""
    batch, seq_len, channels = x.shape
    kernel_size = kernel.shape[-1]
    left = _left_padding(kernel_size, causal)
    padded = F.pad(x, (0, 0, left, kernel_size - 1 - left)).view(batch, -1, heads, channels // heads)
    taps = kernel[..., None]  # (B, N, H, K, 1)
    y = padded[:, :seq_len] * taps[..., 0, :]
    for j in range(1, kernel_size):
        y = torch.addcmul(y, padded[:, j : j + seq_len], taps[..., j, :])
    return y.reshape(batch, seq_len, channels)


def dynamic_conv_band(x: torch.Tensor, kernel: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Band-matrix path: (B, H, N, N) banded per-position kernels times the (B, H, N, C/H) input."""
    band = _band(kernel.transpose(1, 2), x.shape[1], causal)  # kernel (B, N, H, K) → rows (B, H, N, K)
    return _from_heads(band @ _by_head(x, heads))


_PATHS = {
    "lightconv": (lightconv_window, lightconv_band),
    "dynamic_conv": (dynamic_conv_window, dynamic_conv_band),
}


def _packable_conv(op_name: str, **dims: int) -> Callable:
    """``packable`` for a convolution: a packed row goes through the kernel in one launch over every
    segment (it reads each position's segment, so no tap crosses a boundary) when the kernel runs."""

    def kernel(x: object, *_: object, **__: object) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() == 3 and use_kernel(op_name, x)

    return packable(kernel, **dims)


def _segments(packing: Packing | None) -> torch.Tensor | None:
    return None if packing is None else packing.segment_ids


def _convolve(
    op_name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    layout: str,
    causal: bool,
    weight_softmax: bool,
    attention_mask: torch.Tensor | None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
    causal, weight_softmax = check_flag("causal", causal), check_flag("weight_softmax", weight_softmax)
    if isinstance(x, torch.Tensor) and x.numel() == 0 and x.dim() == 3:
        _prepare(x, weight, attention_mask, weight_softmax, layout)  # still checked
        return empty_output(x.shape, x, weight)
    if use_kernel(op_name, x):
        from ..kernels.conv import depthwise_conv_fwd

        # The kernel reads x in its own dtype (padding zeroed) and float32 taps; it accumulates in float32.
        x, kernel, heads = _prepare(x, weight, attention_mask, weight_softmax, layout, x_dtype=x.dtype)
        return depthwise_conv_fwd(x, kernel.float(), heads, bool(causal), segments)
    x, kernel, heads = _prepare(x, weight, attention_mask, weight_softmax, layout)
    window, band = _PATHS[op_name]
    kernel_size = kernel.shape[-1]
    path = band if _use_band(op_name, x.shape[1], kernel_size) else window
    if all_finite(x):
        return path(x, kernel, heads, causal).to(out_dtype)
    # Compute with finite inputs, then mark the outputs whose own taps see a non-finite one: the band
    # matrix's 0s outside each row's taps, and the kernels' gradients at rows that see none (0·NaN), see
    # nothing of it.
    x, bad = finite_part(x)
    left = _left_padding(kernel_size, causal)
    out = path(x, kernel, heads, causal)
    return reinstate(out, seen_in_window(bad, 1, left, kernel_size - 1 - left)).to(out_dtype)


@recurrent_op(ConvWindowState)
@_packable_conv("lightconv", x=1)
def lightconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    causal: bool = False,
    weight_softmax: bool = True,
    attention_mask: torch.Tensor | None = None,
    initial_state: ConvWindowState | None = None,
    output_final_state: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ConvWindowState]:
    """Lightweight convolution: ``y[b,t,c] = Σ_j W̃[h(c), j] · x[b, t+j−P, c]``, one kernel per head.

    Args:
        x: (B, N, C).
        weight: (H, K), H dividing C; any K ≥ 1 (even, or longer than N, included).
        causal: P = K − 1 (position t sees t−K+1 … t); else P = (K − 1) // 2 (default False).
        weight_softmax: normalise each head's K taps with a softmax first (default True).
        attention_mask: (B, N), True/1 = real token; padded positions contribute 0 (default None).
        initial_state: causal only — the ``ConvWindowState`` a previous call returned: the K − 1 inputs
            (B, K − 1, C) before x (default None: zeros, the sequence's start).
        output_final_state: causal only — also return the ``ConvWindowState`` after this call: the last
            K − 1 inputs, padding as 0 (default False).
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, N, C) in x's dtype (half precision is computed in float32), or (that, final_state).
    """
    if initial_state is not None or output_final_state:
        return _from_state(
            "lightconv",
            x,
            weight,
            "(H, K)",
            causal,
            weight_softmax,
            attention_mask,
            initial_state,
            output_final_state,
        )
    segments = _segments(packing)
    return _convolve("lightconv", x, weight, "(H, K)", causal, weight_softmax, attention_mask, segments)


def _from_state(
    op_name, x, weight, layout, causal, weight_softmax, attention_mask, initial_state, output_final_state
):
    """The causal convolution continued from the K − 1 inputs before x: one call over them and x."""
    if not check_flag("causal", causal):
        raise InvalidValueError("initial_state and output_final_state need causal=True (the recurrent form)")
    check_float_tensor("x", x, "(B, N, C)")
    check_float_tensor("weight", weight, layout)
    batch, length, channels = x.shape
    taps = weight.shape[-1]
    shape = (batch, taps - 1, channels)
    if initial_state is None:
        initial_state = x.new_zeros(shape)
    elif isinstance(initial_state, ConvWindowState):
        initial_state = x.new_zeros(shape) if initial_state.empty else initial_state.inputs
    else:
        check_float_tensor("initial_state", initial_state, "ConvWindowState (B, K − 1, C)")
        warnings.warn(
            "initial_state as a bare tensor is deprecated; pass the ConvWindowState a previous call returned",
            DeprecationWarning,
            stacklevel=4,  # the caller of the op (through packable)
        )
    check_float_tensor("initial_state", initial_state, "(B, K − 1, C)")
    if tuple(initial_state.shape) != shape:
        raise InvalidValueError(
            f"initial_state must have shape (B, K − 1, C) = {shape}, got {tuple(initial_state.shape)}"
        )
    mask = check_attention_mask(attention_mask, batch, length, x.device)
    full = torch.cat((initial_state.to(x.dtype), real_only(x, mask, 1)), 1)
    if op_name == "dynamic_conv":  # no outputs are read at the state's positions: any kernel there
        weight = torch.cat((weight.new_zeros(batch, taps - 1, *weight.shape[2:]), weight), 1)
    out = _convolve(op_name, full, weight, layout, True, weight_softmax, None)[:, taps - 1 :]
    return (out, ConvWindowState(full[:, length:])) if output_final_state else out


@recurrent_op(ConvWindowState)
@_packable_conv("dynamic_conv", x=1, weight=1)
def dynamic_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    causal: bool = False,
    weight_softmax: bool = True,
    attention_mask: torch.Tensor | None = None,
    initial_state: ConvWindowState | None = None,
    output_final_state: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ConvWindowState]:
    """Dynamic convolution: as ``lightconv`` but output position t has its own kernel weight[b, t].

    Args:
        x: (B, N, C).
        weight: (B, N, H, K), H dividing C.
        causal, weight_softmax, attention_mask, initial_state, output_final_state: as for ``lightconv``.
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, N, C) in x's dtype, or (that, final_state).
    """
    check_float_tensor("x", x, "(B, N, C)")
    check_float_tensor("weight", weight, "(B, N, H, K)")
    check_dims({}, x=(x, "BN"), weight=(weight, "BN"))
    if initial_state is not None or output_final_state:
        return _from_state(
            "dynamic_conv", x, weight, "(B, N, H, K)", causal, weight_softmax, attention_mask, initial_state,
            output_final_state,
        )  # fmt: skip
    segments = _segments(packing)
    return _convolve(
        "dynamic_conv", x, weight, "(B, N, H, K)", causal, weight_softmax, attention_mask, segments
    )
