"""docs/spec.md §8 for every registered mixer and the models: packed segments (cu_seqlens, B = 1) equal
each segment fed alone — outputs and every gradient (inputs and parameters), float64, causal and
bidirectional, with one-token and empty segments."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.functional.test_varlen import CU_SEQLENS, N
from tests.mixers.options import SMALL_OPTIONS
from tests.reference import assert_close
from tokenmix import create_mixer, list_mixers


def check_packed(module, x, tol=1e-10, grad_dim=1):
    """module(x, cu_seqlens=…) against module(x's segment) for each segment, outputs and gradients."""
    leaf = x.clone().requires_grad_()
    parameters = [p for p in module.parameters() if p.requires_grad]
    packed = module(leaf, cu_seqlens=torch.tensor(CU_SEQLENS))
    grad = torch.randn(packed.shape, dtype=packed.dtype)
    got = torch.autograd.grad(packed, [leaf, *parameters], grad)
    expected_input = torch.zeros_like(x)
    expected_parameters = [torch.zeros_like(p) for p in parameters]
    for start, end in itertools.pairwise(CU_SEQLENS):
        if start == end:
            continue
        own = x[:, start:end].clone().requires_grad_()
        alone = module(own)
        assert_close(packed[:, start:end], alone, tol, what=f"[{start}, {end})")
        parts = torch.autograd.grad(alone, [own, *parameters], grad[:, start:end], allow_unused=True)
        expected_input[:, start:end] = parts[0]
        expected_parameters = [
            e if p is None else e + p for e, p in zip(expected_parameters, parts[1:], strict=True)
        ]
    assert_close(got[0], expected_input, 10 * tol, what="input gradient")
    for index, (g, e) in enumerate(zip(got[1:], expected_parameters, strict=True)):
        # floor: a gradient that is zero in exact arithmetic (a bias that shifts every key alike) is noise
        assert_close(g, e, 10 * tol, floor=1e-4, what=f"gradient of parameter {index}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_packs_segments(name, causal):
    torch.manual_seed(list_mixers().index(name))
    mixer = create_mixer(name, 16, causal=causal, **SMALL_OPTIONS.get(name, {})).double().eval()
    with torch.no_grad():  # off the init (AFT-conv's γ = β = 0 would hide its kernel)
        for parameter in mixer.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    check_packed(mixer, torch.randn(1, N, 16, dtype=torch.float64))


@pytest.mark.parametrize("name", list_mixers())
def test_a_mixer_takes_the_plan_made_once(name):
    """``packing=`` (what a backbone hands its layers) is the same call as ``cu_seqlens=``."""
    from tokenmix.core.packing import Packing

    torch.manual_seed(list_mixers().index(name))
    mixer = create_mixer(name, 16, causal=True, **SMALL_OPTIONS.get(name, {})).double().eval()
    x, cu_seqlens = torch.randn(1, N, 16, dtype=torch.float64), torch.tensor(CU_SEQLENS)
    expected = mixer(x, cu_seqlens=cu_seqlens)
    assert torch.equal(mixer(x, packing=Packing.of(cu_seqlens)), expected)
    with pytest.raises(ValueError, match="cu_seqlens and packing together"):
        mixer(x, cu_seqlens=cu_seqlens, packing=Packing.of(cu_seqlens))
