"""What the AFT ops share: input checks, the packed-call decision, and the finish of every reference
path (σ(q) ⊙ num/den, underflowed denominators recomputed exactly, key-less rows 0)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...backend import use_kernel
from ...core.checks import (
    check_attention_mask,
    check_dims,
    check_float_tensor,
    check_same_dtype_device,
)
from ...core.packing import Packing, packable
from ...errors import InvalidValueError
from .exact import Bias, Pieces, recompute_underflowed

# A denominator below this (relative to its separate maxima) is recomputed with the joint maximum; far
# above the dtype's smallest normal number, so entries kept from the fast path keep full precision.
TINY = {torch.float32: 2.0**-60, torch.float64: 2.0**-600}


def check_inputs(
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


def needs_grad(*tensors: object) -> bool:
    """Whether a backward will run: the AFT kernels' backward adds with atomics (see ``use_kernel``)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def packable_aft(name: str, one_d: bool = False) -> Callable:
    """``packable`` for an AFT op on q, k, v (B, N, …): a packed row goes whole through ``name``'s kernel,
    which takes the segments itself, when the kernel runs (its backward's atomics allowed); ``one_d``:
    only for 1-D inputs (B, N, H, Dh)."""

    def kernel(q: torch.Tensor, k: object, v: object, *weights: object, **options: object) -> bool:
        if one_d and q.dim() != 4:  # a 2-D grid is not packed through the kernel
            return False
        return use_kernel(name, q, atomics=needs_grad(q, k, v, *weights, *options.values()))

    return packable(kernel, q=1, k=1, v=1)


def segment_starts(packing: Packing | None) -> torch.Tensor | None:
    """Where each position's segment starts, for the causal NaN bookkeeping; None when not packed."""
    return None if packing is None else packing.starts()


def check_table(w: torch.Tensor, seq_len: int) -> None:
    if w.shape[0] != w.shape[1] or w.shape[0] < seq_len:
        raise InvalidValueError(
            f"w must be a square (N_max, N_max) table with N_max ≥ N = {seq_len}, got shape {tuple(w.shape)}"
        )


def masked_keys(k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """k with padded positions at −inf, so they vanish from every max and exp."""
    return k if mask is None else k.masked_fill(~mask[..., None], float("-inf"))


def finish(
    q: torch.Tensor,
    num: torch.Tensor,
    den: torch.Tensor,
    sees_a_key: torch.Tensor,
    keys: Pieces,
    values: Pieces,
    bias: Bias,
    causal: bool,
    row_offset: int = 0,
) -> torch.Tensor:
    """σ(q) ⊙ num/den, with underflowed denominators recomputed exactly and key-less rows set to 0
    (rows at positions ``row_offset`` onwards of the keys, which may come in pieces: see
    ``recompute_underflowed``)."""
    flagged = (den < TINY[den.dtype]) & sees_a_key
    # Entries that are flagged or see no key divide by 1, selected (not multiplied) away: their tiny or
    # zero den would give the backward num/den² = inf, and inf·0 = NaN in the gradients of k, v and w.
    ratio = num / torch.where(flagged | ~sees_a_key, torch.ones_like(den), den)
    exact_ratio = recompute_underflowed(ratio, flagged, keys, values, bias, causal, row_offset)
    return torch.sigmoid(q) * exact_ratio


def sees_a_key(mask: torch.Tensor | None, batch: int, seq_len: int, causal: bool, device) -> torch.Tensor:
    """(B, N, 1): whether row t has at least one real key in S(t)."""
    if mask is None:
        return torch.ones(1, seq_len, 1, dtype=torch.bool, device=device)
    counts = mask.cumsum(1) if causal else mask.sum(1, keepdim=True).expand(batch, seq_len)
    return (counts > 0)[..., None]
