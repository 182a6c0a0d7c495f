"""The one decoding-state base: every recurrent op's state type (``AFTWindowState``, ``MixedChunkState``,
…) and every mixer's and model's ``init_state`` derive from it, so a mixer holds its op's state itself —
one object, positions counted once (docs/spec.md §7). What all of them hold and check lives here; each
op or family adds its own fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InvalidValueError


@dataclass(kw_only=True)
class DecodingState:
    """What every decoding state holds. The fields below are keyword-only, so an op's state type is built
    from its own fields in order (``ConvWindowState(inputs)``).

    Attributes:
        batch_size: the rows it was made for; a step of another batch size is refused (None: taken from
            the first tensor the state holds).
        capacity: the most positions it may be fed, padding included (None: unbounded); a fixed-size
            KV cache holds that many slots.
        fed: positions fed so far, padding included.
        positions: (B,) long, each row's count of real tokens so far (None until the first step). In an
            op's state (``counted_by_op``) the op counts them; in any other, ``Mixer.step`` does.
        made_by: the mixer (or model) whose ``init_state`` made it.
        stale_at: None while the state is current; once a step has advanced it (in place) and returned
            its successor, the position it was given at — and ``step``, ``clone`` and ``select`` refuse it.

    A step takes the state over: what it holds moves to the state the step returns, and the state given
    is stale from then on (docs/spec.md §7). To branch (sampling several continuations, beam search),
    ``clone()`` or ``select(indices)`` the state first.
    """

    batch_size: int | None = None
    capacity: int | None = None
    fed: int = 0
    positions: torch.Tensor | None = None
    made_by: Any = ""
    stale_at: int | None = None

    # True for the state of an op that takes a chunk with any padding mask and counts positions itself
    # (it moves each row's real tokens first, once): ``Mixer.step`` then neither compacts nor counts.
    counted_by_op: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.batch_size is None:
            held = [t for t in self.own_values() if isinstance(t, torch.Tensor)]
            if not held:
                raise InvalidValueError(f"{type(self).__name__} needs batch_size or a tensor to take it from")
            self.batch_size = held[0].shape[0]

    def own_values(self) -> list[Any]:
        """What this type adds to the base, field by field (tensors, nested states, buffers, None)."""
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _BASE_FIELDS]

    @property
    def empty(self) -> bool:
        """Nothing fed yet: no tensor of its own is made (a mixer's ``new_state`` makes them lazily)."""
        return all(value is None for value in self.own_values())

    def take(self, final: DecodingState) -> None:
        """Hold what ``final`` (a state of this type, what this state's op returned) holds: its own fields,
        and its positions where the op counts them; the bookkeeping (batch, capacity, fed, made_by)
        stays."""
        if type(final) is not type(self):
            raise TypeError(f"a {type(self).__name__} cannot take a {type(final).__name__}")
        names = [f.name for f in dataclasses.fields(self) if f.name not in _BASE_FIELDS]
        for name in names + (["positions"] if self.counted_by_op else []):
            setattr(self, name, getattr(final, name))

    def check_current(self) -> None:
        """Refuse a state that a step has already advanced (reusing it would continue from after that
        step, silently: not from where the caller thinks)."""
        if self.stale_at is not None:
            raise InvalidValueError(
                f"state is stale: a step already advanced it from position {self.stale_at} and returned the "
                f"state to continue from; step from that one, or clone() a state before stepping it to "
                f"branch"
            )

    def successor(self, given_at: int) -> DecodingState:
        """Move what this state holds to a new state object (what ``step`` returns) and mark this one
        stale, given to a step at position ``given_at``."""
        fresh = dataclasses.replace(self)
        for field in dataclasses.fields(self):
            if isinstance(getattr(self, field.name), list):  # a stack's layers: its own list
                setattr(fresh, field.name, list(getattr(self, field.name)))
        self.stale_at = given_at
        return fresh

    def clone(self) -> DecodingState:
        """A copy that steps independently of this state (tensors cloned; gradients flow through it)."""
        self.check_current()
        return _mapped(self, torch.Tensor.clone, self.batch_size)

    def select(self, indices: torch.Tensor | Sequence[int]) -> DecodingState:
        """The rows ``indices`` ((B',) integers in [0, batch_size), repeats allowed) as a new state of
        batch size B': beam search's reordering. This state is left as it is."""
        self.check_current()
        index = torch.as_tensor(indices)
        if index.dim() != 1 or index.dtype in (torch.bool, *_FLOATS) or index.numel() == 0:
            raise InvalidValueError(
                f"indices must be a non-empty 1-D integer tensor or list, got {_describe(indices)}"
            )
        if int(index.min()) < 0 or int(index.max()) >= self.batch_size:
            raise InvalidValueError(
                f"indices must lie in [0, batch_size={self.batch_size}), got {index.tolist()[:8]}"
            )
        index = index.long()
        return _mapped(self, lambda t: t.index_select(0, index.to(t.device)), len(index))

    def feed(self, batch: int, arriving: int) -> None:
        """Check a step of ``arriving`` positions for ``batch`` rows against the state, and count them."""
        if batch != self.batch_size:
            raise InvalidValueError(
                f"state was made for batch_size={self.batch_size}, got a batch of {batch}"
            )
        if self.capacity is not None and self.fed + arriving > self.capacity:
            raise InvalidValueError(
                f"the state holds capacity={self.capacity} positions; {self.fed + arriving} were fed "
                f"(make the state with a larger capacity)"
            )
        self.fed += arriving

    def next_positions(self, device: torch.device) -> torch.Tensor:
        """(B,) each row's next position (its count of real tokens so far)."""
        if self.positions is None:
            self.positions = torch.zeros(self.batch_size, dtype=torch.long, device=device)
        return self.positions

    def nbytes(self) -> int:
        """Bytes of the state's floating-point content (keys, values, sums, windows), its integer and
        bool bookkeeping (positions, masks) aside."""
        return _float_bytes(self.own_values())


_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(DecodingState))
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BOOKKEEPING = ("batch_size", "capacity", "fed", "made_by", "stale_at")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _mapped(value: Any, function: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> Any:
    """``value`` with ``function`` applied to every tensor it holds (batch first, all of them), nested
    states and buffers included, each rebuilt for ``batch_size`` rows."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, DecodingState):
        changed = {
            field.name: _mapped(getattr(value, field.name), function, batch_size)
            for field in dataclasses.fields(value)
            if field.name not in _BOOKKEEPING
        }
        return dataclasses.replace(value, batch_size=batch_size, **changed)
    if hasattr(value, "mapped"):  # a buffer (KVCache) rebuilds itself
        return value.mapped(lambda t: _mapped(t, function, batch_size), batch_size)
    if isinstance(value, tuple):
        items = [_mapped(item, function, batch_size) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_mapped(item, function, batch_size) for item in value]
    return value


def _float_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() if value.is_floating_point() else 0
    if isinstance(value, (tuple, list)):  # named tuples included
        return sum(_float_bytes(item) for item in value)
    nbytes = getattr(value, "nbytes", None)
    return nbytes() if callable(nbytes) else 0
