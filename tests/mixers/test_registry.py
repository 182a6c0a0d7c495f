from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenmix
from tokenmix.mixers import registry


def test_listed_mixers_include_the_foundation():
    assert {"softmax", "pointwise"} <= set(tokenmix.list_mixers())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"known mixers: .*softmax"):
        tokenmix.create_mixer("linformer", 16)


def test_options_and_defaults_come_from_the_signature(monkeypatch):
    monkeypatch.setattr(registry, "_MIXERS", {})

    @registry.register_mixer("toy", paper="p", time="t", memory="m", state="s")
    class Toy(nn.Module):
        def __init__(self, dim, *, causal=False, width=3, name="x"):
            super().__init__()
            self.dim, self.causal, self.width = dim, causal, width

    assert tokenmix.mixer_info("toy").options == {"width": 3, "name": "x"}
    toy = tokenmix.create_mixer("toy", 8, causal=True, width=5)
    assert (toy.dim, toy.causal, toy.width) == (8, True, 5)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_mixer("toy", paper="p", time="t", memory="m", state="s")(Toy)


def test_a_mixers_model_defaults_live_with_its_registration(monkeypatch):
    """compare and the presets build a mixer's stack from its registered defaults, not from its name; a
    comparison's positions are its own, the same for every mixer (issue 37.1), the presets' registered."""
    from tokenmix.bench.compare import BUDGETS, training_options

    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))
    defaults = registry.ModelDefaults(head_width=16, layers_per_block=3, ffn=False, positions="none")

    @registry.register_mixer("gated_toy", paper="p", time="t", memory="m", state="s", defaults=defaults)
    class GatedToy(nn.Module):
        def __init__(self, dim, *, causal=False, heads=1, chunk_size=512):
            super().__init__()

    budget = BUDGETS["quick"]  # d=64, 2 layers, sequences of 128
    assert training_options("gated_toy", budget) == {
        "depth": 6, "ffn": False, "positions": "learned", "mixer_options": {"heads": 4, "chunk_size": 64},
    }  # fmt: skip
    assert registry.model_options("gated_toy", 64, 2, heads=2)["mixer_options"] == {"heads": 2}
    assert registry.model_options("gated_toy", 64, 2)["positions"] == "none"  # the presets': registered
    assert training_options("aft_simple", budget) == {
        "depth": 2, "ffn": True, "mixer_options": {}, "positions": "learned"
    }  # fmt: skip
    assert training_options("softmax", budget)["mixer_options"] == {"heads": 2, "rope": False}  # 32-wide
    gau = training_options("gau", budget)
    assert (gau["depth"], gau["ffn"], gau["positions"]) == (4, False, "learned")  # the paper's stack
    assert gau["mixer_options"]["rope"] is False  # learned positions for every mixer: rotary off


def test_bad_options_fail_at_construction_naming_them():
    with pytest.raises(TypeError, match="causal must be True or False"):
        tokenmix.create_mixer("softmax", 16, causal="no")
    for rope_base in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rope_base must be"):
            tokenmix.create_mixer("softmax", 16, heads=2, rope=True, rope_base=rope_base)
    with pytest.raises(ValueError, match=r"grid must be a pair"):
        tokenmix.create_mixer("aft_conv", 16, grid=(4,))
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        tokenmix.create_mixer("aft_conv", 16, kernel_size=0, causal=True)


@pytest.mark.parametrize("name", tokenmix.list_mixers())
def test_step_without_a_state_names_init_state(name):
    mixer = tokenmix.create_mixer(name, 16, causal=True)
    for state in (None, {}, "state"):
        with pytest.raises(TypeError, match=r"state must be what .*init_state\(batch_size\) returned"):
            mixer.step(torch.randn(2, 16), state)


@pytest.mark.parametrize("name", tokenmix.list_mixers())
def test_a_state_of_another_mixer_or_batch_size_is_refused_naming_it(name):
    mixer = tokenmix.create_mixer(name, 16, causal=True)
    other = "aft_simple" if name != "aft_simple" else "softmax"
    foreign = tokenmix.create_mixer(other, 16, causal=True).init_state(2)
    with pytest.raises(TypeError, match=f"state was made by a '{other}' mixer.*'{name}' mixer"):
        mixer.step(torch.randn(2, 16), foreign)
    with pytest.raises(ValueError, match="state was made for batch_size=2, got a batch of 3"):
        mixer.step(torch.randn(3, 4, 16), mixer.init_state(2))
    with pytest.raises(ValueError, match="capacity must be positive"):
        mixer.init_state(2, capacity=0)


def test_the_minimal_mixer_in_the_base_docstring_works():
    """Issue 40.1: the example in ``Mixer``'s docstring is complete — registered, it decodes what its
    forward computes and packs each segment alone."""
    import dataclasses
    import re
    import textwrap

    from tokenmix.core.packing import packed_call
    from tokenmix.mixers import Mixer
    from tokenmix.mixers.state import DecodingState

    code = textwrap.dedent(re.search(r"one\)::\n\n(.*)", Mixer.__doc__, flags=re.DOTALL).group(1))
    namespace = {"torch": torch, "nn": torch.nn, "dataclass": dataclasses.dataclass, "Mixer": Mixer,
                 "DecodingState": DecodingState, "register_mixer": registry.register_mixer,
                 "packed_call": packed_call}  # fmt: skip
    try:
        exec(code, namespace)
        torch.manual_seed(0)
        mixer = tokenmix.create_mixer("prefix_sum", 8, causal=True).double()
        x, mask = torch.randn(2, 7, 8, dtype=torch.float64), torch.rand(2, 7) > 0.3
        mask[:, 0] = True
        full = mixer(x, attention_mask=mask)
        state = mixer.init_state(2)
        y1, state = mixer.step(x[:, :3], state, attention_mask=mask[:, :3])
        y2, state = mixer.step(x[:, 3:], state, attention_mask=mask[:, 3:])
        torch.testing.assert_close(torch.cat([y1, y2], 1)[mask], full[mask])
        packed = mixer(x[:1], cu_seqlens=torch.tensor([0, 3, 7]))
        torch.testing.assert_close(packed[0, 3:], mixer(x[:1, 3:])[0])
    finally:
        registry._MIXERS.pop("prefix_sum", None)
