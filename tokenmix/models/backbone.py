"""The residual stack every model shares: positions, pre-norm blocks of mixer + FFN, a final norm."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..context.exchange import Split
from ..core.checks import (
    check_attention_mask,
    check_choice,
    check_flag,
    check_float_tensor,
    check_positive_int,
    check_real,
)
from ..core.chunks import Compacted, compact
from ..core.packing import Packing, packing_of
from ..errors import InvalidTypeError, InvalidValueError, UnavailableError
from ..init import SelfInitialising
from ..mixers import create_mixer, mixer_info
from ..mixers.state import DecodingState, as_chunk

POSITIONS = ("learned", "rope", "none")


class FeedForward(SelfInitialising, nn.Sequential):
    """Linear(dim → mult·dim), GELU, Linear(mult·dim → dim), dropout."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim), nn.Dropout(dropout)
        )


class Block(SelfInitialising):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) unless ``ffn`` is None."""

    def __init__(self, dim: int, mixer: nn.Module, ffn: nn.Module | None) -> None:
        super().__init__()
        self.mixer_norm, self.mixer = nn.LayerNorm(dim), mixer
        self.ffn_norm = nn.LayerNorm(dim) if ffn is not None else None
        self.ffn = ffn

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.ffn is None else x + self.ffn(self.ffn_norm(x))

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packing: Packing | None = None,
        context: Split | None = None,
    ) -> torch.Tensor:
        y = self.mixer(self.mixer_norm(x), attention_mask, packing=packing, context=context)
        return self._ffn(x + y)

    def step(
        self, x: torch.Tensor, state: Any, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        y, state = self.mixer.step(self.mixer_norm(x), state, attention_mask)
        return self._ffn(x + y), state


@dataclass
class BackboneState(DecodingState):
    """Decoding state of a stack: one state per layer (``made_by``: the stack's ``layer_shapes``)."""

    layers: list[DecodingState] = field(default_factory=list)


def _per_layer(value: Any, depth: int, name: str) -> list[Any]:
    if isinstance(value, (str, Mapping)) or value is None:
        return [value] * depth
    values = list(value)
    if len(values) != depth:
        raise InvalidValueError(
            f"{name} has {len(values)} entries but depth={depth}; give one per layer or a single one"
        )
    return values


def _init_residual_branches(blocks: nn.ModuleList) -> None:
    """GPT-2's initialisation of what each residual branch adds: its last projection (every mixer's
    ``to_out``, the FFN's second layer) drawn with std 0.02/√(number of branches), biases zero, so the
    stack starts close to the identity and the embeddings reach the head. With PyTorch's default
    (std ≈ 0.05 at d=128) the branches drown the embeddings: benchmarks/recipe.py measured 3.49 before,
    3.17 after, validation bits per byte at 400 steps (x-transformers' decoder: 3.36; README, Measured)."""
    projections = []
    for block in blocks:
        projections.append(block.mixer.to_out)
        if block.ffn is not None:
            projections.append(block.ffn[2])
    for projection in projections:
        nn.init.normal_(projection.weight, std=0.02 / math.sqrt(len(projections)))
        if projection.bias is not None:
            nn.init.zeros_(projection.bias)


def _real_first(mask: torch.Tensor | None) -> Compacted | None:
    """Positions count each row's real tokens, in a forward as in ``step``: a row whose padding comes
    before a real token (left padding, holes) is computed with its real tokens moved to the front, in
    order, and put back after; None when every row already starts with its real tokens."""
    if mask is None or (not torch.compiler.is_compiling() and bool((mask[:, 1:] <= mask[:, :-1]).all())):
        return None  # (a host sync, as the mask check's; a compiled graph always compacts)
    return compact(mask, mask.shape[0], mask.shape[1], mask.device)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn ``Backbone.activation_checkpointing`` on or off in every backbone of ``model``."""
    for module in model.modules():
        if isinstance(module, Backbone):
            module.activation_checkpointing = enabled


class Backbone(SelfInitialising):
    """Embeddings (B, N, dim) → hidden states (B, N, dim) through ``depth`` mixer blocks.

    Args:
        dim, depth: width and number of blocks.
        mixer: a registered mixer name, or one name per layer (hybrid stacks).
        causal: build causal mixers (needed for decoding).
        mixer_options: options for every layer's mixer; ``layer_options``: a list of ``depth`` dicts
            merged on top per layer (e.g. a kernel size per layer).
        ffn: add a feed-forward sublayer to each block (False for mixers with their own gating, e.g. GAU).
        positions: ``"learned"`` absolute embeddings (up to ``max_len``), ``"rope"`` (passed to the mixers
            as ``rope=True``), or ``"none"``.

    ``activation_checkpointing`` (an attribute, False by default): in training, keep only each block's
    input and recompute the block in the backward pass (non-reentrant ``torch.utils.checkpoint``): the
    activations held are the blocks' inputs and one block's at a time, for one more forward pass.
    """

    activation_checkpointing: bool = False

    def __init__(
        self,
        dim: int,
        depth: int,
        mixer: str | Sequence[str] = "softmax",
        *,
        causal: bool = False,
        mixer_options: Mapping[str, Any] | None = None,
        layer_options: Sequence[Mapping[str, Any]] | None = None,
        ffn: bool = True,
        ffn_mult: int = 4,
        positions: str = "learned",
        max_len: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        depth = check_positive_int("depth", depth)
        self.positions = check_choice("positions", positions, POSITIONS)
        self.max_len = check_positive_int("max_len", max_len)
        self.causal = check_flag("causal", causal)
        dropout = check_real("dropout", dropout)
        names = _per_layer(mixer, depth, "mixer")
        per_layer = _per_layer(layer_options, depth, "layer_options")
        rotary = [name for name in names if "rope" in mixer_info(name).options]
        if positions == "rope" and not rotary:
            raise InvalidValueError(
                f"positions='rope' needs a mixer with rotary positions (one with a rope option); "
                f"{', '.join(dict.fromkeys(names))} take none: use positions='learned' or 'none'"
            )
        blocks = []
        for name, extra in zip(names, per_layer, strict=True):
            options = {**(mixer_options or {}), **(extra or {})}
            if positions == "rope" and name in rotary:  # the others carry positions of their own (w, taps)
                options.setdefault("rope", True)
            mixer_module = create_mixer(name, dim, causal=causal, **options)
            blocks.append(Block(dim, mixer_module, FeedForward(dim, ffn_mult, dropout) if ffn else None))
        self.blocks = nn.ModuleList(blocks)
        self.position_embedding = nn.Embedding(max_len, dim) if positions == "learned" else None
        self.no_weight_decay = frozenset({"position_embedding.weight"})  # a position table
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def init_own(self) -> None:
        _init_residual_branches(self.blocks)
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)

    def _positions(
        self, x: torch.Tensor, packing: Packing | None, context: Split | None = None
    ) -> torch.Tensor:
        if self.position_embedding is None:
            return x
        # With packing, positions restart at every segment: the longest segment must fit; a rank's share
        # of a split sequence takes the whole sequence's positions.
        if context is not None:
            end = context.total
        else:
            end = x.shape[-2] if packing is None else max(packing.lengths, default=0)
        if end > self.max_len:
            raise InvalidValueError(
                f"sequence of length {end} is longer than the learned position table (max_len={self.max_len})"
            )
        if context is not None:
            return x + context.local(self.position_embedding.weight, 0)
        if packing is None:
            return x + self.position_embedding.weight[:end]
        return x + self.position_embedding(packing.positions())

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        context: Split | None = None,
        *,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """(B, N, dim) → (B, N, dim). ``cu_seqlens`` (S + 1,) with B = 1: packed segments, each
        computed as if alone (positions restart; docs/spec.md §8). Checked and planned once here, the
        plan handed to every layer; ``packing``: that plan made by the caller (``Packing.of``).
        ``attention_mask`` (B, N): positions count each row's real tokens, as in ``step`` (a left-padded
        row equals the row alone; docs/spec.md §7). ``context``: x is this rank's share (B, n, dim) of a
        sequence split over a context-parallel group (docs/spec.md §14), every layer's mixer exchanging
        what it needs; the output is this rank's share."""
        if context is not None:
            return self._forward_split(x, attention_mask, cu_seqlens, packing, context)
        chunk = None
        if cu_seqlens is not None or packing is not None:
            check_float_tensor("x", x, "(B, N, dim)")
            packing = packing_of(cu_seqlens, x.shape[0], x.shape[1], attention_mask, x.device, packing)
        elif attention_mask is not None:
            check_float_tensor("x", x, "(B, N, dim)")
            attention_mask = check_attention_mask(attention_mask, x.shape[0], x.shape[1], x.device)
            chunk = _real_first(attention_mask)
            if chunk is not None:
                x, attention_mask = chunk.gather(x), chunk.valid
        x = self._layers(self.dropout(self._positions(x, packing)), attention_mask, packing)
        return x if chunk is None else chunk.scatter(x)

    def _layers(self, x, attention_mask, packing, context: Split | None = None) -> torch.Tensor:
        """x through every block (recomputed in the backward with activation checkpointing), normed."""
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # the RNG state is replayed, so dropout draws the same mask again
                x = checkpoint(block, x, attention_mask, packing, context, use_reentrant=False)
            else:
                x = block(x, attention_mask, packing, context)
        return self.norm(x)

    def _forward_split(self, x, attention_mask, cu_seqlens, packing, context: Split) -> torch.Tensor:
        given = {"attention_mask": attention_mask, "cu_seqlens": cu_seqlens, "packing": packing}
        what = next((name for name, value in given.items() if value is not None), None)
        if what is not None:
            raise InvalidValueError(
                f"{what} with context: a model's split rows are whole rows of real tokens"
            )
        check_float_tensor("x", x, "(B, n, dim)")
        return self._layers(self.dropout(self._positions(x, None, context)), None, None, context)

    def init_state(self, batch_size: int, capacity: int | None = None) -> BackboneState:
        """Every layer's empty state; ``capacity`` as in ``Mixer.init_state`` (fixed shapes)."""
        if not self.causal:
            raise UnavailableError("decoding needs a causal model (causal=True)")
        layers = [block.mixer.init_state(batch_size, capacity) for block in self.blocks]
        shapes = self.layer_shapes()
        return BackboneState(batch_size=batch_size, capacity=capacity, made_by=shapes, layers=layers)

    def layer_shapes(self) -> tuple:
        """Per layer: the mixer's kind, width, heads and parameter shapes — what a decoding state must
        have been made for (computed once; a state of another stack is refused by ``step``)."""
        if getattr(self, "_layer_shapes", None) is None:
            self._layer_shapes = tuple(
                (
                    type(block.mixer).__name__,
                    block.mixer.dim,
                    getattr(block.mixer, "heads", None),
                    getattr(block.mixer, "head_dim", None),
                    tuple(tuple(p.shape) for p in block.mixer.parameters()),
                )
                for block in self.blocks
            )
        return self._layer_shapes

    def _check_state(self, state: object) -> BackboneState:
        if not isinstance(state, BackboneState):
            raise InvalidTypeError(
                f"state must be what init_state(batch_size) returned, got {type(state).__name__}"
            )
        if state.made_by != self.layer_shapes():
            theirs, ours = state.made_by, self.layer_shapes()

            def describe(shapes: tuple) -> str:
                return ", ".join(f"{kind}(dim={dim}, heads={heads})" for kind, dim, heads, *_ in shapes)

            raise InvalidValueError(
                f"state was made by another model: {len(theirs)} layers [{describe(theirs)}]; this one has "
                f"{len(ours)} [{describe(ours)}]"
            )
        return state

    def step(
        self, x: torch.Tensor, state: BackboneState, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, BackboneState]:
        """One token's embedding (B, dim) or a chunk's (B, T, dim) → hidden states of the same shape, in
        one pass (docs/spec.md §7). ``attention_mask`` ((B,) or (B, T)): padded positions leave every
        layer's state unchanged; positions count each row's real tokens."""
        state = self._check_state(state)
        state.check_current()
        x, single, mask = as_chunk(x, attention_mask)
        given_at = state.fed
        state.feed(x.shape[0], x.shape[1])
        real = torch.ones(x.shape[:2], dtype=torch.long, device=x.device) if mask is None else mask.long()
        positions = state.next_positions(x.device)[:, None] + real.cumsum(1) - 1  # padding: its neighbour's
        if self.position_embedding is not None:
            if state.capacity is None or state.capacity > self.max_len:  # else it cannot run past
                end = int((state.positions + real.sum(1)).max())  # (a host sync)
                if end > self.max_len:
                    raise InvalidValueError(
                        f"sequence of length {end} is longer than the learned position table "
                        f"(max_len={self.max_len})"
                    )
            x = x + self.position_embedding(positions.clamp_min(0))
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x, state.layers[i] = block.step(x, state.layers[i], mask)
        state.positions = state.positions + real.sum(1)
        x = self.norm(x)
        return (x[:, 0] if single else x), state.successor(given_at)
