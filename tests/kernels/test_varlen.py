"""Packed segments (cu_seqlens) through the kernels: under forced ``triton`` each segment's outputs and
every gradient equal the reference path on that segment alone (float32; the interpreter on the CPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

import tokenmix
from tests.functional.test_varlen import CU_SEQLENS, case, segment
from tests.reference import assert_close

KERNEL_OPS = [
    "pointwise_attention",
    "mixed_chunk_attention",
    "aft_full",
    "aft_simple",
    "aft_local",
    "aft_conv",
    "lightconv",
    "dynamic_conv",
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_packed_kernels_equal_the_reference_per_segment(device, name, causal):
    generator = torch.Generator().manual_seed(KERNEL_OPS.index(name) + 7 * causal)
    op, sequences, parameters = case(name, causal, generator)
    sequences = [(t.float().to(device), d) for t, d in sequences]
    leaves = [t.requires_grad_() for t, _ in sequences] + [
        p.float().to(device).requires_grad_() for p in parameters
    ]
    inputs, weights = leaves[: len(sequences)], leaves[len(sequences) :]
    with tokenmix.use_backend("triton"):
        packed = op(*inputs, *weights, cu_seqlens=torch.tensor(CU_SEQLENS, device=device))
    out_dim = sequences[0][1]
    grad = torch.randn(packed.shape, generator=generator).to(device)
    got = torch.autograd.grad(packed, leaves, grad)
    expected = [torch.zeros_like(leaf) for leaf in leaves]
    with tokenmix.use_backend("reference"):
        for start, end in itertools.pairwise(CU_SEQLENS):
            if start == end:
                continue
            alone = op(
                *(segment(t, d, start, end) for t, (_, d) in zip(inputs, sequences, strict=True)), *weights
            )
            assert_close(segment(packed, out_dim, start, end), alone, 1e-5, what=f"{name} [{start}, {end})")
            parts = torch.autograd.grad(alone, leaves, segment(grad, out_dim, start, end), allow_unused=True)
            expected = [e if p is None else e + p for e, p in zip(expected, parts, strict=True)]
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(g, e, 1e-4, what=f"{name} gradient of input {index}")


@pytest.fixture
def launches(monkeypatch):
    """The segment ids (or None) of every convolution kernel call the test makes."""
    from tokenmix.kernels import conv

    seen = []
    forward = conv.depthwise_conv_fwd

    def counted(*args):
        seen.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(conv, "depthwise_conv_fwd", counted)
    return seen


@pytest.mark.parametrize("name", ["lightconv", "dynamic_conv"])
def test_packed_convolutions_take_every_segment_in_one_launch(device, name, launches):
    """The convolution kernel reads each position's segment (no tap crosses a boundary), so segments of
    any lengths share one launch, forward and backward, instead of one per group of similar lengths."""
    generator = torch.Generator().manual_seed(3)
    op, sequences, parameters = case(name, True, generator)
    inputs = [t.float().to(device) for t, _ in sequences] + [p.float().to(device) for p in parameters]
    with tokenmix.use_backend("triton"):
        op(*inputs, cu_seqlens=torch.tensor(CU_SEQLENS, device=device))
    assert len(launches) == 1 and launches[0] is not None  # the segment ids


@pytest.mark.parametrize("name", ["lightconv", "dynamic_conv"])
def test_packed_convolution_mixers_run_one_launch_equal_to_each_segment_alone(device, name, launches):
    """The mixers hand the whole packed row to the kernel (their projections are per position)."""
    torch.manual_seed(5)
    mixer = tokenmix.create_mixer(name, 16, causal=True, heads=4, kernel_size=3).to(device)
    x = torch.randn(1, CU_SEQLENS[-1], 16, device=device, requires_grad=True)
    with tokenmix.use_backend("triton"):
        packed = mixer(x, cu_seqlens=torch.tensor(CU_SEQLENS, device=device))
    assert len(launches) == 1 and launches[0] is not None
    grad = torch.randn_like(packed)
    (got,) = torch.autograd.grad(packed, x, grad)
    with tokenmix.use_backend("reference"):
        for start, end in itertools.pairwise(CU_SEQLENS):
            if start == end:
                continue
            alone = mixer(x[:, start:end])
            assert_close(packed[:, start:end], alone, 1e-5, what=f"{name} [{start}, {end})")
            (expected,) = torch.autograd.grad(alone, x, grad[:, start:end])
            assert_close(got[:, start:end], expected[:, start:end], 1e-4, what=f"{name} dx [{start}, {end})")
