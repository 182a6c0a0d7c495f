from __future__ import annotations

import pytest
import torch

import tokenmix
from tests.reference import relative_error
from tokenmix.functional import dynamic_conv, lightconv

from .conftest import TOLERANCE


def run(backend, op, x, weight, grad, **options):
    with tokenmix.use_backend(backend):
        out = op(x, weight, **options)
        return (out, *torch.autograd.grad(out, (x, weight), grad))


@pytest.mark.parametrize("op", [lightconv, dynamic_conv])
@pytest.mark.parametrize("kernel_size", [3, 4, 40])  # odd, even, longer than the sequence
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_convolutions_match_the_reference(device, op, kernel_size, causal, dtype):
    batch, seq_len, channels, heads = 2, 21, 12, 2  # N not a multiple of the block; head width 6
    generator = torch.Generator(device).manual_seed(kernel_size)
    x = torch.randn(batch, seq_len, channels, generator=generator, device=device).to(dtype).requires_grad_()
    shape = (batch, seq_len, heads, kernel_size) if op is dynamic_conv else (heads, kernel_size)
    weight = torch.randn(shape, generator=generator, device=device).to(dtype).requires_grad_()
    grad = torch.randn(batch, seq_len, channels, generator=generator, device=device).to(dtype)
    mask = torch.rand(batch, seq_len, generator=generator, device=device) > 0.3
    for softmax in (True, False) if kernel_size == 4 and dtype == torch.float32 else (True,):
        options = {"causal": causal, "attention_mask": mask, "weight_softmax": softmax}
        expected = run("reference", op, x, weight, grad, **options)
        got = run("triton", op, x, weight, grad, **options)
        for name, ours, want in zip(("out", "dx", "dweight"), got, expected, strict=True):
            assert ours.dtype == dtype and ours.shape == want.shape
            error = relative_error(ours.double(), want.double())
            assert error <= TOLERANCE[dtype], f"{name} (softmax={softmax}): relative error {error:.2e}"
