"""The base every mixer module derives from: input checks and the decoding contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..context.exchange import Split
from ..core.checks import check_attention_mask, check_flag, check_float_tensor, check_positive_int
from ..core.chunks import Compacted, as_given, compact
from ..core.packing import Packing, packing_of
from ..errors import InvalidTypeError, InvalidValueError, UnavailableError
from ..init import SelfInitialising
from .state import DecodingState, as_chunk


def pick_options(arguments: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The named entries of a call's arguments (``locals()``): how a registered subclass, which lists
    every option in its own signature because the registry reads options from there, hands the shared
    ones to its base class."""
    return {name: arguments[name] for name in names}


class Mixer(SelfInitialising):
    """A token mixer: ``forward(x, attention_mask=None, cu_seqlens=None)`` maps (B, N, dim) to (B, N, dim).

    Causal mixers also decode: ``state = init_state(batch_size)``, then ``y_t, state = step(x_t, state)``
    with x_t: (B, dim); stepping through a sequence reproduces the causal forward. A step advances the
    state in place and returns it as a new object; the one given is stale (refused if stepped again).

    Every mixer's last layer is a linear projection named ``to_out`` (dropout aside): the models
    initialise it as the last projection of a residual branch.

    A mixer implements three hooks, one signature each in every family: ``mix_sequence(x,
    attention_mask, packing)`` (the checked input; ``packing``: a packed row's plan, or None),
    ``new_state(batch_size, capacity)`` and ``advance(x, state, chunk)`` (a chunk whose real tokens
    come first in each row). The base checks inputs, plans packing, compacts chunks and keeps the
    state's positions. (Inside a family, ``mix`` calls its op on a sequence, ``mix_cached`` attends over
    a KV cache and ``mix_continued`` continues an op's own state.) A minimal complete mixer, y_t =
    W_o Σ x_s over the real s ≤ t (causal) or all real s (docs/guide.md, "Add a mixer", has a fuller
    one)::

        @dataclass
        class SumState(DecodingState):
            total: torch.Tensor | None = None  # (B, dim): the sum so far

        @register_mixer("prefix_sum", paper="-", time="O(N·d²)", memory="O(N·d)", state="a sum: O(d)")
        class PrefixSum(Mixer):
            def __init__(self, dim: int, *, causal: bool = False) -> None:
                super().__init__(dim, causal=causal)
                self.to_out = nn.Linear(dim, dim)

            def mix_sequence(self, x, attention_mask, packing=None):
                if packing is not None:  # each segment alone, as a batch of right-padded rows
                    return packed_call(self.mix_sequence, [(x, 1)], packing)
                if attention_mask is not None:  # padding selected away, not multiplied by 0
                    x = torch.where(attention_mask[..., None], x, torch.zeros((), dtype=x.dtype))
                sums = x.cumsum(1) if self.causal else x.sum(1, keepdim=True).expand_as(x)
                return self.to_out(sums)

            def new_state(self, batch_size, capacity):
                return SumState(batch_size=batch_size, capacity=capacity)

            def advance(self, x, state, chunk):
                if chunk.valid is not None:  # each row's real tokens come first, its padding last
                    x = torch.where(chunk.valid[..., None], x, torch.zeros((), dtype=x.dtype))
                sums = x.cumsum(1) if state.total is None else state.total[:, None] + x.cumsum(1)
                state.total = sums[:, -1]
                return self.to_out(sums)
    """

    mixer_name: str = ""

    def __init__(self, dim: int, *, causal: bool = False) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.causal = check_flag("causal", causal)

    def check_input(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate x: (B, N, dim) and the (B, N) padding mask; return x and the mask as bool (or None)."""
        check_float_tensor("x", x, "(B, N, dim)")
        if x.shape[-1] != self.dim:
            raise InvalidValueError(f"x must have shape (B, N, dim={self.dim}), got {tuple(x.shape)}")
        return x, check_attention_mask(attention_mask, x.shape[0], x.shape[1], x.device)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        *,
        packing: Packing | None = None,
        context: Split | None = None,
    ) -> torch.Tensor:
        """(B, N, dim) → (B, N, dim). ``attention_mask`` (B, N), True = real token. ``cu_seqlens``
        (S + 1,) with B = 1: the packed segments are independent sequences, each as if fed alone
        (docs/spec.md §8); ``packing``: its plan, made once by a backbone (``Packing.of``).
        ``context``: the sequence is split over a context-parallel group and x (B, n, dim) and the mask
        are this rank's share (``tokenmix.context.Split``, docs/spec.md §14); the output is this rank's
        share of the whole sequence's."""
        x, attention_mask = self.check_input(x, attention_mask)
        if context is not None:
            if cu_seqlens is not None or packing is not None:
                what = "cu_seqlens" if cu_seqlens is not None else "packing"
                raise InvalidValueError(f"{what} with context: packed rows are not split over ranks yet")
            context.check_local("x", x, 1)
            if context.order not in self.split_orders:
                raise InvalidValueError(
                    f"context is split in {context.order!r} order; {type(self).__name__} takes "
                    f"{' or '.join(map(repr, self.split_orders))} (docs/spec.md §14)"
                )
            return self.mix_split(x, attention_mask, context)
        if cu_seqlens is None and packing is None:
            return self.mix_sequence(x, attention_mask)
        # Planned once here (unless given); the family's layers read each position's place in its
        # segment from it, and its op takes the packed row whole in a kernel, or segment by segment.
        packing = packing_of(cu_seqlens, x.shape[0], x.shape[1], attention_mask, x.device, packing)
        return self.mix_sequence(x, None, packing)

    def mix_sequence(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None = None
    ) -> torch.Tensor:
        """The family's forward over a checked x (B, N, dim) and mask (B, N) or None; or (``packing``) a
        packed row (1, N, dim) whose segments are independent sequences (docs/spec.md §8)."""
        raise NotImplementedError

    # The orders of a split this family's ``mix_split`` takes: a window or a state passed from rank to
    # rank needs contiguous shares; an all-pairs form reads any (and is balanced by "zigzag" when causal).
    split_orders: tuple[str, ...] = ("contiguous",)

    def mix_split(self, x: torch.Tensor, attention_mask: torch.Tensor | None, split: Split) -> torch.Tensor:
        """The family's forward over this rank's share x (B, n, dim) of a sequence split over a
        context-parallel group (``tokenmix.context.ops``; positions are global: ``split.positions()``)."""
        raise UnavailableError(f"{type(self).__name__} has no context-parallel form yet")

    def check_step_input(
        self, x: torch.Tensor, state: object, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """Validate a step's input: one token (B, dim) or a chunk (B, T, dim), its mask ((B,) or (B, T)),
        and the state. Returns x as (B, T, dim), whether it was one token, and the mask as bool (B, T)."""
        if not self.causal:
            raise UnavailableError(
                f"{type(self).__name__} was built with causal=False; step decoding needs causal=True"
            )
        made_by = state.made_by if isinstance(state, DecodingState) else None
        if made_by is None:
            raise InvalidTypeError(
                f"state must be what {type(self).__name__}.init_state(batch_size) returned (or the state "
                f"the previous step returned), got {type(state).__name__}"
            )
        if made_by != (self.mixer_name or type(self).__name__):
            raise InvalidTypeError(
                f"state was made by a {made_by!r} mixer's init_state; this is a "
                f"{self.mixer_name or type(self).__name__!r} mixer"
            )
        state.check_current()
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            check_float_tensor("x", x, "(B, dim) or (B, T, dim)")
            raise InvalidValueError(f"x must have shape (B, dim) or (B, T, dim), got {tuple(x.shape)}")
        check_float_tensor("x", x, "(B, dim)" if x.dim() == 2 else "(B, T, dim)")
        if x.shape[-1] != self.dim:
            raise InvalidValueError(
                f"x must have shape (B, dim={self.dim}) or (B, T, dim={self.dim}), got {tuple(x.shape)}"
            )
        return as_chunk(x, attention_mask)

    def init_state(self, batch_size: int, capacity: int | None = None) -> DecodingState:
        """An empty decoding state for ``batch_size`` sequences. ``capacity``: the most positions
        (padding included) it will be fed, for a state whose tensors keep their shapes from step to step
        (``torch.compile`` then compiles a step once, not per token); None lets a KV cache grow."""
        if not self.causal:
            raise UnavailableError(
                f"{type(self).__name__} was built with causal=False; step decoding needs causal=True"
            )
        batch_size = check_positive_int("batch_size", batch_size)
        capacity = check_positive_int("capacity", capacity, allow_none=True)
        state = self.new_state(batch_size, capacity)
        state.made_by = self.mixer_name or type(self).__name__  # so a state of another mixer is refused
        return state

    @torch.no_grad()
    def state_bytes(self, seq_len: int, batch: int = 1) -> int:
        """Bytes of the decoding state after ``seq_len`` tokens of ``batch`` sequences: the memory a
        mixer carries from token to token (a KV cache grows with ``seq_len``, a recurrent state does
        not), the x-axis of the field's recall-against-state plots (Arora et al. 2023). Measured, not
        computed: the state is made and fed ``seq_len`` zeros in one chunk."""
        seq_len = check_positive_int("seq_len", seq_len)
        state = self.init_state(check_positive_int("batch", batch))
        weight = next(self.parameters(), None)
        like = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
        _, state = self.step(torch.zeros(batch, seq_len, self.dim, **like), state)
        return state.nbytes()

    def new_state(self, batch_size: int, capacity: int | None) -> DecodingState:
        """The family's empty state, a ``DecodingState`` with its own fields (see ``init_state``, which has
        checked both arguments)."""
        raise NotImplementedError

    def step(
        self, x: torch.Tensor, state: DecodingState, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DecodingState]:
        """Advance ``state`` by one token x (B, dim) → (B, dim), or by a chunk x (B, T, dim) → (B, T, dim)
        in one pass (docs/spec.md §7). ``attention_mask`` ((B,) or (B, T), True = real): a padded
        position leaves the state unchanged and its output is 0; positions count each row's real
        tokens. Gradients flow through the state across calls. The step takes ``state`` over: it is
        advanced in place and returned as a new state object, and the one given is stale from then on
        (stepping it again is refused; ``state.clone()`` first to branch)."""
        x, single, mask = self.check_step_input(x, state, attention_mask)
        given_at = state.fed
        state.feed(x.shape[0], x.shape[1])
        positions = state.next_positions(x.device)
        # An op's own state (FLASH's, AFT-local's) is advanced by an op that compacts the chunk and counts
        # its positions itself: done once, there. Any other state: here.
        by_op = state.counted_by_op
        chunk = (as_given if by_op else compact)(mask, x.shape[0], x.shape[1], x.device)
        y = chunk.scatter(self.advance(chunk.gather(x), state, chunk))
        if not by_op:
            state.positions = positions + chunk.counts
        return (y[:, 0] if single else y), state.successor(given_at)

    def advance(self, x: torch.Tensor, state: DecodingState, chunk: Compacted) -> torch.Tensor:
        """The causal outputs (B, T, dim) of a chunk whose real tokens come first in each row
        (``chunk.counts``, ``chunk.valid``), updating the family's fields of ``state`` with the real ones
        only. ``state.positions`` (B,): each row's first position in the chunk (``step`` has checked the
        batch and capacity, and advances the positions after). When the state is an op's own
        (``state.counted_by_op``), the chunk comes as it was given (``chunk.valid`` marks its real tokens
        anywhere in a row) and the op compacts it and counts the positions."""
        raise NotImplementedError
