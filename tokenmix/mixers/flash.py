"""Gated attention units (Hua et al. 2022): ``"gau"`` (quadratic relu² attention, FLASH-Quad's layer)
and ``"flash"`` (mixed-chunk attention, linear in N).

Both: [U, V, Z] = SiLU(x W + b) with U, V ∈ R^{N×e}, Z ∈ R^{N×s}; per-dimension scale and offset of Z give
the queries and keys (γ ~ N(1, 0.02), β = 0, neither weight-decayed), rotated by RoPE;
out = (U ⊙ attention(Q, K, V)) W_o.
A single head. The paper's x̂ = Norm(x) and the residual are the enclosing block's pre-norm and skip
connection (``tokenmix.models`` blocks with ``ffn=False``), as for every mixer here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..context import ops as context_ops
from ..core.checks import check_choice, check_positive_int, check_real
from ..core.chunks import Compacted
from ..core.packing import Packing
from ..errors import InvalidValueError
from ..functional import attention as attention_ops
from ..functional.flash import MixedChunkState, mixed_chunk_attention
from .base import Mixer, pick_options
from .cache import CacheState, KVCache
from .registry import ModelDefaults, register_mixer
from .rotary import RotaryEmbedding

PAPER = "Hua et al. 2022, Transformer Quality in Linear Time (arXiv 2202.10447)"
_SHARED_OPTIONS = ("causal", "expansion", "qk_dim", "rope", "rope_base", "dropout")
# The paper's stacks: no FFN (the unit gates itself), two GAU layers per Transformer layer (each has about
# half the parameters of attention + FFN), RoPE inside the unit and no absolute positions.
GAU_DEFAULTS = ModelDefaults(layers_per_block=2, ffn=False, positions="none")


class GatedAttentionUnit(Mixer):
    """The shared GAU body: the U/V/Z projection, ``num_qk`` scale-offsets of Z, RoPE and the gated output."""

    def __init__(
        self,
        dim: int,
        *,
        causal: bool,
        expansion: float,
        qk_dim: int,
        num_qk: int,
        rope: bool,
        rope_base: float,
        dropout: float,
    ) -> None:
        super().__init__(dim, causal=causal)
        self.expanded = int(check_real("expansion", expansion, positive=True) * dim)
        if self.expanded < 1:
            raise InvalidValueError(f"expansion · dim must be at least 1, got {expansion} · {dim}")
        self.qk_dim = check_positive_int("qk_dim", qk_dim)
        self.to_uvz = nn.Linear(dim, 2 * self.expanded + self.qk_dim)
        self.gamma = nn.Parameter(torch.empty(num_qk, self.qk_dim))
        self.beta = nn.Parameter(torch.empty(num_qk, self.qk_dim))
        self.no_weight_decay = frozenset({"gamma", "beta"})  # a gain and an offset: decay pulls them to 0
        self.rotary = RotaryEmbedding(self.qk_dim, base=rope_base) if rope else None
        self.to_out = nn.Linear(self.expanded, dim)
        self.dropout = nn.Dropout(check_real("dropout", dropout))

    def init_own(self) -> None:
        # γ ~ N(1, 0.02): the paper's text calls γ, β "similar to the learnable variables in LayerNorms",
        # whose scale starts at 1; its pseudo-code's N(0, 0.02) leaves q·k ≈ 1e-4 at the start, where
        # relu² has almost no gradient unless, as there, a relative-position bias feeds the scores. With
        # RoPE instead, GAU stayed on the byte-unigram plateau (4.37 bits per byte at compare --quick's
        # 120 steps; N(1, 0.02): 3.49, and FLASH 4.16 → 3.46; tests/mixers/test_flash.py).
        nn.init.normal_(self.gamma, mean=1.0, std=0.02)
        nn.init.zeros_(self.beta)

    def project(
        self, x: torch.Tensor, offset: int | torch.Tensor, packing: Packing | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """x: (B, N, dim) at positions offset… (an int or (B,); a packed row's: each segment's from 0;
        or (B, N): each entry's own) → U (B, N, e), V (B, N, e), and ``num_qk`` of (B, N, s)."""
        u, v, z = nn.functional.silu(self.to_uvz(x)).split([self.expanded, self.expanded, self.qk_dim], -1)
        # (B, num_qk, N, s), laid out so that RoPE rotates all of them in one pass without a copy
        queries_keys = z[:, None] * self.gamma[:, None, :] + self.beta[:, None, :]
        if self.rotary is not None:
            positions = None if packing is None else packing.positions()
            if isinstance(offset, torch.Tensor) and offset.dim() == 2:
                offset, positions = 0, offset
            queries_keys = self.rotary(queries_keys, offset, positions)  # all at once, not num_qk passes
        return u, v, list(queries_keys.unbind(-3))

    def output(self, u: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.to_out(u * attended))


@register_mixer(
    "gau",
    paper=PAPER,
    time="O(N²·s + N·d·e)",
    memory="O(N·(d+e+s)) (pointwise attention's query blocks)",
    state="KV cache, O(t·(s+e))",
    defaults=GAU_DEFAULTS,
)
class GAU(GatedAttentionUnit):
    """Gated attention unit with quadratic attention, A = φ(Q Kᵀ/√s) / L (φ = relu² in the paper).

    Args:
        dim: model width d. expansion: e = expansion · d (2 in the paper). qk_dim: s (128).
        activation: relu2 (the paper), any other pointwise activation, or "softmax" for ablations.
        length: None for L = the number of keys each position sees (the contract's default); an int for the
            paper's fixed 1/n.
        rope: rotary positions on Q and K (on, as in the paper). dropout: on the output.
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        expansion: float = 2.0,
        qk_dim: int = 128,
        activation: str = "relu2",
        length: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, num_qk=2, **pick_options(locals(), _SHARED_OPTIONS))
        self.activation = check_choice("activation", activation, (*attention_ops.ACTIVATIONS, "softmax"))
        self.length = check_positive_int("length", length, allow_none=True)

    def _heads(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t[:, None] for t in tensors]  # one head: (B, N, D) → (B, 1, N, D)

    def _pointwise_options(self) -> dict:
        return {
            "activation": self.activation,
            "alpha": 1.0,
            "scale": self.qk_dim**-0.5,
            "length": self.length,
        }

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        u, v, (q, k) = self.project(x, 0, packing)
        return self.output(u, self.mix(*self._heads(q, k, v), attention_mask, packing)[:, 0])

    def mix(self, q, k, v, attention_mask, packing=None):
        """The attention op over q, k, v (B, 1, N, ·) (a packed row's segments)."""
        options = {"causal": self.causal, "attention_mask": attention_mask, "packing": packing}
        if self.activation == "softmax":
            return attention_ops.softmax_attention(q, k, v, scale=self.qk_dim**-0.5, **options)
        return attention_ops.pointwise_attention(q, k, v, **options, **self._pointwise_options())

    split_orders = ("contiguous", "zigzag")

    def mix_split(self, x, attention_mask, split):
        positions = split.positions(x.device).expand(x.shape[0], -1)  # RoPE at the global positions
        u, v, (q, k) = self.project(x, positions)
        q, k, v = self._heads(q, k, v)
        options = {"causal": self.causal, "attention_mask": attention_mask}
        if self.activation == "softmax":
            attended = context_ops.softmax_attention(q, k, v, split, scale=self.qk_dim**-0.5, **options)
        else:
            attended = context_ops.pointwise_attention(q, k, v, split, **options, **self._pointwise_options())
        return self.output(u, attended[:, 0])

    def mix_cached(self, q, k, v, real):
        """The newest T queries (B, 1, T, s) over the cache (B, 1, L, ·), real keys ``real`` (B, L)."""
        if self.activation == "softmax":
            return attention_ops.softmax_attention_cached(q, k, v, scale=self.qk_dim**-0.5, key_mask=real)
        return attention_ops.pointwise_attention_cached(q, k, v, key_mask=real, **self._pointwise_options())

    def new_state(self, batch_size: int, capacity: int | None = None) -> CacheState:
        """An empty KV cache.
        ``capacity``: a fixed-size cache for that many positions (padding included), whose tensors keep
        their shapes from step to step (for ``torch.compile``); None grows as needed."""
        return CacheState(batch_size=batch_size, capacity=capacity, cache=KVCache(batch_size, capacity))

    def advance(self, x: torch.Tensor, state: CacheState, chunk: Compacted) -> torch.Tensor:
        u, v, (q, k) = self.project(x, state.positions)
        q, k, v = self._heads(q, k, v)
        attended = state.attend(self, q, k, v, chunk.valid)
        return self.output(u, attended[:, 0])


@register_mixer(
    "flash",
    paper=PAPER,
    time="O(N·C·s + N·s·e + N·d·e)",
    memory="O(N·(C+d+e+s))",
    state="Σ KᵀV (s×e) + current chunk (≤ C tokens): O(s·e + C·(s+e)), constant in t",
    defaults=GAU_DEFAULTS,
)
class FLASH(GatedAttentionUnit):
    """GAU whose attention is mixed-chunk attention: relu² attention within chunks of ``chunk_size``
    (divided by C), linear attention across chunks. Four scale-offsets of Z give the quadratic and linear
    queries and keys.

    Args:
        dim, expansion, qk_dim, rope, dropout: as for ``"gau"``.
        chunk_size: C (256 in the paper).
        linear: include the linear part (False is the quadratic-only ablation).
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        chunk_size: int = 256,
        expansion: float = 2.0,
        qk_dim: int = 128,
        linear: bool = True,
        rope: bool = True,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, num_qk=4, **pick_options(locals(), _SHARED_OPTIONS))
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.linear = bool(linear)

    def _project(self, x: torch.Tensor, offset: int | torch.Tensor, packing: Packing | None = None):
        u, v, (q_quad, k_quad, q_lin, k_lin) = self.project(x, offset, packing)
        if not self.linear:
            q_lin = torch.zeros_like(q_lin)  # lin_i = 0 · M_i / n_i
        return u, v, q_quad, k_quad, q_lin, k_lin

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        u, v, q_quad, k_quad, q_lin, k_lin = self._project(x, 0, packing)
        return self.output(u, self.mix(q_quad, k_quad, q_lin, k_lin, v, attention_mask, packing))

    def mix(self, q_quad, k_quad, q_lin, k_lin, v, attention_mask, packing=None, **state):
        """Mixed-chunk attention (``state``: its initial_state and output_final_state)."""
        return mixed_chunk_attention(
            q_quad, k_quad, q_lin, k_lin, v, chunk_size=self.chunk_size, causal=self.causal,
            attention_mask=attention_mask, packing=packing, **state,
        )  # fmt: skip

    def mix_split(self, x, attention_mask, split):
        u, v, q_quad, k_quad, q_lin, k_lin = self._project(x, split.start)  # RoPE at the global positions
        attended = context_ops.mixed_chunk_attention(
            q_quad, k_quad, q_lin, k_lin, v, split, chunk_size=self.chunk_size, causal=self.causal,
            attention_mask=attention_mask,
        )  # fmt: skip
        return self.output(u, attended)

    def new_state(self, batch_size: int, capacity: int | None = None) -> MixedChunkState:
        """The op's state, empty: constant in size; ``capacity`` only bounds what it may be fed."""
        return MixedChunkState(batch_size=batch_size, capacity=capacity)

    def advance(self, x: torch.Tensor, state: MixedChunkState, chunk: Compacted) -> torch.Tensor:
        # The chunk comes as given (the op compacts it): each real token's position is the row's next one
        # plus the real tokens before it.
        offset = state.positions
        if chunk.valid is not None:
            offset = offset[:, None] + chunk.valid.long().cumsum(1) - 1
        u, v, q_quad, k_quad, q_lin, k_lin = self._project(x, offset)
        attended, final = self.mix(  # the state is this mixer's own: a token's step writes into it
            q_quad, k_quad, q_lin, k_lin, v, chunk.valid,
            initial_state=state, output_final_state=True, inplace=True,
        )  # fmt: skip
        state.take(final)
        return self.output(u, attended.to(u.dtype))
