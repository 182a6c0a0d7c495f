"""Excluded terms are selected away, never multiplied by 0: 0·NaN = NaN, so a NaN or inf at a padded
or (causal) future position would otherwise reach outputs that do not see it.

Two tools, shared by every op:
- ``real_only`` zeroes padded positions by selection before any sum.
- Where an op's causal or windowed sum is a product with a matrix that holds 0s for the excluded
  terms (SDPA, pointwise attention's tiles, a band matrix), ``finite_part`` feeds it the finite values
  only and ``reinstate`` puts NaN back on exactly the outputs whose own terms are non-finite, so a row
  that does see a NaN still says so.
"""

from __future__ import annotations

import torch


def real_only(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``x`` with the positions that ``mask`` (B, N) marks as padding set to 0, N being ``dim`` of x."""
    if mask is None:
        return x
    shape = [1] * x.dim()
    shape[0], shape[dim] = mask.shape
    return torch.where(mask.view(shape), x, torch.zeros((), dtype=x.dtype, device=x.device))


def finite_at_padding(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Queries: a padded row's output is unspecified but must stay finite, and its zero cotangent must
    not turn a NaN there into NaN gradients (0·NaN); non-finite entries at padded positions become 0,
    finite ones are kept (so padded rows read as before)."""
    if mask is None:
        return x
    shape = [1] * x.dim()
    shape[0], shape[dim] = mask.shape
    keep = mask.view(shape) | torch.isfinite(x)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry is finite, when that is known without waiting on a device: on the CPU, by one
    sum per tensor (a sum is finite only if all its terms are; one that overflows answers False). Then
    the careful bookkeeping below has nothing to do and is skipped. On an accelerator, or inside a
    compiled graph, False: the careful path always (a host sync per op would cost more)."""
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" for t in tensors):
        return False
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def finite_part(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with non-finite entries set to 0, and where they were."""
    bad = ~torch.isfinite(x)
    return torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x), bad


def seen_in_window(
    bad: torch.Tensor, dim: int, before: int | None, after: int = 0, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Whether position i has a flagged entry among positions i − before … i + after along ``dim``
    (``before=None``: every position from 0), by differences of a running count: O(N) per channel.
    ``starts`` (N,): where each position's packed segment starts — nothing before it counts."""
    length = bad.shape[dim]
    index = torch.arange(length, device=bad.device)
    upper = (index + after + 1).clamp(max=length)
    lower = torch.zeros_like(index) if before is None else (index - before).clamp(min=0)
    return seen_between(bad, dim, lower if starts is None else torch.maximum(lower, starts), upper)


def seen_between(bad: torch.Tensor, dim: int, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Whether position i has a flagged entry among positions lower[i] … upper[i] − 1 along ``dim``."""
    counts = bad.to(torch.int32).cumsum(dim)
    padded = torch.cat(
        (torch.zeros_like(counts.narrow(dim, 0, 1)).expand_as(counts.narrow(dim, 0, 1)), counts), dim
    )  # padded[j] = number of flagged entries before position j
    return padded.index_select(dim, upper) - padded.index_select(dim, lower) > 0


def reinstate(out: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """``out`` with NaN wherever ``seen`` (broadcastable to it) says a non-finite term was its own."""
    if seen is None:
        return out
    return torch.where(seen, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


def causal_finite(
    keys: torch.Tensor,
    values: torch.Tensor,
    dim: int,
    key_channels: bool,
    starts: torch.Tensor | None = None,
):
    """Finite keys and values for a causal sum along ``dim``, and where each output row sees a
    non-finite one of its own (at a position ≤ its own, in its packed segment when ``starts`` (N,) says
    where each position's starts): per channel for values, and for keys per channel (``key_channels``,
    AFT) or across all of a row's channels (a key enters every channel through its score). ``seen`` is
    None when every key and value is known to be finite (``all_finite``)."""
    if all_finite(keys, values):
        return keys, values, None
    keys, bad_keys = finite_part(keys)
    values, bad_values = finite_part(values)
    if not key_channels:
        bad_keys = bad_keys.any(-1, keepdim=True)
    return (
        keys,
        values,
        seen_in_window(bad_keys, dim, None, starts=starts)
        | seen_in_window(bad_values, dim, None, starts=starts),
    )
