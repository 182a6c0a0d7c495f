"""What "lightconv" and "dynamic_conv" add on top of the shared suite (Wu et al. 2019)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import assert_close, decode
from tokenmix import create_mixer
from tokenmix.functional import dynamic_conv, lightconv
from tokenmix.models import LanguageModel

NAMES = ["lightconv", "dynamic_conv"]


def test_modules_are_the_ops_between_their_projections():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 16)
    light = create_mixer("lightconv", 16, heads=4, kernel_size=5, causal=True)
    u = torch.nn.functional.glu(light.to_input(x))
    assert_close(light(x), light.to_out(lightconv(u, light.weight, causal=True)), 1e-6)
    dynamic = create_mixer("dynamic_conv", 16, heads=4, kernel_size=4)
    u = torch.nn.functional.glu(dynamic.to_input(x))
    kernel = dynamic.to_kernel(u).view(2, 11, 4, 4)  # each position's kernel from its own input
    assert_close(dynamic(x), dynamic.to_out(dynamic_conv(u, kernel)), 1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kernel_size", [1, 2, 4, 7])
def test_decoding_any_kernel_size_with_a_constant_state(name, kernel_size):
    torch.manual_seed(0)
    mixer = create_mixer(name, 16, heads=4, kernel_size=kernel_size, causal=True).eval()
    x = torch.randn(2, 12, 16)
    sizes = set()
    steps, _ = decode(mixer, x, lambda state: sizes.add(state.nbytes()))
    with torch.no_grad():
        assert_close(steps, mixer(x), 1e-5)
    assert sizes == {2 * (kernel_size - 1) * 16 * 4}  # the last K − 1 inputs, float32


@pytest.mark.parametrize("name", NAMES)
def test_even_kernels_are_centred_when_bidirectional(name):
    """K = 4 centred has P = 1: output 4 reads positions 3, 4, 5, 6 and nothing else."""
    torch.manual_seed(0)
    mixer = create_mixer(name, 8, heads=2, kernel_size=4).double()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    for position in range(10):
        changed = x.clone()
        changed[:, position] += 1
        seen = not torch.equal(mixer(changed)[:, 4], mixer(x)[:, 4])
        assert seen == (3 <= position <= 6), position


@pytest.mark.parametrize("name", NAMES)
def test_weight_dropout_only_while_training(name):
    torch.manual_seed(0)
    mixer = create_mixer(name, 16, heads=4, kernel_size=5, weight_dropout=0.5)
    x = torch.randn(2, 9, 16)
    mixer.eval()
    assert torch.equal(mixer(x), mixer(x))
    mixer.train()
    assert not torch.equal(mixer(x), mixer(x))


def test_glu_can_be_turned_off():
    mixer = create_mixer("lightconv", 16, heads=4, glu=False)
    assert mixer.to_input.out_features == 16 and isinstance(mixer.glu, torch.nn.Identity)
    assert create_mixer("lightconv", 16, heads=4).to_input.out_features == 32


def test_models_take_a_kernel_size_per_layer():
    sizes = [3, 7, 15, 31, 31, 31, 31]
    model = LanguageModel(
        50,
        dim=32,
        depth=7,
        mixer="lightconv",
        mixer_options={"heads": 4},
        layer_options=[{"kernel_size": k} for k in sizes],
    )
    assert [block.mixer.weight.shape[1] for block in model.backbone.blocks] == sizes
    assert model(torch.randint(0, 50, (2, 20))).shape == (2, 20, 50)


@pytest.mark.parametrize(
    "options,message",
    [({"heads": 3}, "heads=3 must divide dim=16"), ({"kernel_size": 0}, "kernel_size must be positive")],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        create_mixer("dynamic_conv", 16, **options)
