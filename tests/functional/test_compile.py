"""``torch.compile(fullgraph=True)`` traces every op's reference path in one graph, causal and
bidirectional, with and without a padding mask, forward and backward, and equals eager — AFT's exact
recomputation of underflowed denominators included (one opaque custom op under compile: no
data-dependent shapes, no host sync). One graph also means a plain ``torch.compile`` (as ``tokenmix train
--compile`` calls it) runs without graph breaks."""

from __future__ import annotations

import pytest
import torch

import tokenmix
from tokenmix import functional as F

B, N, D = 2, 9, 6


def _cases(generator: torch.Generator, scale: float = 1.0) -> dict:
    def r(*shape):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    def heads():
        return r(B, 2, N, 3)

    return {
        "softmax_attention": (F.softmax_attention, lambda: (heads(), heads(), heads()), {}),
        "pointwise_attention": (F.pointwise_attention, lambda: (heads(), heads(), heads()), {}),
        "mixed_chunk_attention": (F.mixed_chunk_attention, lambda: tuple(r(B, N, D) for _ in range(5)),
                                  {"chunk_size": 4}),
        "aft_full": (F.aft_full, lambda: (r(B, N, D), r(B, N, D), r(B, N, D), r(N, N)), {}),
        "aft_simple": (F.aft_simple, lambda: (r(B, N, D), r(B, N, D), r(B, N, D)), {}),
        "aft_local": (F.aft_local, lambda: (r(B, N, D), r(B, N, D), r(B, N, D), r(N, N)), {"window": 3}),
        "aft_local_lowrank": (F.aft_local_lowrank,
                              lambda: (r(B, N, D), r(B, N, D), r(B, N, D), r(N, 4), r(N, 4)), {"window": 3}),
        "aft_conv": (F.aft_conv, lambda: (r(B, N, 2, 3), r(B, N, 2), r(B, N, 2, 3), r(2, 3)), {}),
        "aft_conv_2d": (F.aft_conv, lambda: (r(B, 3, 3, 2, 3), r(B, 3, 3, 2), r(B, 3, 3, 2, 3), r(2, 3, 3)),
                        {}),
        "lightconv": (F.lightconv, lambda: (r(B, N, D), r(2, 3)), {}),
        "dynamic_conv": (F.dynamic_conv, lambda: (r(B, N, D), r(B, N, 2, 3)), {}),
    }  # fmt: skip


OPS = list(_cases(torch.Generator()))


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
    if name == "aft_conv_2d" and causal:
        pytest.skip("a 2-D grid is bidirectional only")
    generator = torch.Generator().manual_seed(OPS.index(name))
    op, make, options = _cases(generator)[name]
    tensors = make()
    mask = torch.rand(tensors[0].shape[:-2] if name == "aft_conv_2d" else (B, N), generator=generator) > 0.3
    mask.view(B, -1)[:, -1] = True
    options = {**options, "causal": causal, "attention_mask": mask if masked else None}
    torch._dynamo.reset()
    with tokenmix.use_backend("reference"):
        _check_compiled_equals_eager(op, tensors, options)


@pytest.mark.parametrize(
    "name", ["aft_full", "aft_simple", "aft_local", "aft_local_lowrank", "aft_conv", "aft_conv_2d"]
)
def test_aft_recomputes_underflowed_entries_in_one_graph(name, monkeypatch):
    """Keys and biases in the hundreds: some denominators underflow and are recomputed exactly, by the
    custom op (counted), forward and backward, equal to eager."""
    from tokenmix.functional.aft import exact as _aft_exact

    calls = []
    recompute = _aft_exact.exact
    monkeypatch.setattr(_aft_exact, "exact", lambda *a: calls.append(a[-1].sum()) or recompute(*a))
    generator = torch.Generator().manual_seed(7)
    op, make, options = _cases(generator, scale=300.0)[name]
    torch._dynamo.reset()
    with tokenmix.use_backend("reference"):
        _check_compiled_equals_eager(op, make(), {**options, "causal": name != "aft_conv_2d"})
    assert calls and all(count > 0 for count in calls)  # eager and compiled, forward and replayed backward
