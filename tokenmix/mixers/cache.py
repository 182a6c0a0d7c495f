"""A key/value cache for decoding, growing by doubling so appending t tokens costs O(t) copies."""

from __future__ import annotations

import torch

from ..errors import InvalidValueError


class KVCache:
    """Keys (B, H, t, Dk) and values (B, H, t, Dv) seen so far; ``append`` returns both up to now."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, H, n, D) keys and values; return the whole cache so far."""
        if keys.shape[0] != self.batch_size:
            raise InvalidValueError(
                f"state was made for batch_size={self.batch_size}, got a batch of {keys.shape[0]}"
            )
        new_length = self.length + keys.shape[-2]
        if self._keys is None or new_length > self._keys.shape[-2]:
            capacity = max(16, 2 * new_length)
            self._keys = self._grow(self._keys, keys, capacity)
            self._values = self._grow(self._values, values, capacity)
        self._keys[..., self.length : new_length, :] = keys
        self._values[..., self.length : new_length, :] = values
        self.length = new_length
        return self._keys[..., :new_length, :], self._values[..., :new_length, :]

    def _grow(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
        if old is not None:
            buffer[..., : self.length, :] = old[..., : self.length, :]
        return buffer

    def nbytes(self) -> int:
        """Bytes the cached keys and values hold (the part in use)."""
        if self._keys is None:
            return 0
        return sum(t[..., : self.length, :].numel() * t.element_size() for t in (self._keys, self._values))
