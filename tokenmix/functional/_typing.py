"""How type checkers see the recurrent ops: one overloaded call signature for all of them, instead of two
overloads written out beside each op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

import torch

State = TypeVar("State", covariant=True)


class RecurrentOp(Protocol, Generic[State]):
    """An op that returns its output, or with ``output_final_state=True`` (output, final state), the
    state one type per op (its ``state_type``)."""

    state_type: type

    @overload
    def __call__(
        self, *args: Any, output_final_state: Literal[False] = False, **options: Any
    ) -> torch.Tensor: ...

    @overload
    def __call__(
        self, *args: Any, output_final_state: Literal[True], **options: Any
    ) -> tuple[torch.Tensor, State]: ...


def recurrent_op(state: type[State]) -> Callable[[Callable[..., Any]], RecurrentOp[State]]:
    """Mark an op as recurrent with final states of type ``state`` (its ``state_type``), typed as
    ``RecurrentOp[state]``; at run time the op is returned as it is."""

    def mark(op: Callable[..., Any]) -> RecurrentOp[State]:
        op.state_type = state  # type: ignore[attr-defined]
        return op  # type: ignore[return-value]

    return mark
