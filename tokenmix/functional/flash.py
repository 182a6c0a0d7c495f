"""Mixed-chunk attention, FLASH's linear-time attention (Hua et al. 2022, §3; docs/spec.md §3).

Within a chunk of C positions, relu² attention divided by C; across chunks, linear attention through
the per-chunk states Kᵀ V (an exclusive prefix sum of them when causal). Memory O(N·C), never N×N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backend import use_kernel
from ..core.checks import (
    check_attention_mask,
    check_dims,
    check_flag,
    check_float_tensor,
    check_positive_int,
    check_same_dtype_device,
    compute_dtype,
    empty_output,
)
from ..core.chunks import compact, continued, kept_then
from ..core.excluded import (
    all_finite,
    finite_at_padding,
    finite_part,
    real_only,
    reinstate,
    seen_between,
    seen_in_window,
)
from ..core.packing import Packing, packable
from ..core.state import DecodingState
from ..errors import InvalidTypeError, InvalidValueError
from ._typing import recurrent_op
from .attention import pointwise_attention

__all__ = ["MixedChunkState", "mixed_chunk_attention"]


@dataclass
class MixedChunkState(DecodingState):
    """Causal mixed-chunk attention's recurrent state, constant in size: each row's next position (its
    count of real tokens: ``positions``, counted by the op), Σ k_lin ⊗ v over the tokens of its finished
    chunks and their count, and its unfinished chunk's k_quad, k_lin, v and positions in C slots, the
    token at position p in slot p mod C (``key_real`` marks the slots in use), so a token's step writes
    one slot. Chunks are positions // C. The ``flash`` mixer holds this state itself."""

    linear_state: torch.Tensor | None = None  # (B, S, E)
    linear_count: torch.Tensor | None = None  # (B,) long
    keys: torch.Tensor | None = None  # (B, C, S)
    linear_keys: torch.Tensor | None = None  # (B, C, S)
    values: torch.Tensor | None = None  # (B, C, E)
    key_positions: torch.Tensor | None = None  # (B, C) long
    key_real: torch.Tensor | None = None  # (B, C) bool
    # Σ k_lin ⊗ v over the unfinished chunk (B, S, E), so that a token's step adds its own outer product
    # and a finished chunk joins linear_state without a sum over the chunk (None: computed when needed).
    pending_state: torch.Tensor | None = None

    counted_by_op = True


def _quadratic_options(qk_dim: int, chunk_size: int) -> dict:
    """The within-chunk attention as pointwise attention: relu²(q·k/√S) / C."""
    return {"activation": "relu2", "alpha": 1.0, "scale": qk_dim**-0.5, "length": chunk_size}


def _quadratic_weights(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The same weights written out for the decoding paths: relu²(q·k/√S) / C where ``keep``, else 0
    (selected away, never multiplied by 0). q (B, T, S), k (B, K, S), keep broadcast to (B, T, K)."""
    scores = torch.relu(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5)
    return (
        torch.where(keep, scores * scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
        / chunk_size
    )


@recurrent_op(MixedChunkState)
@packable(
    lambda q_quad, k_quad, q_lin, k_lin, v, **_: use_kernel("mixed_chunk_attention", v),
    q_quad=1, k_quad=1, q_lin=1, k_lin=1, v=1,
)  # fmt: skip
def mixed_chunk_attention(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    initial_state: MixedChunkState | None = None,
    output_final_state: bool = False,
    inplace: bool = False,
    packing: Packing | None = None,
) -> torch.Tensor | tuple[torch.Tensor, MixedChunkState]:
    """FLASH's mixed-chunk attention, ``out_i = quad_i + lin_i``:

        quad_i = Σ_{j ∈ chunk c(i), real, (j ≤ i if causal)} relu²(q_quad_i·k_quad_j / √S) / C · v_j
        lin_i  = q_lin_i · M_i / n_i

    Non-causal: M_i = Σ_{all real j} k_lin_j ⊗ v_j and n_i = the number of real tokens. Causal: M_i sums
    over the real j in chunks before c(i) and n_i counts them (lin_i = 0 when there are none).

    Args:
        q_quad, k_quad, q_lin, k_lin: (B, N, S). v: (B, N, E).
        chunk_size: C. N need not be a multiple of C: the last chunk is padded internally, and padding is
            never a key.
        causal: position i sees positions j ≤ i.
        attention_mask: (B, N), True/1 = real token.
        initial_state: causal only — the ``MixedChunkState`` a previous call returned: this call's
            tokens come after those (default None: a fresh sequence).
        output_final_state: causal only — also return the state after this call (default False).
            In this recurrent form (either argument given), a padded position leaves the state unchanged
            and positions (hence chunks) count each row's real tokens only (docs/spec.md §7).
        inplace: a one-token call that needs no gradient writes its step into ``initial_state``'s
            tensors and returns them as the final state, instead of copies of the chunk's slots
            (default False; ``initial_state`` is then spent, as an input of ``F.relu(inplace=True)`` is).
            Other calls ignore it.
        cu_seqlens: (S + 1,) int64 cumulative segment lengths, batch size 1 (default None): the S
            segments of N are independent sequences, each as if called alone (docs/spec.md §8).
        packing: the plan of a cu_seqlens, ``Packing.of(cu_seqlens)`` (default None): for a model that
            calls many ops on one packed row and plans it once. Give cu_seqlens or packing, not both.

    Returns:
        (B, N, E) in the inputs' dtype, or (that, final_state) with ``output_final_state``; half-precision
        inputs are computed in float32.
    """
    names = ("q_quad", "k_quad", "q_lin", "k_lin")
    for name, tensor in zip(names, (q_quad, k_quad, q_lin, k_lin), strict=True):
        check_float_tensor(name, tensor, "(B, N, S)")
    check_float_tensor("v", v, "(B, N, E)")
    check_same_dtype_device(q_quad=q_quad, k_quad=k_quad, q_lin=q_lin, k_lin=k_lin, v=v)
    sizes = check_dims(
        {},
        q_quad=(q_quad, "BNS"),
        k_quad=(k_quad, "BNS"),
        q_lin=(q_lin, "BNS"),
        k_lin=(k_lin, "BNS"),
        v=(v, "BNE"),
    )
    chunk_size = check_positive_int("chunk_size", chunk_size)
    causal = check_flag("causal", causal)
    batch, seq_len = sizes["B"], sizes["N"]
    mask = check_attention_mask(attention_mask, batch, seq_len, v.device)
    inputs = (q_quad, k_quad, q_lin, k_lin, v)
    if initial_state is not None or output_final_state:
        if not causal:
            raise InvalidValueError(
                "initial_state and output_final_state need causal=True (the recurrent form)"
            )
        return _recurrent(*inputs, mask, chunk_size, initial_state, output_final_state, inplace)
    return mixed_chunk_checked(*inputs, mask, chunk_size, causal, packing)


def mixed_chunk_checked(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    chunk_size: int,
    causal: bool,
    packing: Packing | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``mixed_chunk_attention`` on checked inputs, non-finite ones selected away as it does. ``prefix``:
    causal only — Σ k_lin ⊗ v (B, S, E) and the count (B,) of the real positions before this call's
    first, which every chunk's linear sums start from (a context-parallel rank's: docs/spec.md §14);
    the reference path then."""
    inputs, seq_len = (q_quad, k_quad, q_lin, k_lin, v), v.shape[1]
    if v.numel() == 0 or q_quad.numel() == 0:
        return empty_output(v.shape, *inputs)
    q_quad, q_lin = finite_at_padding(q_quad, mask, 1), finite_at_padding(q_lin, mask, 1)
    k_quad, k_lin, v = (real_only(t, mask, 1) for t in (k_quad, k_lin, v))
    if not causal:
        return _mixed_chunk(q_quad, k_quad, q_lin, k_lin, v, mask, chunk_size, False, packing)
    if all_finite(k_quad, k_lin, v):
        return _mixed_chunk(q_quad, k_quad, q_lin, k_lin, v, mask, chunk_size, True, packing, prefix)
    # Causal sums meet future keys and values in products with 0: compute with finite ones, then mark
    # the rows that see others of their own (a value at j ≤ i; a quadratic key at j ≤ i in the row's
    # chunk; a linear key in an earlier chunk), all within the row's segment when packed.
    v, bad_values = finite_part(v)
    k_quad, bad_quad = finite_part(k_quad)
    k_lin, bad_lin = finite_part(k_lin)
    index = torch.arange(seq_len, device=v.device)
    starts = torch.zeros_like(index) if packing is None else packing.starts()
    chunk_starts = index - (index - starts) % chunk_size
    quad_seen = seen_between(bad_quad.any(-1, keepdim=True), 1, chunk_starts, index + 1)
    lin_seen = seen_between(bad_lin.any(-1, keepdim=True), 1, starts, chunk_starts)
    out = _mixed_chunk(q_quad, k_quad, q_lin, k_lin, v, mask, chunk_size, True, packing, prefix)
    values_seen = seen_in_window(bad_values, 1, None, starts=None if packing is None else starts)
    return reinstate(out, values_seen | quad_seen | lin_seen)


def _mixed_chunk(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    mask,
    chunk_size: int,
    causal: bool,
    packing: Packing | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """mixed_chunk_attention on checked inputs (see there and ``mixed_chunk_checked``); a packed row goes
    through the kernel."""
    if prefix is None and (packing is not None or use_kernel("mixed_chunk_attention", v)):
        from ..kernels.flash import mixed_chunk_attention as kernel

        bounds = None if packing is None else packing.bounds
        return kernel(q_quad, k_quad, q_lin, k_lin, v, mask, chunk_size, bool(causal), bounds)
    batch, seq_len, qk_dim = q_quad.shape
    dtype = compute_dtype(v.dtype)
    # A sequence shorter than a chunk is one chunk of its own length: padding it to C would only add
    # excluded positions (C/N times the work). The weights' 1/C stays: it is the chunk size, not a length.
    length, chunk_size = chunk_size, min(chunk_size, seq_len)

    padding = -seq_len % chunk_size
    chunks = (seq_len + padding) // chunk_size
    if mask is not None or padding:  # real tokens; None when every position is one
        real = torch.ones(batch, seq_len, dtype=torch.bool, device=v.device) if mask is None else mask
        real = F.pad(real, (0, padding), value=False)
    else:
        real = None

    def chunked(x: torch.Tensor) -> torch.Tensor:  # (B, N, D) → (B, G, C, D), zero-padded when needed
        x = F.pad(x.to(dtype), (0, 0, 0, padding)) if padding else x.to(dtype)
        return x.reshape(batch, chunks, chunk_size, x.shape[-1])

    q_quad, k_quad, q_lin, k_lin, v_chunks = map(chunked, (q_quad, k_quad, q_lin, k_lin, v))
    # Within-chunk part: each chunk is one head of pointwise attention with a fixed length C.
    quad = pointwise_attention(
        q_quad.reshape(batch * chunks, 1, chunk_size, qk_dim),
        k_quad.reshape(batch * chunks, 1, chunk_size, qk_dim),
        v_chunks.reshape(batch * chunks, 1, chunk_size, -1),
        causal=causal,
        attention_mask=None if real is None else real.view(batch * chunks, chunk_size),
        **_quadratic_options(qk_dim, length),
    ).view(batch * chunks, chunk_size, -1)

    # Across chunks: per-chunk states Kᵀ V over real keys, then their total or exclusive prefix sum,
    # each divided by the number of keys it holds.
    if real is None:
        counts = torch.full((batch, chunks), float(chunk_size), dtype=dtype, device=v.device)
    else:
        real_chunks = real.view(batch, chunks, chunk_size)
        k_lin = torch.where(real_chunks[..., None], k_lin, torch.zeros((), dtype=dtype, device=v.device))
        counts = real_chunks.to(dtype).sum(-1)  # (B, G)
    states = torch.einsum("bgcs,bgce->bgse", k_lin, v_chunks)
    if causal:  # exclusive prefix sums, as one matmul: chunk g gets the chunks g' < g
        before = torch.ones(chunks, chunks, dtype=dtype, device=v.device).tril_(-1)
        states = torch.einsum("gh,bhse->bgse", before, states)
        counts = counts @ before.T
        if prefix is not None:
            states = states + prefix[0][:, None].to(dtype)
            counts = counts + prefix[1][:, None].to(dtype)
    else:
        states = states.sum(1, keepdim=True).expand(-1, chunks, -1, -1)
        counts = counts.sum(1, keepdim=True).expand(-1, chunks)
    # Where no key was seen the state is exactly zero, so clamping the count yields lin = 0.
    states = states / counts.clamp_min(1)[..., None, None]
    out = torch.baddbmm(  # quad + q_lin · states, chunk by chunk
        quad, q_lin.reshape(batch * chunks, chunk_size, qk_dim), states.reshape(batch * chunks, qk_dim, -1)
    )
    return out.view(batch, chunks * chunk_size, -1)[:, :seq_len].to(v.dtype)


def _check_state(state: object, batch: int, chunk_size: int, sizes: dict) -> None:
    if not isinstance(state, MixedChunkState):
        raise InvalidTypeError(
            f"initial_state must be the MixedChunkState a previous call returned, got {type(state).__name__}"
        )
    expected = (batch, chunk_size, sizes["S"])
    linear = (batch, sizes["S"], sizes["E"])
    if tuple(state.keys.shape) != expected or tuple(state.linear_state.shape) != linear:
        raise InvalidValueError(
            f"initial_state holds keys of shape {tuple(state.keys.shape)} and a linear state of shape "
            f"{tuple(state.linear_state.shape)}; this call needs (B, C, S) = {expected} and "
            f"(B, S, E) = {linear}"
        )


def _empty_state(k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> MixedChunkState:
    batch, qk_dim, device = k.shape[0], k.shape[-1], k.device
    positions = torch.zeros(batch, dtype=torch.long, device=device)
    return MixedChunkState(
        v.new_zeros(batch, qk_dim, v.shape[-1]),
        positions.clone(),
        k.new_zeros(batch, chunk_size, qk_dim),
        k.new_zeros(batch, chunk_size, qk_dim),
        v.new_zeros(batch, chunk_size, v.shape[-1]),
        positions.new_zeros(batch, chunk_size),
        torch.zeros(batch, chunk_size, dtype=torch.bool, device=device),
        v.new_zeros(batch, qk_dim, v.shape[-1]),
        positions=positions,
    )


def _recurrent(
    q_quad, k_quad, q_lin, k_lin, v, mask, chunk_size, initial_state, output_final_state, inplace=False
):
    """The causal op over a chunk continued from ``initial_state``, each row's real tokens moved to its
    front first (so padding leaves the state alone and positions count real tokens)."""
    batch, length = v.shape[:2]
    if isinstance(initial_state, MixedChunkState) and initial_state.empty:  # a mixer's, not yet fed
        initial_state = None
    if initial_state is not None:
        _check_state(initial_state, batch, chunk_size, {"S": k_quad.shape[-1], "E": v.shape[-1]})
        use_kernel(
            "mixed_chunk_attention",
            v,
            unsupported="a chunk continued from a decoding state runs on the reference path",
        )
    if length == 1 and initial_state is not None:
        inputs = (q_quad, k_quad, q_lin, k_lin, v)
        state_tensors = (t for t in initial_state.own_values() if t is not None)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *state_tensors))
        out, state = _token(*inputs, mask, initial_state, chunk_size, inplace and not grad)
        return (out, state) if output_final_state else out
    chunk = compact(mask, batch, length, v.device)
    q_quad, k_quad, q_lin, k_lin, v = (chunk.gather(t) for t in (q_quad, k_quad, q_lin, k_lin, v))
    state = initial_state if initial_state is not None else _empty_state(k_quad, v, chunk_size)
    query_positions, key_positions, real = continued(
        chunk, state.positions, state.key_positions, state.key_real
    )
    keys, linear_keys = kept_then(state.keys, k_quad), kept_then(state.linear_keys, k_lin)
    values = kept_then(state.values, v)
    if initial_state is None:  # positions start at 0 and the chunk's padding comes last: the op itself
        out = mixed_chunk_attention(
            q_quad, k_quad, q_lin, k_lin, v, chunk_size=chunk_size, causal=True, attention_mask=chunk.valid
        )
    else:
        out = _continued(
            q_quad, keys, q_lin, linear_keys, values, query_positions, key_positions, real,
            state.linear_state, state.linear_count, chunk_size,
        ).to(v.dtype)  # fmt: skip
    out = chunk.scatter(out)
    if not output_final_state:
        return out
    # Tokens of chunks now finished join the linear state; the rest are the new unfinished chunk.
    positions = state.positions + chunk.counts
    current = (positions // chunk_size)[:, None]
    finished = real & (key_positions // chunk_size < current)
    unfinished = real & (key_positions // chunk_size == current)
    linear_state, pending = _fold_chunk(state, linear_keys, values, finished, unfinished)
    linear_count = state.linear_count + finished.sum(1)
    slot_positions, index = _unfinished_slots(state.positions, positions, chunk_size)
    kept = (_gather_slots(t, index) for t in (keys, linear_keys, values))
    in_use = slot_positions < positions[:, None]
    return out, MixedChunkState(
        linear_state, linear_count, *kept, slot_positions, in_use, pending, positions=positions
    )


def _unfinished_slots(before: torch.Tensor, after: torch.Tensor, chunk_size: int):
    """After a chunk took each row from position ``before`` to ``after`` (B,): each slot's position in
    the unfinished chunk (B, C), and its source in the state's C slots followed by the compacted chunk —
    the state's own slot while that position came before the call, else the chunk's entry for it."""
    slots = torch.arange(chunk_size, device=after.device)
    positions = (after - after % chunk_size)[:, None] + slots
    index = torch.where(positions < before[:, None], slots, chunk_size + positions - before[:, None])
    return positions, index


def _gather_slots(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, …) entries at ``index`` (B, C) — the slots past the chunk's real tokens, out of range and
    unused, clamped."""
    index = index.clamp(0, values.shape[1] - 1).view(*index.shape, *[1] * (values.dim() - 2))
    return values.gather(1, index.expand(-1, -1, *values.shape[2:]))


def _token(q_quad, k_quad, q_lin, k_lin, v, mask, state: MixedChunkState, chunk_size: int, inplace: bool):
    """One token (B, 1, ·) from ``state``: written into its slot (position mod C; a padded row's state is
    unchanged); its quadratic part over the slots in use, its linear part from the finished chunks; its
    k_lin ⊗ v joins the pending sum, which joins the linear state when the token ends its chunk. Tensors
    of the same shapes every token, no host sync: a compiled step is compiled once. ``inplace``: the new
    state is ``state``'s tensors, written in place."""
    valid = torch.ones_like(state.positions, dtype=torch.bool) if mask is None else mask[:, 0]
    slot = state.positions % chunk_size
    written = (torch.arange(chunk_size, device=v.device) == slot[:, None]) & valid[:, None]  # (B, C)
    entries = (k_quad[:, 0], k_lin[:, 0], v[:, 0], state.positions)
    buffers = (state.keys, state.linear_keys, state.values, state.key_positions)
    keys, linear_keys, values, key_positions = (
        _write_slot(buffer, entry, slot, written, inplace)
        for buffer, entry in zip(buffers, entries, strict=True)
    )
    in_use = state.key_real | written
    out = _token_output(q_quad, q_lin, keys, values, in_use, state, valid, chunk_size).to(v.dtype)

    own = torch.where(valid[:, None, None], k_lin[:, 0, :, None] * v[:, 0, None, :], 0.0)
    done = valid & (slot == chunk_size - 1)  # the chunk is finished: its sum joins the linear state
    linear_state, pending = _fold_token(state, own, done[:, None, None], inplace)
    in_use = in_use & ~done[:, None]
    if inplace:
        in_use = state.key_real.copy_(in_use)
    bump = torch.Tensor.add_ if inplace else torch.add
    linear_count = bump(state.linear_count, done.long() * chunk_size)
    positions = bump(state.positions, valid.long())
    return out, MixedChunkState(
        linear_state, linear_count, keys, linear_keys, values, key_positions, in_use, pending,
        positions=positions,
    )  # fmt: skip


def _write_slot(buffer, entry, slot, written, inplace: bool) -> torch.Tensor:
    """``buffer`` (B, C, …) with ``entry`` (B, …) in ``slot`` (B,) of the rows ``written`` (B, C) marks:
    written in place, or a copy."""
    if not inplace:
        where = written.view(*written.shape, *[1] * (buffer.dim() - 2))
        return torch.where(where, entry[:, None].to(buffer.dtype), buffer)
    rows = torch.arange(buffer.shape[0], device=buffer.device)
    kept = buffer[rows, slot]
    valid = written.any(1).view(-1, *[1] * (kept.dim() - 1))
    buffer[rows, slot] = torch.where(valid, entry.to(buffer.dtype), kept)
    return buffer


def _fold_token(state: MixedChunkState, own: torch.Tensor, done: torch.Tensor, inplace: bool):
    """The token's k_lin ⊗ v (``own``, B × S × E) added to the pending sum, which joins the linear state
    where ``done`` (B, 1, 1) — selected, with no host sync and no sum over the chunk."""
    zero = torch.zeros((), dtype=state.linear_state.dtype, device=own.device)
    if inplace and state.pending_state is not None:
        pending = state.pending_state.add_(own)
        linear_state = state.linear_state.add_(torch.where(done, pending, zero))
        return linear_state, pending.masked_fill_(done, 0)
    pending = _pending(state) + own.to(state.linear_state.dtype)
    return state.linear_state + torch.where(done, pending, zero), torch.where(done, zero, pending)


def _token_output(q_quad, q_lin, keys, values, in_use, state, valid, chunk_size: int) -> torch.Tensor:
    """The token's row: relu² attention over the slots in use, divided by C, plus q_lin · M / n over the
    finished chunks; 0 at a padded row."""
    dtype = compute_dtype(values.dtype)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    weights = _quadratic_weights(q_quad.to(dtype), keys.to(dtype), in_use[:, None, :], chunk_size)
    quad = weights @ torch.where(in_use[..., None], values.to(dtype), zero)
    linear = q_lin.to(dtype) @ state.linear_state.to(dtype) / state.linear_count.clamp_min(1)[:, None, None]
    return torch.where(valid[:, None, None], quad + linear, zero)


def _outer_sum(linear_keys: torch.Tensor, values: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Σ k_lin ⊗ v over the positions ``which`` (B, L) selects → (B, S, E)."""
    weighted = torch.where(which[..., None], linear_keys, torch.zeros((), dtype=linear_keys.dtype))
    return torch.einsum("bls,ble->bse", weighted, values)


def _pending(state: MixedChunkState) -> torch.Tensor:
    if state.pending_state is not None:
        return state.pending_state
    return _outer_sum(state.linear_keys, state.values, state.key_real).to(state.linear_state.dtype)


def _fold_chunk(state, linear_keys, values, finished, unfinished):
    """A chunk of tokens: the finished ones join the linear state (skipped, eager, when none did); the
    unfinished ones' sum is the new pending one."""
    linear_state = state.linear_state
    if torch.compiler.is_compiling() or bool(finished.any()):
        linear_state = linear_state + _outer_sum(linear_keys, values, finished).to(linear_state.dtype)
    return linear_state, _outer_sum(linear_keys, values, unfinished).to(linear_state.dtype)


def _continued(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    positions,
    key_positions,
    key_mask,
    linear_state,
    linear_count,
    chunk_size,
) -> torch.Tensor:
    """The newest T queries q_quad, q_lin (B, T, S) at ``positions`` (B, T), over explicit keys k_quad,
    k_lin (B, L, S) and values v (B, L, E) at ``key_positions`` (B, L), real where ``key_mask`` (B, L) —
    the unfinished chunk so far and the T new tokens — and ``linear_state`` (B, S, E) = Σ k_lin ⊗ v over
    the ``linear_count`` (B,) tokens of the chunks folded before them → (B, T, E), the causal op's rows."""
    dtype = compute_dtype(v.dtype)
    q_quad, k_quad, q_lin, k_lin, v = (t.to(dtype) for t in (q_quad, k_quad, q_lin, k_lin, v))
    visible = (key_positions[:, None, :] <= positions[:, :, None]) & key_mask[:, None, :]
    v = real_only(v, key_mask, 1)
    query_chunks, key_chunks = positions // chunk_size, key_positions // chunk_size
    same = visible & (key_chunks[:, None, :] == query_chunks[:, :, None])
    earlier = visible & (key_chunks[:, None, :] < query_chunks[:, :, None])
    zero = torch.zeros((), dtype=dtype, device=v.device)
    quad = _quadratic_weights(q_quad, k_quad, same, chunk_size) @ v
    linear_scores = torch.where(earlier, q_lin @ k_lin.transpose(1, 2), zero)
    numerator = q_lin @ linear_state.to(dtype) + linear_scores @ v
    count = (linear_count[:, None] + earlier.sum(-1)).clamp_min(1).to(dtype)
    return quad + numerator / count[..., None]
