"""Attention Free Transformer mixers (Zhai et al. 2021): ``"aft_full"``, ``"aft_simple"``, ``"aft_local"``.

Q, K, V = x W_q, x W_k, x W_v (width ``hidden_dim``, default d); the AFT op; output projection W_o.
AFT-full and AFT-local learn pairwise position biases factorised as w = u vᵀ with u, v ∈ R^{max_len×d'}
(``bias_rank`` d', 64 by default; None for a full learned table), initialised N(0, 0.02); AFT-local
with factors only ever forms the band of w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..context import ops as context_ops
from ..core.checks import check_positive_int, check_real
from ..core.chunks import Compacted
from ..core.packing import Packing
from ..errors import InvalidValueError
from ..functional import aft as aft_ops
from ..init import SelfInitialising
from .base import Mixer
from .cache import KVCache
from .registry import register_mixer
from .state import DecodingState

PAPER = "Zhai et al. 2021, An Attention Free Transformer (arXiv 2105.14103)"


@dataclass
class AFTFullState(DecodingState):
    """AFT-full's decoding state: a cache of every key and value (fixed-size with a capacity) and the
    keys' positions. (AFT-simple holds its op's ``AFTSimpleState``, AFT-local and AFT-conv their op's
    ``AFTWindowState``: one state each, the op's own.)"""

    cache: KVCache | None = None
    key_positions: torch.Tensor | None = None  # (B, t): the cached keys' positions


class AFTMixer(Mixer):
    """Shared projections, output and length checks; subclasses supply the op, its state (``state_type``,
    made empty with the batch size and capacity) and its step."""

    state_type: type[DecodingState]

    def __init__(
        self, dim: int, *, causal: bool, hidden_dim: int | None, max_len: int | None, dropout: float
    ) -> None:
        super().__init__(dim, causal=causal)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim if hidden_dim is not None else dim)
        self.max_len = check_positive_int("max_len", max_len, allow_none=True)
        # Three projections rather than one split in three: contiguous q, k, v make the sequence-axis
        # reductions of the ops faster on the CPU, and their gradients need no concatenation.
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, self.hidden_dim) for _ in range(3))
        self.to_out = nn.Linear(self.hidden_dim, dim)
        self.dropout = nn.Dropout(check_real("dropout", dropout))

    def _check_length(self, length: int) -> None:
        if self.max_len is not None and length > self.max_len:
            raise InvalidValueError(
                f"sequence of length {length} is longer than the learned position biases "
                f"(max_len={self.max_len})"
            )

    def mix(self, q, k, v, attention_mask, packing: Packing | None = None):
        """The family's op on q, k, v (B, N, hidden) (over a packed row's segments)."""
        raise NotImplementedError

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        self._check_length(x.shape[1] if packing is None else packing.longest)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.dropout(self.to_out(self.mix(q, k, v, attention_mask, packing)))

    def mix_split(self, x, attention_mask, split):
        self._check_length(split.total)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        options = {"causal": self.causal, "attention_mask": attention_mask}
        return self.dropout(self.to_out(self.context_op(q, k, v, split, **options)))

    def context_op(self, q, k, v, split, **options) -> torch.Tensor:
        """The family's op over a split sequence (``tokenmix.context.ops``)."""
        raise NotImplementedError

    def new_state(self, batch_size: int, capacity: int | None = None) -> DecodingState:
        """An empty state. ``capacity``: AFT-full's cache holds that many positions (padding included)
        in tensors of fixed shapes (for ``torch.compile``); the other AFT states are constant in size."""
        return self.state_type(batch_size=batch_size, capacity=capacity)

    def advance(self, x: torch.Tensor, state: DecodingState, chunk: Compacted) -> torch.Tensor:
        if self.max_len is not None and (state.capacity is None or state.capacity > self.max_len):
            self._check_length(int((state.positions + chunk.counts).max()))  # a host sync: only if needed
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.dropout(self.to_out(self.mix_continued(q, k, v, state, chunk)))

    def mix_continued(self, q, k, v, state: DecodingState, chunk: Compacted) -> torch.Tensor:
        """The family's op on a chunk's q, k, v (B, T, hidden), continued from ``state`` and updating
        it."""
        raise NotImplementedError


class PositionBias(SelfInitialising):
    """w = u vᵀ with u, v ∈ R^{max_len × rank}, N(0, 0.02); or, with ``rank=None``, a full learned
    (max_len, max_len) table w, N(0, 0.02)."""

    def __init__(self, max_len: int, rank: int | None) -> None:
        super().__init__()
        rank = check_positive_int("bias_rank", rank, allow_none=True)
        if rank is None:
            self.table = nn.Parameter(torch.empty(max_len, max_len))
        else:
            self.u = nn.Parameter(torch.empty(max_len, rank))
            self.v = nn.Parameter(torch.empty(max_len, rank))
        self.rank = rank
        self.no_weight_decay = frozenset({"table", "u", "v"})  # a position table, not a projection

    def init_own(self) -> None:
        for parameter in self.parameters(recurse=False):
            nn.init.normal_(parameter, std=0.02)

    def rows(self, rows: slice, columns: slice) -> torch.Tensor:
        """The block w[rows, columns]."""
        return self.table[rows, columns] if self.rank is None else self.u[rows] @ self.v[columns].T

    def pairs(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """w[rows[b, i], columns[b, j]] for positions rows (B, T) and columns (B, L) → (B, T, L)."""
        if self.rank is None:
            return self.table[rows[:, :, None], columns[:, None, :]]
        return self.u[rows] @ self.v[columns].transpose(1, 2)


@register_mixer(
    "aft_full",
    paper=PAPER,
    time="O(N²·d)",
    memory="O(N·d + N²) (w and row blocks of exp(w), never (N, N, d))",
    state="past keys and values, O(t·d)",
)
class AFTFull(AFTMixer):
    """AFT-full with learned pairwise biases w = u vᵀ over up to ``max_len`` positions.

    Args:
        dim: model width. hidden_dim: width of Q, K, V (default dim). max_len: longest sequence (the
            bias table's size). bias_rank: d' of the factorisation w = u vᵀ, or None for a full table.
        dropout: on the output.
    """

    state_type = AFTFullState

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        hidden_dim: int | None = None,
        max_len: int = 1024,
        bias_rank: int | None = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, causal=causal, hidden_dim=hidden_dim, max_len=max_len, dropout=dropout)
        self.bias = PositionBias(self.max_len, bias_rank)

    def mix(self, q, k, v, attention_mask, packing=None):
        seq_len = q.shape[1] if packing is None else packing.longest  # w by position within a segment
        w = self.bias.rows(slice(0, seq_len), slice(0, seq_len))
        return aft_ops.aft_full(
            q, k, v, w, causal=self.causal, attention_mask=attention_mask, packing=packing
        )

    split_orders = ("contiguous", "zigzag")

    def context_op(self, q, k, v, split, **options):
        if self.bias.rank is None:
            return context_ops.aft_full(q, k, v, self.bias.table, split, **options)
        # Each block of rows forms its rows of w from the factors: never N × N, nor n × N at once.
        return context_ops.aft_full_lowrank(q, k, v, self.bias.u, self.bias.v, split, **options)

    def mix_continued(self, q, k, v, state, chunk):
        positions = state.positions[:, None] + torch.arange(k.shape[1], device=k.device)
        if state.cache is None:
            state.cache = KVCache(state.batch_size, state.capacity)
            state.key_positions = positions.new_zeros(state.batch_size, state.capacity or 0)
        start = state.cache.length
        empty = start == 0 and state.capacity is None
        keys, values, real = state.cache.append(k[:, None], v[:, None], chunk.valid)
        # The keys' positions, laid out as the cache lays out its keys.
        if state.capacity is None:
            state.key_positions = torch.cat((state.key_positions, positions), 1)
        else:
            state.key_positions = state.key_positions.slice_scatter(positions, 1, start, start + k.shape[1])
        if empty:  # a first chunk is the forward op (its padding comes last)
            return self.mix(q, k, v, chunk.valid)
        bias = self.bias.pairs(positions, state.key_positions[:, : keys.shape[-2]])
        return aft_ops.aft_full_cached(q, keys[:, 0], values[:, 0], bias, key_mask=real)


@register_mixer(
    "aft_simple",
    paper=PAPER,
    time="O(N·d)",
    memory="O(N·d)",
    state="running max, numerator and denominator per channel, O(d)",
)
class AFTSimple(AFTMixer):
    """AFT-simple: no position biases, y_t = σ(q_t) ⊙ Σ softmax(k) ⊙ v over the visible positions.

    Args:
        dim: model width. hidden_dim: width of Q, K, V (default dim). dropout: on the output.
    """

    state_type = aft_ops.AFTSimpleState

    def __init__(
        self, dim: int, *, causal: bool = False, hidden_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(dim, causal=causal, hidden_dim=hidden_dim, max_len=None, dropout=dropout)

    def mix(self, q, k, v, attention_mask, packing=None):
        return aft_ops.aft_simple(q, k, v, causal=self.causal, attention_mask=attention_mask, packing=packing)

    def context_op(self, q, k, v, split, **options):
        return context_ops.aft_simple(q, k, v, split, **options)

    def mix_continued(self, q, k, v, state, chunk):
        out, final = aft_ops.aft_simple(
            q, k, v, causal=True, attention_mask=chunk.valid, initial_state=state, output_final_state=True
        )
        state.take(final)
        return out


@register_mixer(
    "aft_local",
    paper=PAPER,
    time="O(N·s·d)",
    memory="O(N·d) (the band of w only, O(N·s))",
    state="the last s keys and values + running sums of older ones, O(s·d)",
)
class AFTLocal(AFTMixer):
    """AFT-local: biases w = u vᵀ only within ``window`` positions (0 outside, where positions still
    count); computed from the factors' band, never the N×N table.

    Args:
        dim, hidden_dim, max_len, bias_rank, dropout: as for ``"aft_full"``.
        window: s (32, the paper's best on Enwik8).
    """

    state_type = aft_ops.AFTWindowState

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        window: int = 32,
        hidden_dim: int | None = None,
        max_len: int = 1024,
        bias_rank: int | None = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, causal=causal, hidden_dim=hidden_dim, max_len=max_len, dropout=dropout)
        self.window = check_positive_int("window", window)
        self.bias = PositionBias(self.max_len, bias_rank)

    def mix(self, q, k, v, attention_mask, packing=None):
        options = dict(window=self.window, causal=self.causal, attention_mask=attention_mask, packing=packing)
        if self.bias.rank is None:
            return aft_ops.aft_local(q, k, v, self.bias.table, **options)
        return aft_ops.aft_local_lowrank(q, k, v, self.bias.u, self.bias.v, **options)

    def context_op(self, q, k, v, split, **options):
        if self.bias.rank is None:
            return context_ops.aft_local(q, k, v, self.bias.table, split, window=self.window, **options)
        return context_ops.aft_local_lowrank(
            q, k, v, self.bias.u, self.bias.v, split, window=self.window, **options
        )

    def mix_continued(self, q, k, v, state, chunk):
        options = dict(
            window=self.window, causal=True, attention_mask=chunk.valid, initial_state=state,
            output_final_state=True,
        )  # fmt: skip
        if self.bias.rank is None:
            out, final = aft_ops.aft_local(q, k, v, self.bias.table, **options)
        else:
            out, final = aft_ops.aft_local_lowrank(q, k, v, self.bias.u, self.bias.v, **options)
        state.take(final)
        return out


@register_mixer(
    "aft_conv",
    paper=PAPER,
    time="O(N·K·d)",
    memory="O(N·d)",
    state="the last K keys and values + running sums of older ones, O(K·d)",
)
class AFTConv(AFTMixer):
    """AFT-conv: ``heads`` heads, each with one key per position and a learned kernel over its
    hidden_dim/heads channels: ``kernel_size`` taps along the sequence, or kernel_size × kernel_size
    taps over a 2-D ``grid`` (X, Y) whose positions are the sequence in row-major order (a ViT's patches).
    Kernels are reparametrised as the paper does: w = γ·(w̃ − mean w̃)/std w̃ + β per head, γ = β = 0 at
    init (so AFT-conv starts as AFT-simple with per-head keys).

    Args:
        dim: model width. heads: H (8). kernel_size: K (7; odd unless causal in 1-D). grid: (X, Y) for
            the 2-D form (bidirectional only), None for 1-D. hidden_dim: width of Q and V (default dim;
            a multiple of heads). dropout: on the output.
    """

    state_type = aft_ops.AFTWindowState

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        heads: int = 8,
        kernel_size: int = 7,
        grid: tuple[int, int] | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, causal=causal, hidden_dim=hidden_dim, max_len=None, dropout=dropout)
        self.heads = check_positive_int("heads", heads)
        if self.hidden_dim % self.heads:
            raise InvalidValueError(f"heads={heads} must divide hidden_dim={self.hidden_dim}")
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if (not causal or grid is not None) and kernel_size % 2 == 0:
            raise InvalidValueError(
                f"kernel_size must be odd unless causal in 1-D (the kernel needs a centre), got {kernel_size}"
            )
        if grid is not None:
            if not isinstance(grid, (tuple, list)) or len(grid) != 2:
                raise InvalidValueError(f"grid must be a pair (X, Y) of positive ints, got {grid!r}")
            if causal:
                raise InvalidValueError("aft_conv on a 2-D grid is bidirectional only (causal=False)")
            grid = (check_positive_int("grid[0]", grid[0]), check_positive_int("grid[1]", grid[1]))
        self.grid = grid
        self.to_k = nn.Linear(dim, self.heads)  # one key per head
        taps = (self.kernel_size,) * (1 if grid is None else 2)
        self.kernel = nn.Parameter(torch.empty(self.heads, *taps))
        self.gamma = nn.Parameter(torch.empty(self.heads))
        self.beta = nn.Parameter(torch.empty(self.heads))

    def init_own(self) -> None:
        nn.init.normal_(self.kernel)
        nn.init.zeros_(self.gamma)
        nn.init.zeros_(self.beta)

    def weight(self) -> torch.Tensor:
        """w = γ·(w̃ − mean)/std + β over each head's taps: (H, K), or (H, K, K) on a grid."""
        taps = self.kernel.flatten(1)
        centred = taps - taps.mean(-1, keepdim=True)
        spread = taps.std(-1, unbiased=False, keepdim=True).clamp_min(1e-5)  # one tap: no spread
        return (self.gamma[:, None] * centred / spread + self.beta[:, None]).view_as(self.kernel)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.hidden_dim // self.heads))

    def mix(self, q, k, v, attention_mask, packing=None):
        q, v = self._heads(q), self._heads(v)
        if self.grid is None:
            out = aft_ops.aft_conv(
                q, k, v, self.weight(), causal=self.causal, attention_mask=attention_mask, packing=packing
            )
            return out.flatten(-2)
        return self._mix_grid(q, k, v, attention_mask, packing)

    def context_op(self, q, k, v, split, **options):
        out = context_ops.aft_conv(
            self._heads(q), k, self._heads(v), self.weight(), split, grid=self.grid, **options
        )
        return out.flatten(-2)

    def _mix_grid(self, q, k, v, attention_mask, packing):
        """(B, X·Y, …) → (B, X, Y, …); a packed row's segments, each one whole grid, as a batch."""
        size = self.grid[0] * self.grid[1]
        lengths = (q.shape[1],) if packing is None else packing.lengths
        if any(length != size for length in lengths):
            what = "x" if packing is None else "every packed segment"
            raise InvalidValueError(f"{what} must hold the grid {self.grid}: {size} positions, got {lengths}")
        batch = q.shape[0]
        q, k, v = (t.unflatten(1, (-1, *self.grid)).flatten(0, 1) for t in (q, k, v))
        if attention_mask is not None:
            attention_mask = attention_mask.unflatten(1, self.grid)
        out = aft_ops.aft_conv(q, k, v, self.weight(), attention_mask=attention_mask)
        return out.reshape(batch, q.shape[0] // batch * size, -1)

    def mix_continued(self, q, k, v, state, chunk):
        out, final = aft_ops.aft_conv(
            self._heads(q), k, self._heads(v), self.weight(), causal=True, attention_mask=chunk.valid,
            initial_state=state, output_final_state=True,
        )  # fmt: skip
        state.take(final)
        return out.flatten(-2)
