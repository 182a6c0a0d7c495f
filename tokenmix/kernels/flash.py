"""FLASH's mixed-chunk attention fused (docs/spec.md §3): out_i = Σ_{j ∈ c(i)} relu²(q_i·k_j / √S) / C · v_j
+ q_lin_i · M_{c(i)}, the quadratic part within chunks and the linear part through chunk states, in one
pass over each block of rows.

M_g = (Σ k_lin_jᵀ v_j over the real j of the chunks before g, or of all chunks when bidirectional) / n_g
comes from per-chunk sums (one kernel, tensor-core dots) and a prefix sum over chunks in PyTorch. The
output kernel adds q_lin · M_g to the within-chunk relu² attention of its rows (a block of rows may span
chunks when C is small: each row takes its own chunk's state). The backward recomputes the scores: one
kernel gives dv; one, run over blocks of keys and then of rows, gives dk_quad, dk_lin and dq_quad, dq_lin;
nothing but the chunk sums is reduced across programs. Values are split into blocks of channels (E = 2·d
is wide); state and accumulation are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..backend import interpreting
from ._common import (
    block_of,
    dot,
    dot_flags,
    int8_mask,
    key_visible,
    load_rows,
    row_offset,
    segment_arguments,
    sequence_of,
    slice_offset,
    store_rows,
)


@triton.jit
def _visible(rows, columns, mask_ptr, seq_len, chunk_size, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Row sees key column: real, in range, not in the future when causal, and in the row's chunk."""
    same_chunk = rows[:, None] // chunk_size == columns[None, :] // chunk_size
    return key_visible(rows, columns, mask_ptr, seq_len, CAUSAL, HAS_MASK) & same_chunk


@triton.jit
def _chunks(first_row, seq_len, chunk_size, BLOCK: tl.constexpr):
    """The first and last chunk that a block of rows from ``first_row`` touches, and where the last ends."""
    first = first_row // chunk_size
    last = (tl.minimum(first_row + BLOCK, seq_len) - 1) // chunk_size
    return first, last, tl.minimum(seq_len, (last + 1) * chunk_size)


@triton.jit
def chunk_offset(chunk, chunk_stride):
    """Where chunk ``chunk``'s (S, E) matrix starts, in 64 bits (chunks · S · E passes 2**31)."""
    return tl.cast(chunk, tl.int64) * chunk_stride  # (a cast: the interpreter's loop index is an int)


@triton.jit
def _chunk_linear(
    acc, x, rows, first, last, chunk_size, m_ptr, chunk_stride, s_range, e_range, dim_s, dim_e,
    TRANSPOSE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """acc + Σ_g [row in chunk g] x · M_g over chunks first..last, with M_g the float32 (S, E) matrix at
    m_ptr + g · chunk_stride, its (s_range, e_range) tile; its transpose when TRANSPOSE."""
    inside = (s_range[:, None] < dim_s) & (e_range[None, :] < dim_e)
    for chunk in range(first, last + 1):
        tile = tl.load(
            m_ptr + chunk_offset(chunk, chunk_stride) + s_range[:, None] * dim_e + e_range[None, :],
            inside,
            0.0,
        )
        if TRANSPOSE:
            tile = tl.trans(tile)
        mine = tl.where((rows // chunk_size == chunk)[:, None], x, 0.0).to(x.dtype)
        acc += dot(mine, tile.to(x.dtype), PRECISION, UPCAST)
    return acc


@triton.jit
def _relu_scores(
    q, k, rows, columns, mask_ptr, seq_len, chunk_size, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """(rows × keys): relu(q·k · scale) where the row sees the key, else 0."""
    relu = tl.maximum(dot(q, tl.trans(k), PRECISION, UPCAST) * scale, 0.0)
    return tl.where(_visible(rows, columns, mask_ptr, seq_len, chunk_size, CAUSAL, HAS_MASK), relu, 0.0)


@triton.jit
def mixed_chunk_sums_kernel(
    a_ptr, b_ptr, mask_ptr, cu_ptr, table_ptr, out_ptr, total_len, dim_a, dim_b, chunk_size, chunks,
    HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """out[batch, g] = Σ_{t in chunk g (real when HAS_MASK)} a_tᵀ b_t, float32 (dim_a, dim_b), over one
    block of b's columns. VARLEN: the chunks of every packed segment from its start, as the table lists
    them, out[0, i] for the i-th."""
    sequence, chunk = block_of(tl.program_id(0), tl.program_id(2), table_ptr, VARLEN)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    b_block = tl.program_id(1)
    a_range = tl.arange(0, BLOCK_A)
    b_range = b_block * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ptr += row_offset(batch, origin, total_len, dim_a)
    b_ptr += row_offset(batch, origin, total_len, dim_b)
    mask_ptr += row_offset(batch, origin, total_len, 1)
    acc = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
    end = tl.minimum(seq_len, (chunk + 1) * chunk_size)
    for start in range(chunk * chunk_size, end, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        a = load_rows(a_ptr, rows, a_range, end, dim_a, dim_a, 0.0)
        if HAS_MASK:
            real = tl.load(mask_ptr + rows, rows < end, 0)
            a = tl.where(real[:, None] != 0, a, 0.0).to(a.dtype)
        b = load_rows(b_ptr, rows, b_range, end, dim_b, dim_b, 0.0)
        acc += dot(tl.trans(a), b.to(a.dtype), PRECISION, UPCAST)
    out_ptr += slice_offset(batch * chunks + tl.program_id(0), dim_a, dim_b)
    store_rows(out_ptr, acc, a_range, b_range, dim_a, dim_b, dim_b)


@triton.jit
def _partners(block, seq_len, chunk_size, KEYS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """For a block of rows (of keys when KEYS): the first and last chunk it touches, and the range of the
    keys it sees (of the rows that see it)."""
    first, last, end = _chunks(block * BLOCK, seq_len, chunk_size, BLOCK)
    start = first * chunk_size
    if CAUSAL:
        if KEYS:
            start = block * BLOCK
        else:
            end = tl.minimum(end, (block + 1) * BLOCK)
    return first, last, start, end


@triton.jit
def mixed_chunk_values_kernel(
    qq_ptr, kq_ptr, lin_ptr, x_ptr, mask_ptr, state_ptr, cu_ptr, table_ptr, first_state_ptr, out_ptr,
    total_len, dim_s, dim_e, chunk_size, scale, state_batch_stride, state_chunk_stride,
    KEYS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """One block of value channels of the output of a block of rows: Σ_j relu²(s_ij) / C · v_j over the
    keys of their chunks, plus q_lin_i · M_{c(i)} (x: v, lin: q_lin, state: M). KEYS: dv of a block of
    keys instead, Σ_i relu²(s_ij) / C · g_i over the rows that see them, plus k_lin_j · D_{c(j)} for real
    keys (x: g, lin: k_lin, state: D, the gradient of the chunk sums)."""
    sequence, block = block_of(tl.program_id(0), tl.program_id(2), table_ptr, VARLEN)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    e_block = tl.program_id(1)
    mine = block * BLOCK + tl.arange(0, BLOCK)
    s_range, e_range = tl.arange(0, BLOCK_S), e_block * BLOCK_E + tl.arange(0, BLOCK_E)
    offset_s = row_offset(batch, origin, total_len, dim_s)
    offset_e = row_offset(batch, origin, total_len, dim_e)
    qq_ptr, kq_ptr, lin_ptr = qq_ptr + offset_s, kq_ptr + offset_s, lin_ptr + offset_s
    x_ptr, out_ptr = x_ptr + offset_e, out_ptr + offset_e
    mask_ptr += row_offset(batch, origin, total_len, 1)
    first, last, start, end = _partners(block, seq_len, chunk_size, KEYS, CAUSAL, BLOCK)
    own = load_rows(kq_ptr if KEYS else qq_ptr, mine, s_range, seq_len, dim_s, dim_s, 0.0)
    acc = tl.zeros((BLOCK, BLOCK_E), tl.float32)
    for other_start in range(start, end, BLOCK):
        others = other_start + tl.arange(0, BLOCK)
        other = load_rows(qq_ptr if KEYS else kq_ptr, others, s_range, seq_len, dim_s, dim_s, 0.0)
        if KEYS:
            relu = tl.trans(
                _relu_scores(other, own, others, mine, mask_ptr, seq_len, chunk_size, scale, CAUSAL, HAS_MASK,
                             PRECISION, UPCAST)
            )  # fmt: skip
        else:
            relu = _relu_scores(
                own, other, mine, others, mask_ptr, seq_len, chunk_size, scale, CAUSAL, HAS_MASK, PRECISION,
                UPCAST,
            )  # fmt: skip
        weights = relu * relu / chunk_size  # 1/C before the cast keeps half-precision weights finite
        x = load_rows(x_ptr, others, e_range, seq_len, dim_e, dim_e, 0.0)
        acc += dot(weights.to(x.dtype), x, PRECISION, UPCAST)
    lin = load_rows(lin_ptr, mine, s_range, seq_len, dim_s, dim_s, 0.0)
    if KEYS:
        lin = _real_rows(lin, mine, mask_ptr, seq_len, HAS_MASK)
    states = _state_base(
        state_ptr, first_state_ptr, batch, sequence, state_batch_stride, dim_s * dim_e, VARLEN
    )
    acc = _chunk_linear(
        acc, lin, mine, first, last, chunk_size, states, state_chunk_stride, s_range, e_range, dim_s, dim_e,
        False, PRECISION, UPCAST,
    )  # fmt: skip
    store_rows(out_ptr, acc, mine, e_range, seq_len, dim_e, dim_e)


@triton.jit
def _state_base(state_ptr, first_state_ptr, batch, sequence, batch_stride, row_size, VARLEN: tl.constexpr):
    """Where a sequence's states start: batch row ``batch``'s, or (VARLEN) segment ``sequence``'s first,
    whose index in the flat list of every segment's states ``first_state`` holds."""
    if VARLEN:
        base = state_ptr + tl.load(first_state_ptr + sequence).to(tl.int64) * row_size
    else:
        base = state_ptr + slice_offset(batch, batch_stride, 1)
    return base


@triton.jit
def _real_rows(x, rows, mask_ptr, seq_len, HAS_MASK: tl.constexpr):
    """x with the rows of padding tokens zeroed."""
    if HAS_MASK:
        real = tl.load(mask_ptr + rows, rows < seq_len, 0)
        x = tl.where(real[:, None] != 0, x, 0.0).to(x.dtype)
    return x


@triton.jit
def _score_grads(
    q, k, g_ptr, v_ptr, rows, columns, mask_ptr, seq_len, dim_e, chunk_size, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """d out / d (q·k) of a (rows × keys) tile: (g_i·v_j) · 2 relu(s_ij) / C · scale, over every value
    channel."""
    grad_weights = tl.zeros((rows.shape[0], columns.shape[0]), tl.float32)
    for e_start in range(0, dim_e, BLOCK_E):
        e_range = e_start + tl.arange(0, BLOCK_E)
        g = load_rows(g_ptr, rows, e_range, seq_len, dim_e, dim_e, 0.0)
        v = load_rows(v_ptr, columns, e_range, seq_len, dim_e, dim_e, 0.0)
        grad_weights += dot(g, tl.trans(v.to(g.dtype)), PRECISION, UPCAST)
    relu = _relu_scores(
        q, k, rows, columns, mask_ptr, seq_len, chunk_size, scale, CAUSAL, HAS_MASK, PRECISION, UPCAST
    )
    return grad_weights * 2.0 * relu * (scale / chunk_size)


@triton.jit
def mixed_chunk_bwd_scores_kernel(
    qq_ptr, kq_ptr, v_ptr, g_ptr, mask_ptr, state_ptr, cu_ptr, table_ptr, first_state_ptr, d_quad_ptr,
    d_lin_ptr, total_len, dim_s, dim_e, chunk_size, scale, state_batch_stride, state_chunk_stride,
    KEYS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """KEYS: dk_quad and dk_lin of a block of keys, Σ_i dS_ij q_i over the rows of their chunks and
    v_j · D_{c(j)}ᵀ for real keys (state: D). Otherwise dq_quad and dq_lin of a block of rows,
    Σ_j dS_ij k_j over the keys of their chunks and g_i · M_{c(i)}ᵀ (state: M)."""
    sequence, block = block_of(tl.program_id(0), tl.program_id(1), table_ptr, VARLEN)
    batch, origin, seq_len = sequence_of(sequence, cu_ptr, total_len, VARLEN)
    mine = block * BLOCK + tl.arange(0, BLOCK)
    s_range = tl.arange(0, BLOCK_S)
    offset_s = row_offset(batch, origin, total_len, dim_s)
    offset_e = row_offset(batch, origin, total_len, dim_e)
    qq_ptr, kq_ptr, d_quad_ptr, d_lin_ptr = (
        qq_ptr + offset_s,
        kq_ptr + offset_s,
        d_quad_ptr + offset_s,
        d_lin_ptr + offset_s,
    )
    v_ptr, g_ptr = v_ptr + offset_e, g_ptr + offset_e
    mask_ptr += row_offset(batch, origin, total_len, 1)
    states = _state_base(
        state_ptr, first_state_ptr, batch, sequence, state_batch_stride, dim_s * dim_e, VARLEN
    )
    first, last, start, end = _partners(block, seq_len, chunk_size, KEYS, CAUSAL, BLOCK)
    own = load_rows(kq_ptr if KEYS else qq_ptr, mine, s_range, seq_len, dim_s, dim_s, 0.0)
    other_ptr, linear_ptr = (qq_ptr, v_ptr) if KEYS else (kq_ptr, g_ptr)
    grad = tl.zeros((BLOCK, BLOCK_S), tl.float32)
    for other_start in range(start, end, BLOCK):
        others = other_start + tl.arange(0, BLOCK)
        other = load_rows(other_ptr, others, s_range, seq_len, dim_s, dim_s, 0.0)
        if KEYS:
            grad_scores = _score_grads(
                other, own, g_ptr, v_ptr, others, mine, mask_ptr, seq_len, dim_e, chunk_size, scale, CAUSAL,
                HAS_MASK, PRECISION, UPCAST, BLOCK_E,
            )  # fmt: skip
            grad += dot(tl.trans(grad_scores).to(other.dtype), other, PRECISION, UPCAST)
        else:
            grad_scores = _score_grads(
                own, other, g_ptr, v_ptr, mine, others, mask_ptr, seq_len, dim_e, chunk_size, scale, CAUSAL,
                HAS_MASK, PRECISION, UPCAST, BLOCK_E,
            )  # fmt: skip
            grad += dot(grad_scores.to(other.dtype), other, PRECISION, UPCAST)
    store_rows(d_quad_ptr, grad, mine, s_range, seq_len, dim_s, dim_s)
    grad_lin = tl.zeros((BLOCK, BLOCK_S), tl.float32)
    for e_start in range(0, dim_e, BLOCK_E):
        e_range = e_start + tl.arange(0, BLOCK_E)
        x = load_rows(linear_ptr, mine, e_range, seq_len, dim_e, dim_e, 0.0)
        grad_lin = _chunk_linear(
            grad_lin, x, mine, first, last, chunk_size, states, state_chunk_stride, s_range, e_range, dim_s,
            dim_e, True, PRECISION, UPCAST,
        )  # fmt: skip
    if KEYS:
        grad_lin = _real_rows(grad_lin, mine, mask_ptr, seq_len, HAS_MASK)
    store_rows(d_lin_ptr, grad_lin, mine, s_range, seq_len, dim_s, dim_s)


def _blocks(dim_s: int, dim_e: int) -> dict[str, int]:
    small = 16 if interpreting() else 64
    return {
        "BLOCK": small,
        "BLOCK_S": max(16, triton.next_power_of_2(dim_s)),
        "BLOCK_E": max(16, min(small, triton.next_power_of_2(dim_e))),
        "num_warps": 8,  # 4 spill kilobytes of registers (ptxas, sm_90a)
    }


class _Chunks:
    """How a call's chunks lie: per batch row (B, G) from position 0, or with packed segments the chunks
    of every segment from its own start, listed flat, segment after segment (P of them)."""

    def __init__(self, like: torch.Tensor, chunk_size: int, cu_seqlens: torch.Tensor | None) -> None:
        self.chunk_size, self.packed = chunk_size, cu_seqlens is not None
        self.bounds, self.table, self.count = segment_arguments(like[0], cu_seqlens, chunk_size)
        if self.packed:
            self.lengths = self.bounds.diff().long()  # (S,)
            per_segment = (self.lengths + chunk_size - 1) // chunk_size
            self.first = (torch.cumsum(per_segment, 0) - per_segment).to(torch.int32)  # (S,) first chunk
            self.segment_of = self.table[: self.count, 0].long()  # (P,)
            self.index = self.table[: self.count, 1].long()  # (P,) chunk within its segment

    def sums(self, a: torch.Tensor, b: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, G, dim_a, dim_b) float32 — (1, P, …) packed: Σ a_tᵀ b_t over each chunk's (real) positions."""
        batch, seq_len, dim_a = a.shape
        dim_b = b.shape[-1]
        chunks = self.count if self.packed else triton.cdiv(seq_len, self.chunk_size)
        out = a.new_empty(batch, max(chunks, 1), dim_a, dim_b, dtype=torch.float32)
        blocks = {"BLOCK_T": 16 if interpreting() else 64, "BLOCK_A": max(16, triton.next_power_of_2(dim_a))}
        blocks["BLOCK_B"] = max(16, min(64, triton.next_power_of_2(dim_b)))
        grid = (chunks, triton.cdiv(dim_b, blocks["BLOCK_B"]), batch)
        mixed_chunk_sums_kernel[grid](
            a, b, int8_mask(a, key_mask), self.bounds, self.table, out, seq_len, dim_a, dim_b,
            self.chunk_size, chunks, HAS_MASK=key_mask is not None, VARLEN=self.packed, **dot_flags(a.dtype),
            **blocks,
        )  # fmt: skip
        return out[:, :chunks]

    def seen_counts(self, key_mask: torch.Tensor | None, batch: int, seq_len: int, causal: bool, device):
        """n_g, at least 1, as (B, G or 1, 1, 1), packed (1, P or S, 1, 1): the keys the linear part of chunk
        g sums over (its state is 0 when there are none, so any n ≥ 1 gives lin = 0 there)."""
        if self.packed:
            counts = self.index * self.chunk_size if causal else self.lengths
            return counts.clamp_min(1).float()[None, :, None, None]
        counts = _counts(key_mask, batch, seq_len, self.chunk_size, device)
        counts = _exclusive_prefix(counts) if causal else counts.sum(1, keepdim=True)
        return counts.clamp_min(1)[..., None, None]

    def before(self, sums: torch.Tensor) -> torch.Tensor:
        """Entry g: the sum of the entries of the chunks before g in its sequence (dim 1)."""
        if not self.packed:
            return _exclusive_prefix(sums)
        # Within each segment: a running sum in float64 (its differences then lose nothing to float32),
        # less its value at the segment's first chunk.
        running = torch.cumsum(sums.double(), 1) - sums.double()
        return (running - running[:, self.first.long()[self.segment_of]]).to(sums.dtype)

    def after(self, sums: torch.Tensor) -> torch.Tensor:
        """Entry g: the sum of the entries of the chunks after g in its sequence (dim 1)."""
        if not self.packed:
            return _exclusive_prefix(sums.flip(1)).flip(1)
        running = torch.cumsum(sums.double(), 1)
        last = (self.first.long() + (self.lengths + self.chunk_size - 1) // self.chunk_size - 1).clamp_min(0)
        return (running[:, last[self.segment_of]] - running).to(sums.dtype)

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        """Each sequence's sum over its chunks: (B, 1, …), packed (1, S, …)."""
        if not self.packed:
            return sums.sum(1, keepdim=True)
        out = sums.new_zeros(1, self.lengths.shape[0], *sums.shape[2:])
        return out.index_add_(1, self.segment_of, sums)

    def first_states(self, causal: bool) -> torch.Tensor:
        """Packed: each segment's first state in the flat list (its first chunk's, or itself when
        bidirectional); a stand-in otherwise."""
        if not self.packed:
            return self.bounds
        return (
            self.first
            if causal
            else torch.arange(self.lengths.shape[0], dtype=torch.int32, device=self.first.device)
        )

    def states(self, a, b, key_mask, batch, seq_len, causal) -> torch.Tensor:
        """Σ a_tᵀ b_t over the chunks each chunk's linear part reads (before it when causal, all of its
        sequence's otherwise), / n_g."""
        sums = self.sums(a, b, key_mask)
        sums = self.before(sums) if causal else self.total(sums)
        return sums / self.seen_counts(key_mask, batch, seq_len, causal, a.device)


def _counts(key_mask: torch.Tensor | None, batch: int, seq_len: int, chunk_size: int, device) -> torch.Tensor:
    """(B, G) float32: the real tokens of each chunk."""
    real = torch.ones(batch, seq_len, device=device) if key_mask is None else key_mask.float()
    padding = -seq_len % chunk_size
    return F.pad(real, (0, padding)).view(batch, -1, chunk_size).sum(-1)


def _exclusive_prefix(x: torch.Tensor) -> torch.Tensor:
    """Along dim 1: entry g is the sum of the entries before g."""
    return torch.cat((torch.zeros_like(x[:, :1]), torch.cumsum(x[:, :-1], 1)), 1)


def _state_shape(q_quad, v, chunk_size, causal, cu_seqlens) -> tuple[int, int, int, int]:
    """(B, G or 1, S, E); packed (1, G', S, E) with room for every segment's chunks when causal
    (Σ ⌈ℓ_i / C⌉ ≤ ⌈N / C⌉ + segments), one per segment when bidirectional."""
    batch, seq_len, dim_s = q_quad.shape
    if cu_seqlens is None:
        chunks = -(-seq_len // chunk_size) if causal else 1
    else:
        segments = cu_seqlens.shape[0] - 1
        chunks = -(-seq_len // chunk_size) + segments if causal else segments
    return batch, max(chunks, 1), dim_s, v.shape[-1]


def _arguments(q_quad, v, key_mask, chunk_size, causal, cu_seqlens) -> tuple[tuple, dict]:
    """The kernels' size arguments and flags."""
    _, seq_len, dim_s = q_quad.shape
    flags = {
        "CAUSAL": causal,
        "HAS_MASK": key_mask is not None,
        "VARLEN": cu_seqlens is not None,
        **dot_flags(v.dtype),
        **_blocks(dim_s, v.shape[-1]),
    }
    return (seq_len, dim_s, v.shape[-1], chunk_size, dim_s**-0.5), flags


def _strides(states: torch.Tensor, causal: bool) -> tuple[int, int]:
    """Batch and chunk strides of (B, G or 1, S, E) states; bidirectional, one serves every chunk."""
    return states.stride(0), states.stride(1) if causal else 0


@torch.library.custom_op("tokenmix::mixed_chunk_attention_fwd", mutates_args=())
def mixed_chunk_attention_fwd(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    chunk_size: int,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_*, k_*: (B, N, S); v: (B, N, E), one dtype; key_mask: (B, N) bool or None; cu_seqlens: None, or
    with B = 1 the bounds (S + 1,) of packed segments, each a sequence of its own (chunks from its start).
    Returns the output (B, N, E) in the inputs' dtype and, for the backward, the states M float32
    (see ``_state_shape``)."""
    q_quad, k_quad, q_lin, k_lin, v = (x.contiguous() for x in (q_quad, k_quad, q_lin, k_lin, v))
    batch, seq_len, _ = q_quad.shape
    chunks = _Chunks(q_quad, chunk_size, cu_seqlens)
    states = q_quad.new_zeros(_state_shape(q_quad, v, chunk_size, causal, cu_seqlens), dtype=torch.float32)
    found = chunks.states(k_lin, v, key_mask, batch, seq_len, causal)
    states[:, : found.shape[1]] = found
    out = torch.empty_like(v)
    sizes, flags = _arguments(q_quad, v, key_mask, chunk_size, causal, cu_seqlens)
    bounds, table, programs = segment_arguments(q_quad[0], cu_seqlens, flags["BLOCK"])
    grid = (programs, triton.cdiv(v.shape[-1], flags["BLOCK_E"]), batch)
    mixed_chunk_values_kernel[grid](
        q_quad, k_quad, q_lin, v, int8_mask(v, key_mask), states, bounds, table, chunks.first_states(causal),
        out, *sizes, *_strides(states, causal), KEYS=False, **flags,
    )  # fmt: skip
    return out, states


@mixed_chunk_attention_fwd.register_fake
def _(q_quad, k_quad, q_lin, k_lin, v, key_mask, chunk_size, causal, cu_seqlens=None):
    shape = _state_shape(q_quad, v, chunk_size, causal, cu_seqlens)
    return torch.empty_like(v), v.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("tokenmix::mixed_chunk_attention_bwd", mutates_args=())
def mixed_chunk_attention_bwd(
    grad_out: torch.Tensor,
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    states: torch.Tensor,
    chunk_size: int,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q_quad, k_quad, q_lin, k_lin, v = (x.contiguous() for x in (q_quad, k_quad, q_lin, k_lin, v))
    grad_out = grad_out.contiguous().to(v.dtype)
    batch, seq_len, _ = q_quad.shape
    chunks = _Chunks(q_quad, chunk_size, cu_seqlens)
    # D_h, the gradient of chunk h's sum Σ k_linᵀ v: Σ over the chunks g that read it of Σ q_linᵀ g / n_g.
    sums = chunks.sums(q_lin, grad_out, None)
    sums = sums if causal else chunks.total(sums)
    sums = sums / chunks.seen_counts(key_mask, batch, seq_len, causal, v.device)
    if causal:  # chunk h is read by the chunks after it
        sums = chunks.after(sums)
    grad_states = torch.zeros_like(states)
    grad_states[:, : sums.shape[1]] = sums
    sizes, flags = _arguments(q_quad, v, key_mask, chunk_size, causal, cu_seqlens)
    bounds, table, programs = segment_arguments(q_quad[0], cu_seqlens, flags["BLOCK"])
    segments = (bounds, table, chunks.first_states(causal))
    mask = int8_mask(v, key_mask)
    grads = [torch.empty_like(x) for x in (q_quad, k_quad, q_lin, k_lin, v)]
    mixed_chunk_values_kernel[(programs, triton.cdiv(v.shape[-1], flags["BLOCK_E"]), batch)](
        q_quad, k_quad, k_lin, grad_out, mask, grad_states, *segments, grads[4], *sizes,
        *_strides(grad_states, causal), KEYS=True, **flags,
    )  # fmt: skip
    # This kernel loops over the value channels, so narrower blocks cost no recomputation; at 64 they
    # spill registers (ptxas, sm_90a).
    scores_flags = {**flags, "BLOCK_E": min(32, flags["BLOCK_E"])}
    for keys, state, d_quad, d_lin in (
        (True, grad_states, grads[1], grads[3]),
        (False, states, grads[0], grads[2]),
    ):
        mixed_chunk_bwd_scores_kernel[(programs, batch)](
            q_quad, k_quad, v, grad_out, mask, state, *segments, d_quad, d_lin, *sizes,
            *_strides(state, causal), KEYS=keys, **scores_flags,
        )  # fmt: skip
    return tuple(grads)


@mixed_chunk_attention_bwd.register_fake
def _(grad_out, q_quad, k_quad, q_lin, k_lin, v, key_mask, states, chunk_size, causal, cu_seqlens=None):
    return tuple(torch.empty_like(x) for x in (q_quad, k_quad, q_lin, k_lin, v))


def _setup_context(ctx, inputs, output):
    *tensors, key_mask, chunk_size, causal, cu_seqlens = inputs
    ctx.save_for_backward(*tensors, key_mask, output[1], cu_seqlens)
    ctx.options = (chunk_size, causal)


def _backward(ctx, grad_out, grad_states):
    *saved, cu_seqlens = ctx.saved_tensors
    grads = mixed_chunk_attention_bwd(grad_out, *saved, *ctx.options, cu_seqlens)
    return (*grads, None, None, None, None)


mixed_chunk_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def mixed_chunk_attention(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    chunk_size: int,
    causal: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    return mixed_chunk_attention_fwd(
        q_quad, k_quad, q_lin, k_lin, v, key_mask, chunk_size, causal, cu_seqlens
    )[0]
