"""The module suite every registered mixer passes (docs/spec.md §6): shapes, gradients, padding and causal
invariance, step decoding, option and shape errors. A new family is covered by registering it."""

from __future__ import annotations

import pytest
import torch

from tests.mixers.options import SMALL_OPTIONS
from tests.reference import assert_close, decode, relative_error
from tokenmix import create_mixer, list_mixers, mixer_info

DIM = 32


def make(name: str, causal: bool, dtype=torch.float64, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    mixer = create_mixer(name, DIM, causal=causal, **{**SMALL_OPTIONS.get(name, {}), **options})
    return mixer.to(dtype).eval()


def random_inputs(batch=2, seq_len=13, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, DIM, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    mask[:, -1] = True  # at least one real token per row
    return x, mask, gen


names = pytest.mark.parametrize("name", list_mixers())
causal_modes = pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])


@names
@causal_modes
def test_output_shape_dtype_and_finite(name, causal):
    for dtype in (torch.float32, torch.float64):
        x, mask, _ = random_inputs(dtype=dtype)
        out = make(name, causal, dtype)(x, attention_mask=mask)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out).all()


@names
def test_every_mixer_ends_in_its_output_projection(name):
    """The models initialise each residual branch's last projection (the mixer's ``to_out``): it must
    exist and be what produces the output — zeroing it zeroes the mixer."""
    mixer = make(name, causal=True)
    assert isinstance(mixer.to_out, torch.nn.Linear) and mixer.to_out.out_features == DIM
    x, _, _ = random_inputs()
    with torch.no_grad():
        mixer.to_out.weight.zero_()
        if mixer.to_out.bias is not None:
            mixer.to_out.bias.fill_(0.5)
        assert torch.equal(mixer(x), torch.full_like(x, 0.5))


@names
@causal_modes
def test_every_parameter_gets_a_gradient(name, causal):
    """At init every gradient exists and is finite; after a small random perturbation of every parameter
    every gradient is nonzero (some inits, e.g. AFT-conv's γ = β = 0, zero a gradient exactly)."""
    mixer = make(name, causal).train()
    x, mask, gen = random_inputs()
    weights = torch.randn(x.shape, generator=gen, dtype=x.dtype) * mask[..., None]
    for perturbed in (False, True):
        if perturbed:
            with torch.no_grad():
                for param in mixer.parameters():
                    param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        mixer.zero_grad(set_to_none=True)
        (mixer(x, attention_mask=mask) * weights).sum().backward()
        for param_name, param in mixer.named_parameters():
            assert param.grad is not None, f"{param_name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
            if perturbed:
                assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@names
@causal_modes
def test_padding_is_invisible_to_real_positions(name, causal):
    mixer = make(name, causal)
    x, mask, gen = random_inputs(seq_len=17)
    other = torch.where(mask[..., None], x, 100 * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    real = mask[..., None].expand_as(x)
    assert_close(mixer(other, attention_mask=mask), mixer(x, attention_mask=mask), 1e-10, mask=real)


@names
def test_causal_mixer_does_not_see_the_future(name):
    mixer = make(name, causal=True)
    x, mask, gen = random_inputs(seq_len=17)
    for cut in (0, 5, 16):
        changed = x.clone()
        changed[:, cut + 1 :] = torch.randn(changed[:, cut + 1 :].shape, generator=gen, dtype=x.dtype)
        for m in (None, mask):
            before = mixer(x, attention_mask=m)[:, : cut + 1]
            # Outputs at padded positions are unspecified (docs/spec.md): compare the real ones.
            real = None if m is None else m[:, : cut + 1, None].expand_as(before)
            after = mixer(changed, attention_mask=m)[:, : cut + 1]
            assert_close(after, before, 1e-10, mask=real, what=f"cut={cut}")


@pytest.mark.parametrize("name", [name for name in list_mixers() if not mixer_info(name).control])
def test_bidirectional_mixer_sees_the_future(name):
    """Guards the other way: a bidirectional mixer that quietly ran causally would pass every other test."""
    mixer = make(name, causal=False)
    x, _, gen = random_inputs(seq_len=9)
    changed = x.clone()
    changed[:, -1] = torch.randn(changed[:, -1].shape, generator=gen, dtype=x.dtype)
    # At init some mixers (GAU's γ ~ N(0, 0.02)) barely mix, so ask for a change above float64 round-off.
    assert relative_error(mixer(changed)[:, 0], mixer(x)[:, 0]) > 1e-12


@pytest.mark.parametrize("name", [name for name in list_mixers() if mixer_info(name).control])
@causal_modes
def test_a_control_mixes_nothing(name, causal):
    """The control (``identity``, issue 37.2): each position's output is its own input's projection, so
    changing any other position changes nothing; the same model around it, minus mixing."""
    mixer = make(name, causal)
    x, _, gen = random_inputs(seq_len=9)
    changed = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    changed[:, 4] = x[:, 4]
    torch.testing.assert_close(mixer(changed)[:, 4], mixer(x)[:, 4], rtol=0, atol=0)
    torch.testing.assert_close(mixer(x), mixer.to_out(x), rtol=0, atol=0)


@names
def test_step_decoding_reproduces_causal_forward(name):
    mixer = make(name, causal=True, dtype=torch.float32)
    x, _, _ = random_inputs(seq_len=21, dtype=torch.float32)
    with torch.no_grad():
        full = mixer(x)
    assert_close(decode(mixer, x)[0], full, 1e-5, what="step vs forward")


@names
def test_unknown_option_is_a_type_error_listing_accepted_ones(name):
    with pytest.raises(TypeError, match="accepted:") as info:
        create_mixer(name, DIM, no_such_option=1)
    assert "no_such_option" in str(info.value)
    for option in mixer_info(name).options:
        assert option in str(info.value)


@names
def test_bad_shapes_are_value_errors(name):
    mixer = make(name, causal=True)
    x, mask, _ = random_inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        mixer(x[0])
    with pytest.raises(ValueError, match="dim=32"):
        mixer(x[..., :-1])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        mixer(x, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match=r"x must have shape \(B, dim=32\) or \(B, T, dim=32\)"):
        mixer.step(x[:, 0, :-1], mixer.init_state(2))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        mixer.step(x, mixer.init_state(2), mask[:, :-1])


@names
def test_stepping_a_bidirectional_mixer_is_refused(name):
    mixer = make(name, causal=False)
    with pytest.raises(RuntimeError, match="causal=True"):
        mixer.step(torch.randn(2, DIM, dtype=torch.float64), None)


@names
def test_registry_entry_is_complete(name):
    info = mixer_info(name)
    assert info.paper and info.time and info.memory and info.state
    assert "dim" not in info.options and "causal" not in info.options
