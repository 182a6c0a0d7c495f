from __future__ import annotations

import pytest
import torch

import tokenmix
from tokenmix.functional import ACTIVATIONS, pointwise_attention

from ..reference import relative_error
from .conftest import TOLERANCE


def run(backend: str, q, k, v, grad, **options):
    with tokenmix.use_backend(backend):
        out = pointwise_attention(q, k, v, **options)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))


def inputs(device, dtype, batch=2, heads=2, seq_len=37, dim_k=24, dim_v=40, seed=0):
    """Odd shapes: N not a multiple of the block, head dims not powers of two."""
    generator = torch.Generator(device).manual_seed(seed)
    shapes = ((batch, heads, seq_len, dim_k),) * 2 + ((batch, heads, seq_len, dim_v),)
    tensors = [torch.randn(s, generator=generator, device=device).to(dtype).requires_grad_() for s in shapes]
    grad = torch.randn(batch, heads, seq_len, dim_v, generator=generator, device=device).to(dtype)
    mask = torch.rand(batch, seq_len, generator=generator, device=device) > 0.3
    mask[:, 0] = False  # a padded first key: causal row 0 then sees no key at all
    return tensors, grad, mask


def assert_kernel_matches(device, dtype, **options):
    (q, k, v), grad, mask = inputs(device, dtype)
    if options.pop("masked", False):
        options["attention_mask"] = mask
    reference = run("reference", q, k, v, grad, **options)
    kernel = run("triton", q, k, v, grad, **options)
    for name, ours, expected in zip(("out", "dq", "dk", "dv"), kernel, reference, strict=True):
        assert ours.dtype == dtype and ours.shape == expected.shape
        error = relative_error(ours.double(), expected.double())
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("causal", [False, True])
def test_every_activation_matches_the_reference(device, activation, causal):
    assert_kernel_matches(device, torch.float32, activation=activation, causal=causal, masked=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_dtypes_masks_and_modes_match_the_reference(device, dtype, causal, masked):
    assert_kernel_matches(device, dtype, activation="relu2", causal=causal, masked=masked)


@pytest.mark.parametrize("length,alpha", [(None, 0.5), (64, 1.0), (None, 0.0)])
def test_length_modes_and_alpha_match_the_reference(device, length, alpha):
    assert_kernel_matches(
        device, torch.float32, activation="gelu", causal=True, masked=True, length=length, alpha=alpha
    )


def test_auto_takes_the_reference_path_on_the_cpu_and_forcing_explains_why_not(monkeypatch):
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64)
    with (
        pytest.raises(RuntimeError, match="float64 runs on the reference path only"),
        tokenmix.use_backend("triton"),
    ):
        pointwise_attention(q, q, q)
    monkeypatch.delenv("TRITON_INTERPRET")
    with (
        pytest.raises(RuntimeError, match="the tensors are on cpu; the kernels run on CUDA"),
        tokenmix.use_backend("triton"),
    ):
        pointwise_attention(q.float(), q.float(), q.float())
    with tokenmix.use_backend("auto"):
        pointwise_attention(q.float(), q.float(), q.float())  # the reference path, no error


@pytest.mark.parametrize("causal", [False, True])
def test_float16_weights_beyond_its_range_stay_finite(device, causal):
    """relu² of scores in the hundreds exceeds float16's largest value (65504); scaled by L^-α = 1/N the
    outputs and (small) gradients do not, and the kernel applies the scale before any half-precision
    cast."""
    (q, k, v), grad, mask = inputs(device, torch.float32, seed=3)
    q, k, v = (x.detach() for x in (q, k, v))
    tensors = [x.half().requires_grad_() for x in (q * 12, k * 12, v * 1e-2)]
    scores = tensors[0].float() @ tensors[1].float().transpose(-1, -2) / q.shape[-1] ** 0.5
    assert scores.max() ** 2 > torch.finfo(torch.float16).max
    options = {"activation": "relu2", "causal": causal, "alpha": 1.0, "length": 37, "attention_mask": mask}
    reference = run("reference", *tensors, (grad * 1e-2).half(), **options)
    kernel = run("triton", *tensors, (grad * 1e-2).half(), **options)
    for name, ours, expected in zip(("out", "dq", "dk", "dv"), kernel, reference, strict=True):
        assert torch.isfinite(expected).all(), name
        assert torch.isfinite(ours).all(), name
        error = relative_error(ours.double(), expected.double())
        assert error <= TOLERANCE[torch.float16], f"{name}: relative error {error:.2e}"
