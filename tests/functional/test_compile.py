"""``torch.compile(fullgraph=True)`` traces every op's reference path in one graph, causal and
bidirectional, with and without a padding mask, forward and backward, and equals eager — AFT's exact
recomputation of underflowed denominators included (one opaque custom op under compile: no
data-dependent shapes, no host sync). One graph also means a plain ``torch.compile`` (as ``tokenmix train
--compile`` calls it) runs without graph breaks."""

from __future__ import annotations

import pytest
import torch

import tokenmix
from tests.functional.ops import OPS as TABLE

B, N = 2, 9
OPS = list(TABLE)


def _tensors(name: str, generator: torch.Generator, scale: float = 1.0) -> tuple[list[torch.Tensor], int]:
    """The op's inputs from its entry in tests/functional/ops.py, B rows of N positions, all leaves; and
    the dim N is at."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * scale

    sequences, parameters = TABLE[name].inputs(randn, B, N)
    leaves = [t.requires_grad_() for t, _ in sequences] + [p.requires_grad_() for p in parameters]
    return leaves, sequences[0][1]


def _check_compiled_equals_eager(op, tensors, options):
    compiled = torch.compile(op, backend="aot_eager", dynamic=False, fullgraph=True)
    results = []
    for run in (op, compiled):
        out = run(*tensors, **options)
        results.append((out, *torch.autograd.grad(out, tensors, torch.ones_like(out))))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", OPS)
def test_every_op_compiles_in_one_graph(name, causal, masked):
    case = TABLE[name]
    if causal and not case.causal:
        pytest.skip(f"{name} has no causal form")
    generator = torch.Generator().manual_seed(OPS.index(name))
    tensors, dim = _tensors(name, generator)
    mask = torch.rand(B, *tensors[0].shape[dim : dim + case.position_dims], generator=generator) > 0.3
    mask.view(B, -1)[:, -1] = True
    options = {**case.options, "causal": causal, "attention_mask": mask if masked else None}
    torch._dynamo.reset()
    with tokenmix.use_backend("reference"):
        _check_compiled_equals_eager(case.op, tensors, options)


@pytest.mark.parametrize("name", [name for name in OPS if name.startswith("aft_")])
def test_aft_recomputes_underflowed_entries_in_one_graph(name, monkeypatch):
    """Keys and biases in the hundreds: some denominators underflow and are recomputed exactly, by the
    custom op (counted), forward and backward, equal to eager."""
    from tokenmix.functional.aft import exact as _aft_exact

    calls = []
    recompute = _aft_exact.exact
    # exact(keys, values, bias, causal, flagged, row_offset): count the flagged entries of each call
    monkeypatch.setattr(_aft_exact, "exact", lambda *a: calls.append(a[4].sum()) or recompute(*a))
    generator = torch.Generator().manual_seed(7)
    case = TABLE[name]
    torch._dynamo.reset()
    with tokenmix.use_backend("reference"):
        options = {**case.options, "causal": case.causal}
        _check_compiled_equals_eager(case.op, _tensors(name, generator, scale=300.0)[0], options)
    assert calls and all(count > 0 for count in calls)  # eager and compiled, forward and replayed backward
