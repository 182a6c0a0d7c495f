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

from ..errors import InvalidValueError
from ..functional import aft as aft_ops
from ..functional._checks import check_positive_int, check_real
from .base import Mixer
from .cache import KVCache
from .registry import register_mixer

PAPER = "Zhai et al. 2021, An Attention Free Transformer (arXiv 2105.14103)"
Running = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class AFTState:
    """Decoding state: the next position, unbiased keys folded into (max, numerator, denominator), and
    the keys and values still needed one by one (all of them for AFT-full, the window for AFT-local)."""

    batch_size: int
    position: int = 0
    running: Running | None = None
    cache: KVCache | None = None
    window_keys: torch.Tensor | None = None
    window_values: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [*(self.running or ()), self.window_keys, self.window_values]
        cached = self.cache.nbytes() if self.cache is not None else 0
        return cached + sum(t.numel() * t.element_size() for t in tensors if t is not None)


class AFTMixer(Mixer):
    """Shared projections, output, length checks and state; subclasses supply the op and its step."""

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

    def mix(self, q, k, v, attention_mask):
        raise NotImplementedError

    def mix_step(self, q, k, v, state: AFTState) -> torch.Tensor:
        raise NotImplementedError

    def window_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: AFTState, window: int, bias
    ) -> torch.Tensor:
        """A causal step where the last ``window`` positions carry biases and older ones count unbiased:
        they are kept one by one, and folded into the running sums as they leave the window.
        ``bias(first, length)`` gives the biases (length, channels or 1) of positions first … t."""
        if state.window_keys is None:
            state.window_keys, state.window_values = k[:, :0], v[:, :0]
        keys = torch.cat((state.window_keys, k), dim=1)
        values = torch.cat((state.window_values, v), dim=1)
        if keys.shape[1] > window:  # the oldest leaves the window: from now on it counts unbiased
            state.running = aft_ops.aft_accumulate(state.running, keys[:, :1], values[:, :1])
            keys, values = keys[:, 1:], values[:, 1:]
        state.window_keys, state.window_values = keys, values
        first = state.position + 1 - keys.shape[1]
        return aft_ops.aft_step(q, keys + bias(first, keys.shape[1]), values, state.running)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, attention_mask = self.check_input(x, attention_mask)
        self._check_length(x.shape[1])
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.dropout(self.to_out(self.mix(q, k, v, attention_mask)))

    def init_state(self, batch_size: int) -> AFTState:
        return AFTState(check_positive_int("batch_size", batch_size))

    def step(self, x_t: torch.Tensor, state: AFTState) -> tuple[torch.Tensor, AFTState]:
        x_t = self.check_step_input(x_t, state)
        if x_t.shape[0] != state.batch_size:
            raise InvalidValueError(
                f"state was made for batch_size={state.batch_size}, got a batch of {x_t.shape[0]}"
            )
        self._check_length(state.position + 1)
        q, k, v = self.to_q(x_t), self.to_k(x_t), self.to_v(x_t)
        y = self.mix_step(q, k[:, None], v[:, None], state)
        state.position += 1
        return self.dropout(self.to_out(y)), state


class PositionBias(nn.Module):
    """w = u vᵀ with u, v ∈ R^{max_len × rank}, N(0, 0.02); or, with ``rank=None``, a full learned
    (max_len, max_len) table w, N(0, 0.02)."""

    def __init__(self, max_len: int, rank: int | None) -> None:
        super().__init__()
        rank = check_positive_int("bias_rank", rank, allow_none=True)
        if rank is None:
            self.table = nn.Parameter(torch.randn(max_len, max_len) * 0.02)
        else:
            self.u = nn.Parameter(torch.randn(max_len, rank) * 0.02)
            self.v = nn.Parameter(torch.randn(max_len, rank) * 0.02)
        self.rank = rank

    def rows(self, rows: slice, columns: slice) -> torch.Tensor:
        """The block w[rows, columns]."""
        return self.table[rows, columns] if self.rank is None else self.u[rows] @ self.v[columns].T


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

    def mix(self, q, k, v, attention_mask):
        seq_len = q.shape[1]
        w = self.bias.rows(slice(0, seq_len), slice(0, seq_len))
        return aft_ops.aft_full(q, k, v, w, causal=self.causal, attention_mask=attention_mask)

    def mix_step(self, q, k, v, state):
        if state.cache is None:
            state.cache = KVCache(state.batch_size)
        keys, values = state.cache.append(k, v)
        bias = self.bias.rows(
            slice(state.position, state.position + 1), slice(0, state.position + 1)
        )  # (1, t)
        return aft_ops.aft_step(q, keys + bias[0, :, None], values)


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

    def __init__(
        self, dim: int, *, causal: bool = False, hidden_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(dim, causal=causal, hidden_dim=hidden_dim, max_len=None, dropout=dropout)

    def mix(self, q, k, v, attention_mask):
        return aft_ops.aft_simple(q, k, v, causal=self.causal, attention_mask=attention_mask)

    def mix_step(self, q, k, v, state):
        state.running = aft_ops.aft_accumulate(state.running, k, v)
        _, numerator, denominator = state.running
        return (torch.sigmoid(q.to(numerator.dtype)) * numerator / denominator).to(q.dtype)


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

    def mix(self, q, k, v, attention_mask):
        options = dict(window=self.window, causal=self.causal, attention_mask=attention_mask)
        if self.bias.rank is None:
            return aft_ops.aft_local(q, k, v, self.bias.table, **options)
        return aft_ops.aft_local_lowrank(q, k, v, self.bias.u, self.bias.v, **options)

    def mix_step(self, q, k, v, state):
        def bias(first: int, length: int) -> torch.Tensor:
            return self.bias.rows(slice(state.position, state.position + 1), slice(first, first + length)).T

        return self.window_step(q, k, v, state, self.window, bias)


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
        self.kernel = nn.Parameter(torch.randn(self.heads, *taps))
        self.gamma = nn.Parameter(torch.zeros(self.heads))
        self.beta = nn.Parameter(torch.zeros(self.heads))

    def weight(self) -> torch.Tensor:
        """w = γ·(w̃ − mean)/std + β over each head's taps: (H, K), or (H, K, K) on a grid."""
        taps = self.kernel.flatten(1)
        centred = taps - taps.mean(-1, keepdim=True)
        spread = taps.std(-1, unbiased=False, keepdim=True).clamp_min(1e-5)  # one tap: no spread
        return (self.gamma[:, None] * centred / spread + self.beta[:, None]).view_as(self.kernel)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.hidden_dim // self.heads))

    def mix(self, q, k, v, attention_mask):
        q, v = self._heads(q), self._heads(v)
        if self.grid is not None:  # (B, X·Y, …) → (B, X, Y, …)
            if q.shape[1] != self.grid[0] * self.grid[1]:
                raise InvalidValueError(
                    f"x must hold the grid {self.grid}: {self.grid[0] * self.grid[1]} positions, "
                    f"got {q.shape[1]}"
                )
            q, k, v = (t.unflatten(1, self.grid) for t in (q, k, v))
            if attention_mask is not None:
                attention_mask = attention_mask.unflatten(1, self.grid)
        out = aft_ops.aft_conv(q, k, v, self.weight(), causal=self.causal, attention_mask=attention_mask)
        return out.flatten(-2).flatten(1, -2)

    def mix_step(self, q, k, v, state):
        head_dim = self.hidden_dim // self.heads
        weight = self.weight()

        def bias(first: int, length: int) -> torch.Tensor:  # taps K − length … K − 1, per channel
            return weight[:, self.kernel_size - length :].T.repeat_interleave(head_dim, dim=1)

        keys = k.repeat_interleave(head_dim, dim=-1)  # each head's key over its channels
        return self.window_step(q, keys, v, state, self.kernel_size, bias)
