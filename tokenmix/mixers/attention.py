"""Multi-head attention mixers: ``"softmax"`` (the baseline) and ``"pointwise"`` (Wortsman et al. 2023).

Both project x to per-head q, k, v, optionally layer-normalise q and k per head (qk-layernorm,
Dehghani et al. 2023) and rotate them (RoPE), attend with the functional op, optionally gate the result,
and project back: ``y = Dropout(([attn ⊙ SiLU(x W_g)]) W_o)``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..context import ops as context_ops
from ..core.checks import check_positive_int, check_real
from ..core.chunks import Compacted
from ..core.packing import Packing
from ..errors import InvalidValueError
from ..functional import attention as attention_ops
from .base import Mixer, pick_options
from .cache import CacheState, KVCache
from .registry import ModelDefaults, register_mixer
from .rotary import RotaryEmbedding

_SHARED_OPTIONS = (
    "causal",
    "heads",
    "head_dim",
    "qk_layernorm",
    "rope",
    "rope_base",
    "gate",
    "bias",
    "dropout",
)


class MultiHeadAttention(Mixer):
    """Shared projections, qk-layernorm, RoPE, gate and KV-cache decoding; subclasses choose the op."""

    def __init__(
        self,
        dim: int,
        *,
        causal: bool,
        heads: int,
        head_dim: int | None,
        qk_layernorm: bool,
        rope: bool,
        rope_base: float,
        gate: bool,
        bias: bool,
        dropout: float,
    ) -> None:
        super().__init__(dim, causal=causal)
        self.heads = check_positive_int("heads", heads)
        if head_dim is None:
            if dim % heads:
                raise InvalidValueError(f"heads={heads} must divide dim={dim} (or pass head_dim explicitly)")
            head_dim = dim // heads
        self.head_dim = check_positive_int("head_dim", head_dim)
        inner = self.heads * self.head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_layernorm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_layernorm else None
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base) if rope else None
        self.to_gate = nn.Linear(dim, inner, bias=bias) if gate else None
        self.to_out = nn.Linear(inner, dim, bias=bias)
        self.dropout = nn.Dropout(check_real("dropout", dropout))

    def mix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """(B, H, N, D) q, k, v → (B, H, N, D) with the family's op (over a packed row's segments)."""
        raise NotImplementedError

    def mix_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None
    ) -> torch.Tensor:
        """The newest T queries (B, H, T, D) over the cache (B, H, L, D), real keys ``real`` (B, L)."""
        raise NotImplementedError

    def _qkv(
        self,
        x: torch.Tensor,
        offset: int | torch.Tensor,
        packing: Packing | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            if packing is not None:
                positions = packing.positions()  # each segment's from 0
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        return q, k, v

    def _output(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = rearrange(attended, "b h n d -> b n (h d)")
        if self.to_gate is not None:
            out = out * nn.functional.silu(self.to_gate(x))
        return self.dropout(self.to_out(out))

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, 0, packing)
        return self._output(self.mix(q, k, v, attention_mask, packing), x)

    split_orders = ("contiguous", "zigzag")

    def mix_split(self, x, attention_mask, split):
        q, k, v = self._qkv(x, 0, positions=split.positions(x.device))  # RoPE at the global positions
        attended = self.context_op(q, k, v, split, causal=self.causal, attention_mask=attention_mask)
        return self._output(attended, x)

    def context_op(self, q, k, v, split, **options) -> torch.Tensor:
        """The family's op over a split sequence (``tokenmix.context.ops``)."""
        raise NotImplementedError

    def new_state(self, batch_size: int, capacity: int | None = None) -> CacheState:
        """An empty KV cache: O(t · heads · head_dim) per sequence after t steps.
        ``capacity``: a fixed-size cache for that many positions (padding included), whose tensors keep
        their shapes from step to step (for ``torch.compile``); None grows as needed."""
        return CacheState(batch_size=batch_size, capacity=capacity, cache=KVCache(batch_size, capacity))

    def advance(self, x: torch.Tensor, state: CacheState, chunk: Compacted) -> torch.Tensor:
        q, k, v = self._qkv(x, offset=state.positions)
        attended = state.attend(self, q, k, v, chunk.valid)
        return self._output(attended, x)


@register_mixer(
    "softmax",
    paper="Vaswani et al. 2017, Attention Is All You Need (arXiv 1706.03762)",
    time="O(N²·d)",
    memory="O(N·d) (SDPA; O(N²) bool mask with causal+padding)",
    state="KV cache, O(t·d)",
    defaults=ModelDefaults(head_width=32),
)
class SoftmaxAttention(MultiHeadAttention):
    """Multi-head softmax attention over PyTorch SDPA.

    Args:
        dim: model width. heads: number of heads; head_dim defaults to dim // heads.
        qk_layernorm: LayerNorm over head_dim on q and k. rope: rotary positions on q and k.
        gate: multiply the attention output by SiLU(x W_g) before W_o. bias: biases in the projections.
        dropout: on the mixer's output.
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        heads: int = 8,
        head_dim: int | None = None,
        qk_layernorm: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        gate: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, **pick_options(locals(), _SHARED_OPTIONS))

    def mix(self, q, k, v, attention_mask, packing=None):
        return attention_ops.softmax_attention(
            q, k, v, causal=self.causal, attention_mask=attention_mask, packing=packing
        )

    def mix_cached(self, q, k, v, real):
        return attention_ops.softmax_attention_cached(q, k, v, key_mask=real)

    def context_op(self, q, k, v, split, **options):
        return context_ops.softmax_attention(q, k, v, split, **options)


@register_mixer(
    "pointwise",
    paper="Wortsman et al. 2023, Replacing softmax with ReLU in Vision Transformers (arXiv 2309.08586)",
    time="O(N²·d)",
    memory="O(N·d) (query blocks, recomputed in backward)",
    state="KV cache, O(t·d)",
    defaults=ModelDefaults(head_width=32),
)
class PointwiseAttention(MultiHeadAttention):
    """Multi-head pointwise attention: softmax replaced by φ(q·k/√d) · L^(−alpha).

    Defaults follow the paper's recipe: relu, alpha = 1 (divide by the sequence length), qk-layernorm on.
    ``gate=True`` is the paper's gating ablation, read as GAU's gate (Hua et al. 2022): the attention
    output times SiLU(x W_g), before W_o.

    Args:
        dim: model width. heads: number of heads; head_dim defaults to dim // heads.
        activation: φ, one of relu, relu2, gelu, softplus, identity, relu6, sigmoid.
        alpha: exponent of the length normalisation L^(−alpha).
        length: None for L = the number of keys each row sees; an int for a fixed L.
        qk_layernorm, rope, rope_base, gate, bias, dropout: as for ``"softmax"``.
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = False,
        heads: int = 8,
        head_dim: int | None = None,
        activation: str = "relu",
        alpha: float = 1.0,
        length: int | None = None,
        qk_layernorm: bool = True,
        rope: bool = False,
        rope_base: float = 10000.0,
        gate: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, **pick_options(locals(), _SHARED_OPTIONS))
        # Validate now so a bad option fails at construction, not at the first forward.
        self.activation, self.alpha, self.length = attention_ops._check_pointwise_options(
            activation, alpha, length
        )

    def _options(self) -> dict:
        return {"activation": self.activation, "alpha": self.alpha, "length": self.length}

    def mix(self, q, k, v, attention_mask, packing=None):
        return attention_ops.pointwise_attention(
            q, k, v, causal=self.causal, attention_mask=attention_mask, packing=packing, **self._options()
        )

    def mix_cached(self, q, k, v, real):
        return attention_ops.pointwise_attention_cached(q, k, v, key_mask=real, **self._options())

    def context_op(self, q, k, v, split, **options):
        return context_ops.pointwise_attention(q, k, v, split, **options, **self._options())
