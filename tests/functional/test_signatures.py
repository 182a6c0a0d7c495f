"""What the ops' signatures promise type checkers: a flag-dependent return is spelled by overloads
(``output_final_state`` False → the output, True → (output, the op's state type), one ``RecurrentOp``
protocol for every recurrent op), and every packed op takes ``cu_seqlens`` (a tensor) or ``packing`` (its
plan), each of one type, the op's body declaring ``packing`` only when its kernel reads the plan."""

from __future__ import annotations

import inspect
import typing

import pytest

import tokenmix.functional as F
from tests.functional.ops import OPS, PACKED

STATES = {name: case.state for name, case in OPS.items() if case.state is not None}


@pytest.mark.parametrize("name", list(STATES))
def test_a_recurrent_op_is_typed_by_its_state(name):
    """Each recurrent op is a ``RecurrentOp[its state]``, whose call is overloaded on the flag."""
    op = getattr(F, name)
    assert op.state_type is STATES[name] is getattr(F, STATES[name].__name__)  # public where the op is


def test_the_recurrent_call_overloads_its_return_on_output_final_state():
    from tokenmix.functional._typing import RecurrentOp

    # A protocol's overloads have no implementation to look them up by: read the registry.
    overloads = typing._overload_registry[RecurrentOp.__module__][f"{RecurrentOp.__name__}.__call__"]
    returns = {
        str(inspect.signature(o).parameters["output_final_state"].annotation): o.__annotations__["return"]
        for o in overloads.values()
    }
    assert returns == {"Literal[False]": "torch.Tensor", "Literal[True]": "tuple[torch.Tensor, State]"}


@pytest.mark.parametrize("name", PACKED)
def test_every_packed_op_takes_cu_seqlens_or_its_plan_each_of_one_type(name):
    op = getattr(F, name)
    parameters = inspect.signature(op).parameters
    assert parameters["cu_seqlens"].annotation == "torch.Tensor | None"
    assert parameters["packing"].annotation == "Packing | None"
    body = inspect.signature(op.__wrapped__).parameters
    assert "cu_seqlens" not in body  # the dispatch reads it; a body never sees a tensor change type
    assert ("packing" in body) == OPS[name].kernel, "the plan reaches the op only where its kernel reads it"
