"""AFT continued from a decoding state: running (max, numerator, denominator) of unbiased keys, the
window's explicit keys (``AFTWindowState``), and a chunk computed against them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...backend import use_kernel
from ...core.checks import check_flag, compute_dtype
from ...core.chunks import causal_aligned, compact, continued, kept_then, last_real
from ...core.excluded import real_only
from ...core.state import DecodingState
from ...errors import InvalidTypeError, InvalidValueError
from .._deprecated import deprecated_alias
from . import exact
from .exact import finite_shift


@dataclass
class AFTSimpleState(DecodingState):
    """Causal AFT-simple's recurrent state, constant in size: per channel, the running maximum of the keys
    so far and the numerator Σ exp(k − max) ⊙ v and denominator Σ exp(k − max) under it (see
    ``aft_accumulate``). A row that has seen no key holds (−inf, 0, 0). The ``aft_simple`` mixer holds
    this state itself (its positions counted by ``Mixer.step``: the op needs none)."""

    max: torch.Tensor | None = None  # (B, D)
    numerator: torch.Tensor | None = None  # (B, D)
    denominator: torch.Tensor | None = None  # (B, D)


def aft_accumulate(
    running: AFTSimpleState | None,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> AFTSimpleState:
    """Fold unbiased keys into a running (max, numerator, denominator): the state of AFT decoding for
    keys whose bias is 0. A row that has seen no key holds (−inf, 0, 0).

    Args:
        running: the state so far, each field (B, D), or None (no key yet).
        k: (B, J, K) the keys, K dividing D: each key serves D / K adjacent channels of v (K = D: a key
            per channel, as AFT-simple; AFT-conv's keys are one per head).
        v: (B, J, D) the values.
        mask: (B, J) bool, True = a key to fold (default None: all).

    Returns:
        The state with the keys folded in, each field (B, D), relative to the running maximum (a key's
        maximum and denominator given to each of its channels).
    """
    dtype = compute_dtype(k.dtype)
    groups = k.shape[-1]
    k, v = k.to(dtype), v.to(dtype)
    if mask is not None:
        k = k.masked_fill(~mask[..., None], float("-inf"))
        v = real_only(v, mask, 1)
    new_max = k.amax(1) if k.shape[1] else k.new_full((k.shape[0], groups), float("-inf"))
    if running is not None and running.empty:
        running = None
    if running is not None:  # a group's shift bounds each of its channels' running maxima
        new_max = torch.maximum(running.max.unflatten(-1, (groups, -1)).amax(-1), new_max)
    new_max = new_max.detach()  # a shift: the results are invariant to it (see finite_shift)
    shift = finite_shift(new_max)
    weights = torch.exp(k - shift[:, None])  # (B, J, K)
    numerator = torch.einsum("bjk,bjke->bke", weights, v.unflatten(-1, (groups, -1))).flatten(1)
    denominator, new_max = (x.repeat_interleave(v.shape[-1] // groups, -1) for x in (weights.sum(1), new_max))
    if running is not None:
        rescale = torch.exp(running.max - shift.repeat_interleave(v.shape[-1] // groups, -1))
        numerator = numerator + rescale * running.numerator
        denominator = denominator + rescale * running.denominator
    return AFTSimpleState(new_max, numerator, denominator)


def folded(running: AFTSimpleState) -> tuple[torch.Tensor, torch.Tensor]:
    """A running state's keys as one key and value per channel, (B, D) each: k* = max + log(denominator)
    and v* = numerator / denominator, so exp(k*) and exp(k*) v* are its sums; −inf and 0 where it has
    seen no key (NaN stays NaN)."""
    empty = running.max == float("-inf")
    denominator = torch.where(empty, torch.ones_like(running.denominator), running.denominator)
    none = torch.full_like(running.max, float("-inf"))
    key = torch.where(empty, none, running.max + torch.log(denominator))
    return key, running.numerator / denominator


def folded_position(running: AFTSimpleState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``folded``'s key and value as one more position an op takes, (B, D) each, the key 0 where the
    state saw no key, and (B, D) where it saw one (a NaN too: it must reach the rows)."""
    key, value = folded(running)
    seen = key != float("-inf")
    return torch.where(seen, key, torch.zeros((), dtype=key.dtype, device=key.device)), value, seen


def aft_full_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    key_mask: torch.Tensor | None = None,
    running: AFTSimpleState | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Causal AFT continued from a state: the newest T queries q (B, T, D) over explicit keys k, values
    v (B, L, D), L ≥ T, the last T being the queries' own (causal offsets aligned to the end), with
    biases ``bias`` (B, T, L) or per channel (B, T, L, D) (None: 0), real keys ``key_mask`` (B, L), and
    older keys folded into ``running`` (see ``aft_accumulate``) with bias 0. Every (row, channel) is
    computed under the joint maximum of its own terms. ``causal=False``: every query sees every real key
    (a context-parallel rank's queries over the whole sequence's keys; default True). → (B, T, D)."""
    use_kernel(
        "aft_full", q, unsupported="a chunk continued from a decoding state runs on the reference path"
    )
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    queries, length = q.shape[1], k.shape[1]
    if check_flag("causal", causal):
        allowed = causal_aligned(queries, length, q.device)
    else:
        allowed = torch.ones(queries, length, dtype=torch.bool, device=q.device)
    allowed = allowed[None] if key_mask is None else allowed[None] & key_mask[:, None, :]  # (B, T, L)
    values = v if key_mask is None else real_only(v, key_mask, 1)
    if running is not None:  # the folded keys as one more term, seen by every query
        folded_key, folded_value, seen = folded_position(running)  # a NaN state reaches every row
    rows = max(1, exact.BLOCK_ELEMENTS // max(1, q.shape[0] * (length + 1) * q.shape[2]))
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
        weights = torch.exp(scores - finite_shift(scores.amax(2, keepdim=True)))
        terms = torch.where(visible, weights * terms_values, torch.zeros((), dtype=dtype, device=q.device))
        outputs.append(terms.sum(2) / weights.sum(2))
    out = torch.sigmoid(q) * torch.cat(outputs, 1)
    return out


@dataclass
class AFTWindowState(DecodingState):
    """Causal AFT-local's or AFT-conv's recurrent state: each row's next position (its count of real
    tokens: ``positions``, counted by the op), its last window − 1 real keys and values one by one
    (right-aligned, with their positions and which slots are in use), and every older key folded into
    running (max, numerator, denominator) (see ``aft_accumulate``), whose bias is 0. The ``aft_local``
    and ``aft_conv`` mixers hold this state itself."""

    keys: torch.Tensor | None = None  # (B, s − 1, D)
    values: torch.Tensor | None = None  # (B, s − 1, D)
    key_positions: torch.Tensor | None = None  # (B, s − 1) long
    key_real: torch.Tensor | None = None  # (B, s − 1) bool
    running: AFTSimpleState | None = None  # the older keys

    counted_by_op = True


def _empty_window_state(k: torch.Tensor, v: torch.Tensor, kept: int) -> AFTWindowState:
    batch, channels, dtype = k.shape[0], k.shape[-1], compute_dtype(k.dtype)
    return AFTWindowState(
        k.new_zeros(batch, kept, channels),
        v.new_zeros(batch, kept, v.shape[-1]),
        torch.zeros(batch, kept, dtype=torch.long, device=k.device),
        torch.zeros(batch, kept, dtype=torch.bool, device=k.device),
        AFTSimpleState(
            torch.full((batch, channels), float("-inf"), dtype=dtype, device=k.device),
            torch.zeros(batch, v.shape[-1], dtype=dtype, device=k.device),
            torch.zeros(batch, channels, dtype=dtype, device=k.device),
        ),
        positions=torch.zeros(batch, dtype=torch.long, device=k.device),
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


def last_position(rows: torch.Tensor) -> int:
    """The largest query position, for a bound check — a host sync, so skipped inside a compiled graph
    (whose caller bounds positions by the state's capacity instead)."""
    return -1 if torch.compiler.is_compiling() or rows.numel() == 0 else int(rows.max())


def recurrent(q, k, v, mask, causal, window, bias, forward, initial_state, output_final_state):
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
    if isinstance(initial_state, AFTWindowState) and initial_state.empty:  # a mixer's, not yet fed
        initial_state = None
    if initial_state is not None:
        _check_window_state(initial_state, q, kept)
    chunk = compact(mask, q.shape[0], q.shape[1], q.device)
    q, k, v = chunk.gather(q), chunk.gather(k), chunk.gather(v)
    state = initial_state if initial_state is not None else _empty_window_state(k, v, kept)
    steps, key_positions, real = continued(chunk, state.positions, state.key_positions, state.key_real)
    keys, values = kept_then(state.keys, k), kept_then(state.values, v)
    if initial_state is None:  # positions start at 0 and the chunk's padding comes last: the op itself
        out = forward(q, k, v, chunk.valid)
    else:
        terms = bias(steps, key_positions.clamp_min(0))
        out = aft_full_cached(q, keys, values, terms, key_mask=real, running=state.running).to(q.dtype)
    out = chunk.scatter(out)
    if not output_final_state:
        return out
    # Keys older than the newest window − 1 real ones now count unbiased.
    end = kept + chunk.counts
    older = real & (torch.arange(keys.shape[1], device=q.device)[None, :] < (end - kept)[:, None])
    final = AFTWindowState(
        *(last_real(t, chunk, kept) for t in (keys, values, key_positions, real)),
        aft_accumulate(state.running, keys, values, older),
        positions=state.positions + chunk.counts,
    )
    return out, final


aft_cached = deprecated_alias(aft_full_cached, "aft_cached")
