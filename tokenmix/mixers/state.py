"""The decoding state every mixer's (and model's) ``init_state`` returns: what all of them hold and check,
once, in ``Mixer.step`` (docs/spec.md §7); each family adds its own fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidValueError
from ..functional._checks import check_attention_mask


@dataclass
class DecodingState:
    """What every decoding state holds.

    Attributes:
        batch_size: the rows it was made for; a step of another batch size is refused.
        capacity: the most positions it may be fed, padding included (None: unbounded); a fixed-size
            KV cache holds that many slots.
        fed: positions fed so far, padding included.
        positions: (B,) long, each row's count of real tokens so far (None until the first step).
        made_by: the mixer (or model) whose ``init_state`` made it.
    """

    batch_size: int
    capacity: int | None = None
    fed: int = 0
    positions: torch.Tensor | None = None
    made_by: Any = ""

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
        base = {field.name for field in dataclasses.fields(DecodingState)}
        own = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base]
        return _float_bytes(own)


def as_chunk(
    x: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """A step's input as a chunk: one token (B, ·) becomes (B, 1, ·), its mask (B,) becomes (B, 1).
    Returns the chunk, whether it was one token, and the checked mask as bool (B, T) or None."""
    single = x.dim() == 2
    if single:
        x = x[:, None]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
            attention_mask = attention_mask[:, None]
    return x, single, check_attention_mask(attention_mask, x.shape[0], x.shape[1], x.device)


def _float_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() if value.is_floating_point() else 0
    if isinstance(value, (tuple, list)):  # named tuples included
        return sum(_float_bytes(item) for item in value)
    nbytes = getattr(value, "nbytes", None)
    return nbytes() if callable(nbytes) else 0
