"""A plain ``torch.compile`` (graph breaks allowed, as ``tokenmix train --compile`` and most users call it)
runs every op's reference path and equals eager, forward and backward — AFT's recomputation of
underflowed denominators included (a data-dependent step that must not make compilation fail)."""

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
        "lightconv": (F.lightconv, lambda: (r(B, N, D), r(2, 3)), {}),
        "dynamic_conv": (F.dynamic_conv, lambda: (r(B, N, D), r(B, N, 2, 3)), {}),
    }  # fmt: skip


OPS = list(_cases(torch.Generator()))


def _check_compiled_equals_eager(op, tensors, options):
    compiled = torch.compile(op, backend="aot_eager", dynamic=False)
    results = []
    for run in (op, compiled):
        out = run(*tensors, **options)
        results.append((out, *torch.autograd.grad(out, tensors, torch.ones_like(out))))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("name", OPS)
def test_every_op_compiles(name):
    generator = torch.Generator().manual_seed(OPS.index(name))
    op, make, options = _cases(generator)[name]
    mask = torch.rand(B, N, generator=generator) > 0.3
    mask[:, -1] = True
    torch._dynamo.reset()
    with tokenmix.use_backend("reference"):
        _check_compiled_equals_eager(op, make(), {**options, "causal": True, "attention_mask": mask})


@pytest.mark.parametrize("name", ["aft_full", "aft_simple", "aft_local", "aft_conv"])
def test_aft_recomputes_underflowed_entries_under_compile(name):
    """Keys and biases in the hundreds: some denominators underflow and are recomputed exactly."""
    generator = torch.Generator().manual_seed(7)
    op, make, options = _cases(generator, scale=300.0)[name]
    torch._dynamo.reset()
    with tokenmix.use_backend("reference"):
        _check_compiled_equals_eager(op, make(), {**options, "causal": True})
