"""Ops over a sequence split across a context-parallel group (docs/spec.md §14): each takes this rank's
share of the inputs (its ``Split.length`` positions) and returns this rank's share of the output, equal
to the same op on the whole sequence, forward and backward. What each sends is what its shape needs:

- a window (``lightconv``, ``dynamic_conv``): the K − 1 (causal) or ⌊(K − 1)/2⌋ + ⌈(K − 1)/2⌉ positions
  beside the rank's edges (``halo``);
- a state carried forward (``aft_simple``): each rank's (max, numerator, denominator) per channel, O(d),
  folded over the ranks before it (causal) or all others (bidirectional);
- both (``aft_local``, ``aft_local_lowrank``, ``aft_conv``): the window's keys as a halo, and the keys
  beyond it folded, O(window·d + world·d);
- all pairs: ``softmax_attention`` and ``pointwise_attention`` by ring attention (``tokenmix.context.ring``:
  every rank's keys and values pass by, one share at a time), ``aft_full`` and ``aft_full_lowrank`` from
  every rank's keys and values gathered (``gather_sequence``), taken as the op takes them (matmuls over
  blocks of rows). Only these take a zig-zag split (``Split.of(..., order="zigzag")``,
  balanced when causal); the others refuse it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from ..core.checks import (
    check_attention_mask,
    check_dims,
    check_flag,
    check_float_tensor,
    check_positive_int,
    check_same_dtype_device,
    compute_dtype,
)
from ..core.excluded import all_finite, causal_finite, finite_at_padding, finite_part, real_only, reinstate
from ..errors import InvalidValueError
from ..functional import aft as aft_ops
from ..functional import attention as attention_ops
from ..functional import conv as conv_ops
from ..functional import flash as flash_ops
from ..functional.aft.common import check_inputs, check_table, finish, masked_keys, sees_a_key
from ..functional.aft.conv import check_conv_kernel, check_grid_kernel, conv_band
from ..functional.aft.exact import BLOCK_ELEMENTS, Bias, finite_shift, grid_taps
from ..functional.aft.full import row_sums, stacked_terms
from ..functional.aft.local import banded, local_band, lowrank_band
from ..functional.aft.recurrent import folded, folded_position
from ..functional.flash import mixed_chunk_attention as mixed_chunk_attention_op
from .exchange import Split, gather_sequence, gather_summaries, halo, halo_edges, pad_positions
from .ring import ring_attention

__all__ = [
    "aft_conv",
    "aft_full",
    "aft_full_lowrank",
    "aft_local",
    "aft_local_lowrank",
    "aft_simple",
    "dynamic_conv",
    "lightconv",
    "pointwise_attention",
    "softmax_attention",
]


def _local_mask(
    split: Split, x: torch.Tensor, attention_mask: torch.Tensor | None, dim: int = 1, all_pairs: bool = False
):
    split.check_local("x", x, dim)
    if not all_pairs:  # windows and states pass from rank to rank in the sequence's order
        split.require_contiguous()
    return check_attention_mask(attention_mask, x.shape[0], split.length, x.device)


def _window(kernel_size: int, causal: bool) -> tuple[int, int]:
    """Positions before and after an output that its kernel reads (as the ops lay taps out)."""
    before = kernel_size - 1 if causal else (kernel_size - 1) // 2
    return before, kernel_size - 1 - before


def lightconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    split: Split,
    *,
    causal: bool = False,
    weight_softmax: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.lightconv`` over a split sequence.

    Args:
        x: (B, n, C), this rank's positions. weight: (H, K), the same on every rank.
        split: how the sequence lies over the group (``Split.of(N, group)``).
        causal, weight_softmax: as for the op. attention_mask: (B, n), this rank's (default None).

    Returns:
        (B, n, C): this rank's outputs.
    """
    return _convolution(conv_ops.lightconv, x, weight, split, causal, weight_softmax, attention_mask)


def dynamic_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    split: Split,
    *,
    causal: bool = False,
    weight_softmax: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.dynamic_conv`` over a split sequence: x (B, n, C) and each position's kernel
    weight (B, n, H, K), this rank's; the halo carries inputs only (each output reads its own kernel).
    Other arguments as for ``lightconv``."""
    check_float_tensor("weight", weight, "(B, n, H, K)")
    return _convolution(conv_ops.dynamic_conv, x, weight, split, causal, weight_softmax, attention_mask)


def _convolution(op, x, weight, split, causal, weight_softmax, attention_mask) -> torch.Tensor:
    """The op over this rank's inputs with their halo; its outputs at the halo (not this rank's) are cut
    away, so a per-position kernel there may be anything: zeros."""
    check_float_tensor("x", x, "(B, n, C)")
    mask = _local_mask(split, x, attention_mask)
    before, after = _window(weight.shape[-1], check_flag("causal", causal))
    wide = halo(real_only(x, mask, 1), split, before, after)
    if weight.dim() == 4:
        weight = pad_positions(weight, 1, before, after)
    out = op(wide, weight, causal=causal, weight_softmax=weight_softmax)
    return out[:, before : before + split.length]


def aft_simple(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    split: Split,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.aft_simple`` over a split sequence. Each rank sends its keys' running
    (max, numerator, denominator) per channel. Causal: those of the ranks before it fold into one state,
    from which the op's own scan starts (its ``initial_state``). Bidirectional: every rank's fold into
    the whole sequence's softmax-weighted mean of v per channel, which every row reads (σ(q) ⊙ it).

    Args:
        q, k, v: (B, n, D), this rank's positions. split: the sequence's split.
        causal: as for the op. attention_mask: (B, n), this rank's (default None).

    Returns:
        (B, n, D): this rank's outputs.
    """
    check_float_tensor("q", q, "(B, n, D)")
    mask = _local_mask(split, q, attention_mask)
    summaries = torch.stack(gather_summaries(_summary(k, v, mask), split))
    ranks = torch.arange(split.world, device=q.device)
    # Every rank's summary stays in every rank's graph (selected, not dropped), so the gather's backward,
    # a collective, runs on all of them.
    if causal:  # the op's own scan, started from the ranks before
        state = _fold(summaries, ranks < split.rank)
        return aft_ops.aft_simple(q, k, v, causal=True, attention_mask=mask, initial_state=state)
    check_inputs(q, k, v, mask)
    _, mean = folded(_fold(summaries, ranks >= 0))
    dtype = compute_dtype(q.dtype)
    return (torch.sigmoid(finite_at_padding(q, mask, 1).to(dtype)) * mean[:, None]).to(q.dtype)


def _summary(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(3, B, D): the (max, numerator, denominator) of keys k (B, J, K) over values v (B, J, D), as
    ``aft_accumulate`` folds them; its exponentials made again in the backward, not kept (as large as k)."""

    def fold(k, v, mask):
        state = aft_ops.aft_accumulate(None, k, v, mask)
        return torch.stack((state.max, state.numerator, state.denominator))

    if not torch.is_grad_enabled():
        return fold(k, v, mask)
    return checkpoint(fold, k, v, mask, use_reentrant=False)


def _fold(summaries: torch.Tensor, selected: torch.Tensor) -> aft_ops.AFTSimpleState:
    """The (max, numerator, denominator) of the ranks ``selected`` (R,) selects among ``summaries``
    (R, 3, B, D), folded into one running state (B, D) each. A channel where a selected rank saw a
    non-finite key (a NaN or +inf maximum) folds to a NaN maximum, one where it saw only a non-finite
    value to a NaN numerator, so that it reaches the rows that see those keys, as in the op."""
    maxima = summaries[:, 0]
    bad_key = torch.isnan(maxima) | (maxima == float("inf")) | ~torch.isfinite(summaries[:, 2])
    bad_value = bad_key | ~torch.isfinite(summaries[:, 1])
    nan_key, nan_value = ((selected[:, None, None] & bad).any(0) for bad in (bad_key, bad_value))  # (B, D)
    counted = selected[:, None, None] & torch.isfinite(maxima)
    floor = torch.full((), float("-inf"), dtype=maxima.dtype, device=maxima.device)
    shift = finite_shift(torch.where(counted, maxima, floor).amax(0).detach())  # the sums are invariant to it
    zero = torch.zeros((), dtype=maxima.dtype, device=maxima.device)
    scale = torch.where(counted, torch.exp(torch.where(counted, maxima, shift) - shift), zero)
    # Ranks not counted are selected away, not multiplied by 0 (0 · NaN is NaN).
    numerator, denominator = (torch.where(counted, scale * summaries[:, i], zero).sum(0) for i in (1, 2))
    nan = torch.full((), float("nan"), dtype=maxima.dtype, device=maxima.device)
    top = torch.where(nan_key, nan, torch.where(denominator > 0, shift, floor))
    return aft_ops.AFTSimpleState(top, torch.where(nan_value, nan, numerator), denominator)


def _folded(summaries: torch.Tensor, selected: torch.Tensor):
    """``_fold``'s state as one key and value per channel (B, D) (0 where no key was seen) and per row
    whether any was (B,), for an op that takes them as one more key."""
    key, value, seen = folded_position(_fold(summaries, selected))
    return key, value, seen.any(-1)


def aft_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    split: Split,
    *,
    window: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.aft_local`` over a split sequence. The keys within window − 1 positions of
    this rank's edges arrive as a halo; every key farther away has bias 0 for all of this rank's queries,
    so each rank sends, for every other rank, the (max, numerator, denominator) of its keys beyond that
    rank's halo (O(world·d)), and they enter the op as one key before the halo (and one after it, when
    bidirectional), each at a distance ≥ window from this rank's queries.

    Args:
        q, k, v: (B, n, D), this rank's positions. w: (N_max, N_max), N_max ≥ N, the same on every rank.
        split: the sequence's split. window, causal, attention_mask: as for the op (the mask this
            rank's (B, n)).

    Returns:
        (B, n, D): this rank's outputs.
    """
    check_float_tensor("w", w, "(N_max, N_max)")
    check_table(w, split.total)
    window = check_positive_int("window", window)

    def band(index: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return w[index[:, None], index[columns]]

    return _local_band(band, q, k, v, w, split, window, causal, attention_mask)


def aft_local_lowrank(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    w_v: torch.Tensor,
    split: Split,
    *,
    window: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.aft_local_lowrank`` over a split sequence, as ``aft_local`` here: the
    factors' rows at the global positions, never the table. u, w_v: (N_max, rank), N_max ≥ N."""
    check_float_tensor("u", u, "(N_max, rank)")
    check_float_tensor("w_v", w_v, "(N_max, rank)")
    check_dims({}, u=(u, "MR"), w_v=(w_v, "MR"))
    if u.shape[0] < split.total:
        raise InvalidValueError(f"u and w_v must have N_max ≥ N = {split.total} rows, got {u.shape[0]}")
    window = check_positive_int("window", window)

    def band(index: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return lowrank_band(u[index], w_v[index], window, causal, columns.shape[1])

    return _local_band(band, q, k, v, u, split, window, causal, attention_mask)


def _local_band(band_from, q, k, v, w, split: Split, window: int, causal, attention_mask) -> torch.Tensor:
    """Both AFT-local forms: ``band_from(index, columns)`` → (L, J), the biases of the laid-out positions
    (``index``, global) with those at ``columns`` (L, J) of them."""
    check_float_tensor("q", q, "(B, n, D)")
    check_dims({}, q=(q, "BND"), k=(k, "BND"), v=(v, "BND"))
    check_same_dtype_device(q=q, k=k, v=v, w=w)
    causal = check_flag("causal", causal)

    def band_at(positions: torch.Tensor) -> torch.Tensor:
        index = positions.clamp(0, split.total - 1)  # out of range: padding, or beyond every window
        return local_band(lambda columns: band_from(index, columns), len(positions), window, causal, q.device)

    return _windowed(band_at, q, k, v, split, causal, attention_mask, window - 1, 1, "aft_local")


def aft_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    split: Split,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.aft_conv`` over a split sequence, as ``aft_local`` here: the keys the kernel
    reaches arrive as a halo, farther keys as folded ones. In 1-D the kernel reaches K − 1 positions back
    (causal) or K // 2 each side; on a 2-D ``grid`` (X, Y), flattened row-major and split anywhere, it
    reaches R = (Kx // 2)·Y + Ky // 2 flat positions each side, and each share's rows take their taps
    from their global (x, y) (bidirectional only, as the op).

    Args:
        q, v: (B, n, H, D/H). k: (B, n, H). w: (H, K), or (H, Kx, Ky) with ``grid``. split, causal,
            attention_mask: as above (the mask this rank's (B, n) in both forms).
        grid: (X, Y) with X·Y = N for the 2-D form (default None: 1-D).

    Returns:
        (B, n, H, D/H): this rank's outputs.
    """
    for name, tensor in (("q", q), ("v", v)):
        check_float_tensor(name, tensor, "(B, n, H, D/H)")
    check_float_tensor("k", k, "(B, n, H)")
    check_float_tensor("w", w, "(H, K)" if grid is None else "(H, Kx, Ky)")
    check_dims({}, q=(q, "BNHC"), k=(k, "BNH"), v=(v, "BNHC"), w=(w, "H"))
    check_same_dtype_device(q=q, k=k, v=v, w=w)
    causal = check_flag("causal", causal)
    heads, head_dim = q.shape[2], q.shape[3]
    if grid is not None:
        check_grid_kernel(w, causal)
        if len(grid) != 2 or grid[0] * grid[1] != split.total:
            raise InvalidValueError(f"grid must be (X, Y) with X·Y = N = {split.total}, got {tuple(grid)}")
        before = (w.shape[1] // 2) * grid[1] + w.shape[2] // 2

        def band_at(positions: torch.Tensor) -> torch.Tensor:
            return _grid_band(w, positions, grid[1], before, split.total)
    else:
        check_conv_kernel(w, causal)
        before = w.shape[1] - 1 if causal else w.shape[1] // 2

        def band_at(positions: torch.Tensor) -> torch.Tensor:  # the same taps on every row
            return conv_band(w, len(positions), causal)

    q, v = q.flatten(-2), v.flatten(-2)
    out = _windowed(band_at, q, k, v, split, causal, attention_mask, before, heads, "aft_conv")
    return out.unflatten(-1, (heads, head_dim))


def _grid_band(w: torch.Tensor, positions: torch.Tensor, size_y: int, reach: int, total: int) -> torch.Tensor:
    """(L, H, 2R + 1): a 2-D kernel w (H, Kx, Ky) on the flat offsets j ∈ [−R, R] of rows at global
    ``positions`` (L,) of a grid ``size_y`` wide: the tap where the key lies in the grid within the
    kernel, 0 (unbiased) elsewhere, −inf where t + j falls outside the L positions."""
    offsets = torch.arange(-reach, reach + 1, device=w.device)
    keys = positions[:, None] + offsets  # global
    ix, iy, inside = grid_taps(positions[:, None], keys, size_y, w.shape[1:])
    inside = inside & (keys >= 0) & (keys < total)
    band = torch.where(inside[None], w[:, ix, iy], torch.zeros((), dtype=w.dtype)).permute(1, 0, 2)
    index = torch.arange(len(positions), device=w.device)[:, None] + offsets
    exists = (index >= 0) & (index < len(positions))
    return band.masked_fill(~exists[:, None, :], float("-inf"))


def _windowed(band_at, q, k, v, split: Split, causal, attention_mask, before: int, groups: int, kernel: str):
    """An AFT op whose keys carry a bias only within ``before`` positions of a query (before it; after it
    too unless causal): this rank's queries over the halo's keys and its own, the keys beyond the halo
    folded into one key on each side, through the windowed ops' own path (``banded``), the pieces laid
    into one tensor only where something must be masked. ``band_at(positions)`` → (L, groups or 1, J):
    the biases of the L laid-out positions (global ``positions``) on the offsets of ``band_offsets``
    (window before + 1), −inf past the L. q, v: (B, n, D); k: (B, n, K), a key for each channel (K = D)
    or for each of the ``groups`` (K = groups, D / K channels each)."""
    mask = _local_mask(split, q, attention_mask)
    after = 0 if causal else before
    real = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if mask is None else mask
    first, last = _beyond(k, v, mask, split, before, after)
    inside = torch.arange(-before, split.length + after, device=q.device) + split.start
    within = ((inside >= 0) & (inside < split.total))[None]
    near = halo(real.to(torch.int8), split, before, after).bool() & within  # a collective: on every rank
    if mask is None:  # every position is real: only those that exist are laid out, and the op takes no mask
        lo, hi = min(before, split.start), min(after, split.total - split.stop)
        ends = (int(split.start - before > 0), int(not causal and split.stop + after < split.total))
    else:
        lo, hi, ends = before, after, (1, 1)
    layout = ((before, after), (lo, hi), ends)
    grouped = lambda x: x.unflatten(-1, (groups, -1))  # noqa: E731
    keys, values = (
        tuple(map(grouped, _extended(one, x, other, split, *layout)))
        for one, x, other in ((first[0], k, last[0]), (first[1], v, last[1]))
    )
    keep = None
    if mask is not None:  # as the ops: a sequence with no real token, every position counts
        keep = torch.cat((first[2][:, None], near, last[2][:, None]), 1)
        keep = keep | ~keep.any(1, keepdim=True)
    positions = torch.arange(-lo - ends[0], split.length + hi + ends[1], device=q.device) + split.start
    band, row_offset = band_at(positions), lo + ends[0]
    rows = band.narrow(0, row_offset, split.length)
    if causal:  # the exact recompute's band is centred: the offsets after a row, 0 (it sees none of them)
        rows = torch.cat((rows, rows.new_zeros(*rows.shape[:-1], before)), -1)
    bias = Bias("band", (rows.to(compute_dtype(q.dtype)),), (q.shape[-1] // band.shape[1],))
    return banded(grouped(q), keys, values, band, before + 1, causal, keep, bias, kernel, row_offset)


def _extended(
    first: torch.Tensor,
    x: torch.Tensor,
    last: torch.Tensor,
    split: Split,
    reach: tuple[int, int],
    kept: tuple[int, int],
    ends: tuple[int, int],
) -> tuple[torch.Tensor, ...]:
    """The pieces of an extended sequence: the folded key (or value) ``first`` (B, …) if ``ends[0]``, the
    last ``kept[0]`` of the halo's ``reach[0]`` positions before this rank's (``reach``, the same on every
    rank: the halo is a collective), its own ``x``, the first ``kept[1]`` of the ``reach[1]`` after, and
    ``last`` if ``ends[1]``. A folded key not laid out is laid as none of its positions: still in the
    graph, so the gather's backward (a collective) runs on every rank."""
    (before, after), (lo, hi) = reach, kept
    left, right = halo_edges(x, split, before, after)
    return (
        first[:, None].narrow(1, 0, ends[0]).to(x.dtype), left.narrow(1, before - lo, lo), x,
        right.narrow(1, 0, hi), last[:, None].narrow(1, 0, ends[1]).to(x.dtype),
    )  # fmt: skip


def _beyond(k, v, mask, split: Split, before: int, after: int):
    """The keys farther than ``before`` positions before this rank's first and ``after`` after its last,
    each side folded into one key (B, K) and value (B, D), with whether any was real: every rank sends,
    for each rank, the (max, numerator, denominator) of its own keys beyond that rank's halo."""
    starts = split.starts
    stops = [start + n for start, n in zip(starts, split.lengths, strict=True)]
    pieces = [(split.start, min(split.stop, start - before)) for start in starts]  # before each rank's halo
    pieces += [(max(split.start, stop + after), split.stop) for stop in stops]  # after it
    # Padding taken out once: the pieces are then views of these, not copies each.
    k = k if mask is None else k.masked_fill(~mask[..., None], float("-inf"))
    v = real_only(v, mask, 1)
    summaries = []
    for lo, hi in pieces:
        piece = slice(lo - split.start, max(hi, lo) - split.start)  # empty where the cut leaves nothing
        summaries.append(_summary(k[:, piece], v[:, piece]))
    gathered = torch.stack(gather_summaries(torch.stack(summaries), split))  # (sender, 2·world, 3, B, D)
    everyone = torch.ones(split.world, dtype=torch.bool, device=k.device)
    groups = k.shape[-1]
    folded = []
    for side in (split.rank, split.world + split.rank):
        key, value, seen = _folded(gathered[:, side], everyone)
        folded.append((key.unflatten(-1, (groups, -1))[..., 0], value, seen))  # a key's channels agree
    return folded


def mixed_chunk_attention(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    split: Split,
    *,
    chunk_size: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.mixed_chunk_attention`` (FLASH) over a split sequence; chunks are the whole
    sequence's (global position // C). The op runs over this rank's positions widened to whole chunks (the
    positions beside each edge that complete its chunks arrive as a halo, fewer than C; none where every
    share starts and ends on a chunk boundary). Causal: its chunks' linear sums start from Σ
    k_lin ⊗ v and the count of every real position before the first chunk here (each rank sends each
    rank its share, O(world·S·E)), one pass. Bidirectional: the op's linear queries are zeroed and the
    linear part over every real position of the sequence is added here.

    Args:
        q_quad, k_quad, q_lin, k_lin: (B, n, S). v: (B, n, E): this rank's positions.
        split: the sequence's split. chunk_size, causal, attention_mask: as for the op (the mask this
            rank's (B, n)).

    Returns:
        (B, n, E): this rank's outputs.
    """
    check_float_tensor("v", v, "(B, n, E)")
    mask = _local_mask(split, v, attention_mask)
    causal = check_flag("causal", causal)
    size = chunk_size
    before, after = _chunk_edges(split.start, split.stop, split.total, size, causal)
    reach_before, reach_after = _chunk_reach(split, size, causal)
    real = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device) if mask is None else mask

    def widened(x):
        if reach_before == reach_after == 0:  # every share starts (and ends) on a chunk boundary
            return x
        wide = halo(x, split, reach_before, reach_after)
        return wide[:, reach_before - before : reach_before + split.length + after]

    inputs = [widened(real_only(t, mask, 1)) for t in (q_quad, k_quad, k_lin, v)]
    wide_real = widened(real.to(torch.int8)).bool()  # on every rank, mask or not: the halo is a collective
    wide_q, wide_k, wide_k_lin, wide_v = inputs
    state, count = _linear_before(k_lin, v, real, split, size, causal)
    wide_q_lin = pad_positions(q_lin, 1, before, after)  # the rows here, in whole chunks
    wide_mask = None if mask is None else wide_real  # none without padding: the op makes no masked copies
    if causal:  # the op's own linear sums, each chunk's starting from the ranks' before it: one pass
        out = flash_ops.mixed_chunk_checked(
            wide_q, wide_k, wide_q_lin, wide_k_lin, wide_v, wide_mask, size, True, prefix=(state, count)
        )
        return out[:, before : before + split.length]
    # Bidirectional: the quadratic part by the op, its linear queries zeroed (0 · M / n), and the linear
    # part over every real position of the sequence added here.
    no_linear = torch.zeros_like(wide_k_lin)
    quad = mixed_chunk_attention_op(
        wide_q, wide_k, no_linear, wide_k_lin, wide_v, chunk_size=size, causal=False, attention_mask=wide_mask
    )[:, before : before + split.length]
    dtype = compute_dtype(v.dtype)
    pad = -wide_v.shape[1] % size
    queries = pad_positions(wide_q_lin.to(dtype), 1, 0, pad).unflatten(1, (-1, size))
    sums = state[:, None].expand(-1, queries.shape[1], -1, -1)
    counts = count[:, None].expand(-1, queries.shape[1])
    linear = (queries @ (sums / counts.clamp_min(1)[..., None, None])).flatten(1, 2)
    return (quad.to(dtype) + linear[:, before : before + split.length]).to(v.dtype)


def _chunk_edges(start: int, stop: int, total: int, size: int, causal: bool) -> tuple[int, int]:
    """The positions a share [start, stop) lacks before it to start on a chunk boundary, and
    (bidirectional) after it to end on one (or on the sequence's end)."""
    after = 0 if causal else min(total, -(-stop // size) * size) - stop
    return start % size, after


def _chunk_reach(split: Split, size: int, causal: bool) -> tuple[int, int]:
    """The most positions any rank lacks before and after its share (``_chunk_edges``): what the halo
    carries, the same on every rank (< C)."""
    edges = [
        _chunk_edges(start, start + n, split.total, size, causal)
        for start, n in zip(split.starts, split.lengths, strict=True)
    ]
    return max(before for before, _ in edges), max(after for _, after in edges)


def _linear_before(k_lin, v, real, split: Split, size: int, causal: bool):
    """Σ k_lin ⊗ v (B, S, E) and the count (B,) of the real positions before this rank's first chunk
    (causal) or of the whole sequence (bidirectional): each rank sends each rank its share."""
    dtype = compute_dtype(v.dtype)
    starts = split.starts
    cuts = [start - start % size if causal else split.total for start in starts]
    shares = []
    for cut in cuts:
        piece = slice(0, max(0, min(split.stop, cut) - split.start))
        keep = real[:, piece]
        outer = torch.einsum(
            "bns,bne->bse", torch.where(keep[..., None], k_lin[:, piece].to(dtype), 0), v[:, piece].to(dtype)
        )
        shares.append(torch.cat((outer.flatten(1), keep.sum(1, keepdim=True).to(dtype)), 1))
    gathered = torch.stack(gather_summaries(torch.stack(shares), split))[:, split.rank].sum(0)  # (B, S·E + 1)
    return gathered[:, :-1].view(v.shape[0], k_lin.shape[-1], v.shape[-1]), gathered[:, -1]


def aft_full(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    split: Split,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.aft_full`` over a split sequence: every rank's keys and values are gathered
    (O(N·d) per rank) and this rank's queries take them as the op does, in checkpointed blocks of rows
    whose biases are w's rows at their global positions (exp(w − max_row w) @ [e^k ⊙ v, e^k], underflowed
    entries recomputed under their joint maximum).

    Args:
        q, k, v: (B, n, D), this rank's positions. w: (N_max, N_max), N ≤ N_max, the same on every rank.
        split: the sequence's split (contiguous or zig-zag). causal, attention_mask: as for the op, the
            mask this rank's (B, n) (default False, None).

    Returns:
        (B, n, D): this rank's outputs.
    """
    check_float_tensor("w", w, "(N_max, N_max)")
    check_table(w, split.total)

    def rows(start: int, stop: int, end: int) -> torch.Tensor:
        return w[start:stop, :end]

    return _aft_full_blocks(q, k, v, rows, split, causal, attention_mask)


def aft_full_lowrank(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    w_v: torch.Tensor,
    split: Split,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``aft_full`` here with factored biases w = u w_vᵀ (the ``aft_full`` mixer's): each block of rows
    forms its own rows of w from the factors (rows × keys), never the N × N table.

    Args:
        u, w_v: (N_max, rank), N ≤ N_max, the same on every rank. The rest as for ``aft_full`` here.
    """
    check_float_tensor("u", u, "(N_max, rank)")
    check_float_tensor("w_v", w_v, "(N_max, rank)")
    check_dims({}, u=(u, "MR"), w_v=(w_v, "MR"))
    if u.shape[0] < split.total:
        raise InvalidValueError(f"u and w_v must hold N_max ≥ N = {split.total} rows, got {tuple(u.shape)}")
    return _aft_full_blocks(
        q, k, v, lambda start, stop, end: u[start:stop] @ w_v[:end].T, split, causal, attention_mask
    )


def _aft_full_blocks(q, k, v, bias, split: Split, causal, attention_mask) -> torch.Tensor:
    """AFT-full of this rank's queries over the gathered keys; ``bias(start, stop, end)`` gives the rows
    [start, stop) of w over keys [0, end). A causal non-finite key or value is selected away and NaN put
    back on the (row, channel) entries at or after it, as the op does."""
    check_float_tensor("q", q, "(B, n, D)")
    mask = _local_mask(split, q, attention_mask, all_pairs=True)
    causal = check_flag("causal", causal)
    end = split.end if causal else split.total
    keys, values, real = _gathered_keys(k, v, mask, split, end, dim=1)
    seen = None
    if causal:
        keys, values, seen = causal_finite(keys, values, 1, key_channels=True)
        seen = None if seen is None else split.local(seen, 1)
    dtype = compute_dtype(q.dtype)
    keys, values = masked_keys(keys.to(dtype), real), values.to(dtype)
    sees = sees_a_key(real, q.shape[0], end, causal, q.device)
    stacked = None if causal else stacked_terms(keys, values)  # every block sees every key
    q = finite_at_padding(q, mask, 1)

    def block_rows(q_rows, stop, first):  # rows [stop − count, stop), over the keys before ``stop`` if causal
        start, keys_end = stop - q_rows.shape[1], stop if causal else end
        terms = stacked_terms(keys[:, :keys_end], values[:, :keys_end]) if causal else stacked
        rows = bias(start, stop, keys_end).to(dtype)
        at = torch.arange(start, stop, device=q.device) if causal else None
        num, den = row_sums(rows, terms, None if real is None else real[:, :keys_end], at).chunk(2, -1)
        out = finish(
            q_rows.to(dtype), num, den, sees[:, start:stop], keys[:, :keys_end], values[:, :keys_end],
            Bias("table", (rows,)), causal, row_offset=start,
        )  # fmt: skip
        return out.to(q.dtype)

    # As many rows a block as the op's own blocks hold (rows × keys scores), at most ROW_BLOCK.
    block = max(1, min(ROW_BLOCK, BLOCK_ELEMENTS // max(1, q.shape[0] * end)))
    return reinstate(_in_row_blocks(block_rows, q, split, dim=1, block=block), seen)


def _gathered_keys(k, v, mask, split: Split, end: int, dim: int):
    """The whole sequence's keys and values (padding selected away) up to position ``end``, and its
    real-key mask (None without padding)."""
    keys = gather_sequence(real_only(k, mask, dim), split, dim).narrow(dim, 0, end)
    values = gather_sequence(real_only(v, mask, dim), split, dim).narrow(dim, 0, end)
    real = None if mask is None else gather_sequence(mask, split, 1)[:, :end]
    return keys, values, real


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    split: Split,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.softmax_attention`` over a split sequence, by ring attention
    (``tokenmix.context.ring``): this rank's queries stay, every rank's keys and values pass by once
    (each share in ``ring.PIECES`` pieces, W − 1 steps of the ring each) and are folded in by log-sum-exp;
    a rank holds its own share and one piece of another's at a time (O(n·d), where gathering the
    sequence would hold O(N·d)).

    Args:
        q, k: (B, H, n, Dk). v: (B, H, n, Dv): this rank's positions. split: the sequence's split
            (contiguous or zig-zag). causal, scale: as for the op. attention_mask: (B, n), this rank's
            (default None).

    Returns:
        (B, H, n, Dv): this rank's outputs (a padded query's row is unspecified but finite, as the op's).
    """
    return _ring_pairs(q, k, v, split, causal, attention_mask, scale=scale)


def pointwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    split: Split,
    *,
    activation: str = "relu",
    alpha: float = 1.0,
    scale: float | None = None,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """``tokenmix.functional.pointwise_attention`` over a split sequence, by ring attention as
    ``softmax_attention`` here (the shares' sums add up; no normaliser to merge): L, the keys a row sees,
    counts the whole sequence's (the positions up to the row's own, when causal). Options as for the op."""
    activation, alpha, length = attention_ops._check_pointwise_options(activation, alpha, length)
    options = {"activation": activation, "alpha": alpha, "length": length}
    return _ring_pairs(q, k, v, split, causal, attention_mask, scale=scale, **options)


def _ring_pairs(q, k, v, split, causal, attention_mask, *, scale, **options) -> torch.Tensor:
    """This rank's queries over every rank's keys and values, passed round the ring. Non-finite keys and
    values are selected away as the op does: computed with finite ones, NaN put back on the rows that
    see them (a causal row: the keys at or before it, ``_first_non_finite``; a bidirectional one: all),
    and on a real row whose own query is not finite (the fused kernel would not say so)."""
    sizes = attention_ops._check_qkv(q, k, v)
    mask = _local_mask(split, q, attention_mask, dim=2, all_pairs=True)
    causal = check_flag("causal", causal)
    scale = attention_ops._default_scale(scale, sizes["K"])
    k, v = real_only(k, mask, 2), real_only(v, mask, 2)
    seen = None  # (B, H, n, 1) where a row's output is NaN; None: nowhere (no copy of the output)
    if not all_finite(q):
        seen = ~torch.isfinite(q).all(-1, keepdim=True)  # a query reaches its own row only
        if mask is not None:
            seen = seen & mask[:, None, :, None]  # a padded row is unspecified, and finite
    if _non_finite_anywhere(k, v, split):
        (k, bad_keys), (v, bad_values) = finite_part(k), finite_part(v)
        first_key = _first_non_finite(bad_keys.any(-1, keepdim=True), split)  # a key enters every channel
        first_value = _first_non_finite(bad_values, split)
        rows = split.positions(q.device)[:, None]
        if not causal:  # every row sees every key: as if each row were the sequence's last
            rows = torch.full_like(rows, split.total - 1)
        reached = (rows >= first_key[:, :, None]) | (rows >= first_value[:, :, None])
        seen = reached if seen is None else seen | reached
    q = finite_at_padding(q, mask, 2)
    out = ring_attention(
        q, k, v, split, causal=causal, key_mask=mask, scale=scale, block=ROW_BLOCK, **options
    )
    return reinstate(out, seen)


def _non_finite_anywhere(k: torch.Tensor, v: torch.Tensor, split: Split) -> bool:
    """Whether some rank's keys or values may hold a non-finite entry (one all-reduce of one number). On
    an accelerator ``all_finite`` cannot tell without a device read: every rank takes the careful path."""
    if k.device.type != "cpu":
        return True
    flags = torch.tensor([int(not all_finite(k, v))])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=split.group)
    return bool(flags)


def _first_non_finite(bad: torch.Tensor, split: Split) -> torch.Tensor:
    """(B, H, C): the global position of the first non-finite entry of ``bad`` (B, H, n, C) on any rank
    (N where there is none): an all-reduce of O(B·H·C), whatever N is."""
    positions = split.positions(bad.device)[:, None]
    first = (
        torch.where(bad, positions, split.total).amin(2)
        if bad.shape[2]
        else bad.new_full((*bad.shape[:2], bad.shape[3]), split.total, dtype=torch.long)
    )
    first = first.contiguous()
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=split.group)
    return first


# Query rows per block of the all-pairs context forms: each block's (rows × N) scores are made, used and
# dropped, and made again in the backward (checkpointed), so a rank never holds all of its n × N at once.
ROW_BLOCK = 256


def _in_row_blocks(rows, q: torch.Tensor, split: Split, dim: int, block: int) -> torch.Tensor:
    """``rows(q_block, stop, first)`` over blocks of ``block`` consecutive positions of this rank's runs
    (``stop``: one past the block's last global position; ``first``: its first row here), concatenated
    along ``dim``; each block recomputed in the backward rather than saved."""
    outputs, first = [], 0
    for start, stop in split.ranges:
        for offset in range(0, stop - start, block):
            count = min(block, stop - start - offset)
            queries = q.narrow(dim, first, count)
            arguments = (queries, start + offset + count, first)
            if torch.is_grad_enabled():
                outputs.append(checkpoint(rows, *arguments, use_reentrant=False))
            else:
                outputs.append(rows(*arguments))
            first += count
    return torch.cat(outputs, dim) if outputs else rows(q, split.end, 0)
