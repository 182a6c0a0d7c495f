"""AFT's exact recomputation of underflowed denominators (docs/spec.md §4).

The reference paths compute Σ e^(s) v / Σ e^(s), s_{t,t'} = k_t' + w_{t,t'}, with separately shifted
exponentials (matmuls, running sums); an entry whose terms all lie far below the separate maxima
underflows and is recomputed under its own joint maximum. Which entries do is known only from the values,
so in eager mode they are gathered with ``nonzero``. Under ``torch.compile`` the recomputation is one
opaque custom op (``tokenmix::aft_exact_underflowed_fwd``), with a backward op that replays it under
autograd: the graph keeps static shapes and no host sync, so ``fullgraph=True`` traces every AFT op.

The biases w_{t,t'} are described by data (``Bias``), not a closure, so the custom ops can take them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Elements of one block of the reference paths: flagged entries × keys here, score rows × keys (×
# batch) in aft_full, rows × keys × channels in aft_cached.
BLOCK_ELEMENTS = 1 << 22


def finite_shift(m: torch.Tensor) -> torch.Tensor:
    """A maximum as a shift: detached (every result here is invariant to the shift, so its gradient
    through the shift is exactly 0 and skipping it saves a backward pass), and finite (a maximum over no
    terms is −inf; any finite stand-in works there, since all its terms are 0)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()


class Bias(NamedTuple):
    """The biases w_{t,t'} of rows t, as data. ``kind``:
    - "none": 0 (AFT-simple);
    - "table": rows of ``tensors[0]`` (N, N), zeroed where |t − t'| ≥ ``sizes[0]`` unless that is 0;
    - "lowrank": rows of u vᵀ (``tensors`` = (u, v), each (N, rank)), windowed likewise;
    - "conv": the tap w[h, t' − t + centre] of head h = channel // head_dim inside the kernel, else 0
      (``tensors[0]`` (H, K), ``sizes`` = (head_dim, centre));
    - "conv2d": the same on a grid ``size_y`` wide, flattened row-major (``tensors[0]`` (H, Kx, Ky), odd
      sizes, centred; ``sizes`` = (head_dim, size_y));
    - "band": w_{t,t+j} = ``tensors[0]``[t, h, j + R] for |j| ≤ R, 0 farther (``tensors[0]`` (N, H, 2R + 1),
      h = channel // ``sizes[0]``): any biases given on a band, as a context-parallel share's 2-D
      AFT-conv gives its rows' taps at their global positions."""

    kind: str
    tensors: tuple[torch.Tensor, ...] = ()
    sizes: tuple[int, ...] = ()


NO_BIAS = Bias("none")

# A sequence (B, L, …) as one tensor, or as pieces along dim 1 that make it when laid end to end: a
# context-parallel share's keys with the halo and folded keys beside them, never copied into one unless
# the one tensor is needed.
Pieces = torch.Tensor | tuple[torch.Tensor, ...]


def bias_rows(
    bias: Bias, seq_len: int, rows: torch.Tensor, channels: torch.Tensor, row_offset: int = 0
) -> torch.Tensor | None:
    """(M, N): the biases of rows ``rows`` (M,) for channels ``channels`` (M,); None for "none". A table's
    rows are looked up at ``rows``; distances are taken from ``rows + row_offset``, the rows' positions
    (a context-parallel block's table holds only its own rows)."""
    if bias.kind == "none":
        return None
    positions = torch.arange(seq_len, device=rows.device)
    at = rows + row_offset
    if bias.kind in ("table", "lowrank"):
        full = bias.tensors[0][rows] if bias.kind == "table" else bias.tensors[0][rows] @ bias.tensors[1].T
        window = bias.sizes[0] if bias.sizes else 0
        if not window:
            return full
        near = (positions[None, :] - at[:, None]).abs() < window
        return torch.where(near, full, torch.zeros_like(full))
    if bias.kind == "band":
        (band,), head_dim, reach = bias.tensors, bias.sizes[0], bias.tensors[0].shape[-1] // 2
        columns = at[:, None] + torch.arange(-reach, reach + 1, device=rows.device)  # (M, 2R + 1)
        inside = (columns >= 0) & (columns < seq_len)
        taps = torch.where(inside, band[rows, channels // head_dim], torch.zeros((), dtype=band.dtype))
        full = torch.zeros(len(rows), seq_len, dtype=band.dtype, device=rows.device)
        return full.scatter_add(1, columns.clamp(0, seq_len - 1), taps)  # outside: adds 0
    (w,), (head_dim, extent) = bias.tensors, bias.sizes
    if bias.kind == "conv":
        kernels, kernel_size = w[channels // head_dim], w.shape[1]  # (M, K)
        taps = positions[None, :] - at[:, None] + extent  # (M, N): the kernel index of each key
        near = (taps >= 0) & (taps < kernel_size)
        return torch.where(
            near, kernels.gather(1, taps.clamp(0, kernel_size - 1)), torch.zeros_like(kernels[:, :1])
        )
    ix, iy, inside = grid_taps(at[:, None], positions[None, :], extent, w.shape[1:])
    taps = w[(channels // head_dim)[:, None], ix, iy]
    return torch.where(inside, taps, torch.zeros_like(taps))


def grid_taps(
    rows: torch.Tensor, keys: torch.Tensor, size_y: int, kernel: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For flat positions ``rows`` and ``keys`` (broadcast together) of a grid ``size_y`` wide, row-major:
    the tap (ix, iy) of a centred (Kx, Ky) kernel that each key falls on about its row (clamped into
    the kernel) and whether it falls inside it."""
    kernel_x, kernel_y = kernel
    dx = keys // size_y - rows // size_y + kernel_x // 2
    dy = keys % size_y - rows % size_y + kernel_y // 2
    inside = (dx >= 0) & (dx < kernel_x) & (dy >= 0) & (dy < kernel_y)
    return dx.clamp(0, kernel_x - 1), dy.clamp(0, kernel_y - 1), inside


def exact(
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: Bias,
    causal: bool,
    flagged: torch.Tensor,
    row_offset: int = 0,
) -> torch.Tensor:
    """Σ exp(s) v / Σ exp(s) with s_{t'} = k_{t'} + w_{t,t'} over row t's visible keys, with the joint
    maximum of s subtracted, for each flagged (b, t, d) of the (B, T, D) boolean ``flagged``, in the
    order of ``flagged.nonzero()``. keys, values: (B, L, D); padded keys are −inf. Row t sits at
    position t + ``row_offset`` (0: the rows are the keys' own positions)."""
    batch_idx, row_idx, channel_idx = flagged.nonzero(as_tuple=True)
    seq_len = keys.shape[1]
    positions = torch.arange(seq_len, device=keys.device)
    ratios = []
    step = max(1, BLOCK_ELEMENTS // seq_len)
    for start in range(0, len(batch_idx), step):
        b, t, d = (idx[start : start + step] for idx in (batch_idx, row_idx, channel_idx))
        scores = keys[b, :, d]  # (M, N)
        rows = bias_rows(bias, seq_len, t, d, row_offset)
        if rows is not None:
            scores = scores + rows
        if causal:
            scores = scores.masked_fill(positions[None, :] > t[:, None] + row_offset, float("-inf"))
        weights = torch.exp(scores - finite_shift(scores.amax(-1, keepdim=True)))
        terms = torch.where(scores == float("-inf"), torch.zeros_like(weights), weights * values[b, :, d])
        ratios.append(terms.sum(-1) / weights.sum(-1))
    return torch.cat(ratios) if ratios else keys.new_zeros(0)


def pieces_of(x: Pieces) -> tuple[torch.Tensor, ...]:
    """A sequence given as a tensor or in pieces (see ``Pieces``), as its pieces."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def laid(x: Pieces) -> torch.Tensor:
    """A sequence given in pieces along dim 1 (see ``Pieces``) as one tensor; a tensor as it is."""
    if isinstance(x, torch.Tensor):
        return x
    return x[0] if len(x) == 1 else torch.cat(x, 1)


def recompute_underflowed(
    ratio: torch.Tensor,
    flagged: torch.Tensor,
    keys: Pieces,
    values: Pieces,
    bias: Bias,
    causal: bool,
    row_offset: int = 0,
) -> torch.Tensor:
    """``ratio`` (B, T, D) with its ``flagged`` entries replaced by ``exact``'s. ``keys`` and ``values``
    (B, L, D) may come in pieces (a running state's one key in front, a context share's halo), laid
    together only when some entry is recomputed."""
    if torch.compiler.is_compiling():
        sizes = (*bias.sizes, 0, 0)[:2]  # ints, not a list: the op's backward returns None for each
        keys, values = laid(keys), laid(values)
        return aft_exact_underflowed_fwd(
            ratio, flagged, keys, values, list(bias.tensors), bias.kind, *sizes, causal, row_offset
        )
    if flagged.device.type != "meta" and bool(flagged.any()):  # meta tensors: shapes only, no values
        exact_ratios = exact(laid(keys), laid(values), bias, causal, flagged, row_offset)
        return ratio.index_put(flagged.nonzero(as_tuple=True), exact_ratios)
    return ratio


@torch.library.custom_op("tokenmix::aft_exact_underflowed_fwd", mutates_args=())
def aft_exact_underflowed_fwd(
    ratio: torch.Tensor,
    flagged: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias_tensors: list[torch.Tensor],
    kind: str,
    size_a: int,
    size_b: int,
    causal: bool,
    row_offset: int,
) -> torch.Tensor:
    """``recompute_underflowed`` as one op (see the module's docstring); size_a, size_b: the bias's
    sizes, 0 where it has fewer."""
    if not bool(flagged.any()):
        return ratio.clone()
    bias = Bias(kind, tuple(bias_tensors), (size_a, size_b))
    exact_ratios = exact(keys, values, bias, causal, flagged, row_offset)
    return ratio.index_put(flagged.nonzero(as_tuple=True), exact_ratios)


@aft_exact_underflowed_fwd.register_fake
def _(ratio, flagged, keys, values, bias_tensors, kind, size_a, size_b, causal, row_offset):
    return torch.empty_like(ratio)


@torch.library.custom_op("tokenmix::aft_exact_underflowed_bwd", mutates_args=())
def aft_exact_underflowed_bwd(
    grad: torch.Tensor,
    flagged: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias_tensors: list[torch.Tensor],
    kind: str,
    size_a: int,
    size_b: int,
    causal: bool,
    row_offset: int,
) -> list[torch.Tensor]:
    """The gradients of ``aft_exact_underflowed_fwd`` w.r.t. ratio, keys, values and the bias tensors: grad
    with the flagged entries zeroed, and the exact values' by replaying them under autograd."""
    grad_ratio = grad.masked_fill(flagged, 0)
    inputs = (keys, values, *bias_tensors)
    if not bool(flagged.any()):
        return [grad_ratio, *(torch.zeros_like(t) for t in inputs)]

    def recompute(keys, values, *tensors):
        return exact(keys, values, Bias(kind, tensors, (size_a, size_b)), causal, flagged, row_offset)

    # torch.func's vjp: a custom op's body runs below PyTorch's autograd, which would record nothing.
    _, vjp = torch.func.vjp(recompute, *inputs)
    return [grad_ratio, *vjp(grad[flagged])]


@aft_exact_underflowed_bwd.register_fake
def _(grad, flagged, keys, values, bias_tensors, kind, size_a, size_b, causal, row_offset):
    return [torch.empty_like(grad), torch.empty_like(keys), torch.empty_like(values)] + [
        torch.empty_like(t) for t in bias_tensors
    ]


def _setup_context(ctx, inputs, output):
    _, flagged, keys, values, bias_tensors, *options = inputs
    ctx.save_for_backward(flagged, keys, values, *bias_tensors)
    ctx.options = options


def _backward(ctx, grad):
    flagged, keys, values, *bias_tensors = ctx.saved_tensors
    grad_ratio, grad_keys, grad_values, *grad_bias = aft_exact_underflowed_bwd(
        grad, flagged, keys, values, bias_tensors, *ctx.options
    )
    return grad_ratio, None, grad_keys, grad_values, grad_bias, None, None, None, None, None


aft_exact_underflowed_fwd.register_autograd(_backward, setup_context=_setup_context)
