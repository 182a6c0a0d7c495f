from __future__ import annotations

import pytest
import torch

import tokenmix
from tests.reference import relative_error
from tokenmix.functional import mixed_chunk_attention

from .conftest import TOLERANCE

NAMES = ("out", "dq_quad", "dk_quad", "dq_lin", "dk_lin", "dv")


def case(device, dtype, batch=2, seq_len=37, qk_dim=12, value_dim=20, seed=0):
    """Odd shapes: N not a multiple of the chunk or the block, S and E not powers of two."""
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    inputs = [randn(batch, seq_len, qk_dim) for _ in range(4)] + [randn(batch, seq_len, value_dim)]
    grad = torch.randn(batch, seq_len, value_dim, generator=generator, device=device).to(dtype)
    mask = torch.rand(batch, seq_len, generator=generator, device=device) > 0.3
    return [x.to(dtype).requires_grad_() for x in inputs], grad, mask


def assert_kernel_matches(inputs, grad, dtype, **options):
    results = {}
    for backend in ("reference", "triton"):
        with tokenmix.use_backend(backend):
            out = mixed_chunk_attention(*inputs, **options)
            results[backend] = (out, *torch.autograd.grad(out, inputs, grad))
    for name, ours, want in zip(NAMES, results["triton"], results["reference"], strict=True):
        assert ours.dtype == dtype and ours.shape == want.shape
        assert torch.isfinite(ours).all(), name
        error = relative_error(ours.double(), want.double())
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [5, 20])  # 5: a block of rows spans chunks; 20: N = 37 pads the last
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_mixed_chunk_attention_matches_the_reference(device, dtype, chunk_size, causal, masked):
    inputs, grad, mask = case(device, dtype)
    options = {"chunk_size": chunk_size, "causal": causal, "attention_mask": mask if masked else None}
    assert_kernel_matches(inputs, grad, dtype, **options)


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_chunk_attention_float16_weights_beyond_its_range(device, causal):
    """Scores in the hundreds: relu² exceeds float16's largest value (65504) while the outputs do not;
    the weights are divided by C before the half-precision cast."""
    inputs, grad, mask = case(device, torch.float32, seed=1)
    q_quad, k_quad, q_lin, k_lin, v = (x.detach() for x in inputs)
    inputs = [x.half().requires_grad_() for x in (q_quad * 12, k_quad * 12, q_lin, k_lin, v * 1e-3)]
    scores = (inputs[0].float() @ inputs[1].float().transpose(1, 2)) / inputs[0].shape[-1] ** 0.5
    assert scores.max() ** 2 > torch.finfo(torch.float16).max
    grad = (grad * 1e-2).half()
    assert_kernel_matches(inputs, grad, torch.float16, chunk_size=16, causal=causal, attention_mask=mask)


def test_mixed_chunk_attention_with_a_sequence_of_padding_only(device):
    inputs, grad, mask = case(device, torch.float32, seed=2)
    mask[1] = False
    assert_kernel_matches(inputs, grad, torch.float32, chunk_size=8, causal=True, attention_mask=mask)


@pytest.mark.parametrize("length", [1, 3])
def test_a_call_continued_from_a_state_refuses_forced_triton(device, length):
    """docs/spec.md §7: continued from a state, a chunk or a single token runs on the reference path —
    auto takes it, forced triton raises naming why; a fresh sequence's first call is the op itself."""
    inputs, _, _ = case(device, torch.float32, batch=1, seq_len=4, qk_dim=3, value_dim=2)
    x = [t.detach() for t in inputs]
    options = {"chunk_size": 2, "causal": True, "output_final_state": True}
    with tokenmix.use_backend("triton"):
        _, state = mixed_chunk_attention(*(t[:, :1] for t in x), **options)  # a fresh state: no error
    with tokenmix.use_backend("triton"), pytest.raises(RuntimeError, match="continued from a decoding state"):
        mixed_chunk_attention(*(t[:, 1 : 1 + length] for t in x), initial_state=state, **options)
    with tokenmix.use_backend("auto"):
        mixed_chunk_attention(*(t[:, 1 : 1 + length] for t in x), initial_state=state, **options)
