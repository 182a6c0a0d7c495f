"""The base every mixer module derives from: input checks and the decoding contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError, UnavailableError
from ..functional._checks import check_attention_mask, check_flag, check_float_tensor, check_positive_int


def pick_options(arguments: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The named entries of a call's arguments (``locals()``): how a registered subclass, which lists
    every option in its own signature because the registry reads options from there, hands the shared
    ones to its base class."""
    return {name: arguments[name] for name in names}


class Mixer(nn.Module):
    """A token mixer: ``forward(x, attention_mask=None)`` maps (B, N, dim) to (B, N, dim).

    Causal mixers also decode: ``state = init_state(batch_size)``, then ``y_t, state = step(x_t, state)``
    with x_t: (B, dim); stepping through a sequence reproduces the causal forward. States are updated in
    place and returned.
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

    def check_step_input(self, x_t: torch.Tensor, state: Any) -> torch.Tensor:
        if not self.causal:
            raise UnavailableError(
                f"{type(self).__name__} was built with causal=False; step decoding needs causal=True"
            )
        if not callable(getattr(state, "nbytes", None)):  # every decoding state reports its size
            raise InvalidTypeError(
                f"state must be what {type(self).__name__}.init_state(batch_size) returned (or the state "
                f"the previous step returned), got {type(state).__name__}"
            )
        check_float_tensor("x_t", x_t, "(B, dim)")
        if x_t.shape[-1] != self.dim:
            raise InvalidValueError(f"x_t must have shape (B, dim={self.dim}), got {tuple(x_t.shape)}")
        return x_t

    def init_state(self, batch_size: int) -> Any:
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError
