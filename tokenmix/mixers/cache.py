"""A key/value cache for decoding: growing by doubling (appending t tokens costs O(t) copies), or of a
fixed capacity whose tensors keep their shapes from step to step, so a compiled step is not recompiled
for every token."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.checks import check_positive_int
from .state import DecodingState


class KVCache:
    """Keys (B, H, t, Dk) and values (B, H, t, Dv) seen so far and which of them are real tokens (B, t);
    ``append`` returns all three up to now. A buffer held by a decoding state, which checks the batch
    size and capacity (``DecodingState.feed``) before anything is appended.

    With a ``capacity`` C the cache is C slots from the start, written in order; appending one token
    returns all C slots, the unwritten ones marked as padding, so a single-token step sees tensors of the
    same shapes every time (a compiled step is not recompiled). A chunk gets the t slots written so far
    (its causal offsets aligned to their end)."""

    def __init__(self, batch_size: int, capacity: int | None = None) -> None:
        self.batch_size = batch_size
        self.capacity = check_positive_int("capacity", capacity, allow_none=True)
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._real: torch.Tensor | None = None

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add (B, H, n, D) keys and values (``valid`` (B, n): which are real; None = all); return the
        whole cache so far and its real-key mask (None while every key is real)."""
        new_length = self.length + keys.shape[-2]
        if self.capacity is not None:
            return self._append_fixed(keys, values, valid, new_length)
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

    def _append_fixed(self, keys, values, valid, new_length: int):
        if self._keys is None:
            self._keys = keys.new_zeros(*keys.shape[:-2], self.capacity, keys.shape[-1])
            self._values = values.new_zeros(*values.shape[:-2], self.capacity, values.shape[-1])
            self._real = torch.zeros(self.batch_size, self.capacity, dtype=torch.bool, device=keys.device)
        fresh = torch.ones_like(keys[:, 0, :, 0], dtype=torch.bool) if valid is None else valid
        start = self.length
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            # Out of place, so that autograd follows the keys across chunked calls.
            self._keys = self._keys.to(keys.dtype).slice_scatter(keys, -2, start, new_length)
            self._values = self._values.to(values.dtype).slice_scatter(values, -2, start, new_length)
            self._real = self._real.slice_scatter(fresh, 1, start, new_length)  # (earlier ones saved it)
        else:
            self._keys[..., start:new_length, :] = keys
            self._values[..., start:new_length, :] = values
            self._real[:, start:new_length] = fresh
        self.length = new_length
        if keys.shape[-2] == 1:  # every slot, the unwritten ones as padding: shapes that never change
            return self._keys, self._values, self._real
        # A chunk's causal offsets are aligned to the end of what is written so far.
        return self._keys[..., :new_length, :], self._values[..., :new_length, :], self._real[:, :new_length]

    def _grow(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
        if old is not None:
            buffer[..., : self.length, :] = old[..., : self.length, :]
        return buffer

    def mapped(self, function: Callable[[Any], Any], batch_size: int) -> KVCache:
        """A new cache of ``batch_size`` rows holding ``function`` of each buffer (a copy, a row
        selection: ``DecodingState.clone`` / ``select``)."""
        cache = KVCache(batch_size, self.capacity)
        cache.length = self.length
        cache._keys, cache._values, cache._real = (
            None if t is None else function(t) for t in (self._keys, self._values, self._real)
        )
        return cache

    def nbytes(self) -> int:
        """Bytes the cached keys and values hold (the part in use; all of it with a capacity)."""
        if self._keys is None:
            return 0
        if self.capacity is not None:
            return sum(t.numel() * t.element_size() for t in (self._keys, self._values))
        return sum(t[..., : self.length, :].numel() * t.element_size() for t in (self._keys, self._values))


@dataclass
class CacheState(DecodingState):
    """The decoding state of the attention mixers (softmax, pointwise, GAU): a ``KVCache``."""

    cache: KVCache | None = None

    def attend(
        self, mixer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """A chunk's attention (``valid``: its real tokens) after appending its keys and values: the
        first chunk of a growing cache is the mixer's causal forward (``mixer.mix``; its padding comes
        last), later ones attend to the cache (``mixer.mix_cached``)."""
        empty = self.cache.length == 0 and self.capacity is None
        keys, values, real = self.cache.append(k, v, valid)
        return mixer.mix(q, k, v, valid) if empty else mixer.mix_cached(q, keys, values, real)
