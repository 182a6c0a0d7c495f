"""What the "softmax" and "pointwise" modules add on top of the shared suite."""

from __future__ import annotations

import pytest
import torch

from tests.reference import assert_close
from tokenmix import create_mixer
from tokenmix.functional import ACTIVATIONS, pointwise_attention


def test_pointwise_defaults_follow_the_paper():
    mixer = create_mixer("pointwise", 32)
    assert (mixer.activation, mixer.alpha, mixer.length) == ("relu", 1.0, None)
    assert mixer.q_norm is not None and mixer.k_norm is not None  # qk-layernorm on
    assert create_mixer("softmax", 32).q_norm is None


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_pointwise_module_is_the_op_between_its_projections(activation):
    """The module's output is W_o applied to the functional op on its own q, k, v: no second copy of
    the math hides in the module."""
    torch.manual_seed(0)
    mixer = create_mixer("pointwise", 16, heads=2, activation=activation, alpha=0.5, length=9, causal=True)
    x = torch.randn(2, 7, 16)
    q, k, v = mixer._qkv(x, offset=0)
    attended = pointwise_attention(q, k, v, activation=activation, alpha=0.5, length=9, causal=True)
    expected = mixer.to_out(attended.transpose(1, 2).reshape(2, 7, 16))
    assert_close(mixer(x), expected, 1e-6)


def test_gate_multiplies_by_silu_of_a_projection():
    torch.manual_seed(0)
    gated = create_mixer("pointwise", 16, heads=2, gate=True)
    x = torch.randn(2, 5, 16)
    q, k, v = gated._qkv(x, offset=0)
    attended = pointwise_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16)
    expected = gated.to_out(attended * torch.nn.functional.silu(gated.to_gate(x)))
    assert_close(gated(x), expected, 1e-6)
    assert create_mixer("pointwise", 16).to_gate is None


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"heads": 5}, ValueError, "heads=5 must divide dim=32"),
        ({"activation": "tanh"}, ValueError, "activation must be one of"),
        ({"length": -1}, ValueError, "length must be positive"),
        ({"rope": True, "head_dim": 3}, ValueError, "even head dimension"),
    ],
)
def test_bad_options_fail_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        create_mixer("pointwise", 32, **options)


def test_explicit_head_dim_need_not_divide_dim():
    mixer = create_mixer("softmax", 30, heads=4, head_dim=16)
    assert mixer(torch.randn(1, 3, 30)).shape == (1, 3, 30)


def test_kv_cache_state_is_per_batch():
    mixer = create_mixer("softmax", 16, heads=2, causal=True)
    _, state = mixer.step(torch.randn(2, 16), mixer.init_state(2))
    assert state.cache.length == 1 and state.nbytes() == 2 * 2 * 1 * (8 + 8) * 4
    with pytest.raises(ValueError, match="batch_size=2"):
        mixer.step(torch.randn(3, 16), state)
