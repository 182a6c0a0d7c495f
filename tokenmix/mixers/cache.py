"""A key/value cache for decoding, growing by doubling so appending t tokens costs O(t) copies."""

from __future__ import annotations

import torch

from ..errors import InvalidValueError


class KVCache:
    """Keys (B, H, t, Dk) and values (B, H, t, Dv) seen so far, which of them are real tokens (B, t), and
    each row's next position (its count of real tokens). ``append`` returns all three up to now."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.length = 0
        self.positions: torch.Tensor | None = None  # (B,) long, set on first use (device)
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._real: torch.Tensor | None = None

    def check_batch(self, batch: int) -> None:
        if batch != self.batch_size:
            raise InvalidValueError(
                f"state was made for batch_size={self.batch_size}, got a batch of {batch}"
            )

    def next_positions(self, device: torch.device) -> torch.Tensor:
        if self.positions is None:
            self.positions = torch.zeros(self.batch_size, dtype=torch.long, device=device)
        return self.positions

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add (B, H, n, D) keys and values (``valid`` (B, n): which are real; None = all); return the
        whole cache so far and its real-key mask (None while every key is real)."""
        self.check_batch(keys.shape[0])
        new_length = self.length + keys.shape[-2]
        if valid is not None and self._real is None:  # the first padding: what came before was real
            self._real = torch.ones(self.batch_size, self.length, dtype=torch.bool, device=keys.device)
        if self._real is not None:
            fresh = torch.ones_like(keys[:, 0, :, 0], dtype=torch.bool) if valid is None else valid
            self._real = torch.cat((self._real[:, : self.length], fresh), dim=1)
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            # Out of place, so that autograd follows the keys across chunked calls (a write into the
            # buffer would change tensors that earlier chunks saved for their backward).
            previous = (
                (self._keys, self._values)
                if self._keys is not None
                else (keys[..., :0, :], values[..., :0, :])
            )
            self._keys = torch.cat((previous[0][..., : self.length, :], keys), dim=-2)
            self._values = torch.cat((previous[1][..., : self.length, :], values), dim=-2)
        else:
            if self._keys is None or new_length > self._keys.shape[-2]:
                capacity = max(16, 2 * new_length)
                self._keys = self._grow(self._keys, keys, capacity)
                self._values = self._grow(self._values, values, capacity)
            self._keys[..., self.length : new_length, :] = keys
            self._values[..., self.length : new_length, :] = values
        self.length = new_length
        real = None if self._real is None else self._real[:, :new_length]
        return self._keys[..., :new_length, :], self._values[..., :new_length, :], real

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
