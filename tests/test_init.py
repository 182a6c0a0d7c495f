"""Meta-device construction (tokenmix/init.py): materialised and reset, a model has eager construction's
weights bit for bit, for every registered mixer and every model."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from tokenmix.init import SelfInitialising
from tokenmix.mixers import create_mixer, list_mixers, mixer_info
from tokenmix.models.language_model import LanguageModel, SequenceClassifier
from tokenmix.models.vision import VisionTransformer


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))  # RoPE's frequencies are not saved
    return tensors


def _meta_equals_eager(make) -> nn.Module:
    torch.manual_seed(7)
    eager = make()
    with torch.device("meta"):
        model = make()
    assert all(t.is_meta for t in _tensors(model).values())
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    model.reset_parameters()
    ours, theirs = _tensors(model), _tensors(eager)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    return model


def _mixer_options(name: str) -> dict:
    options = {"max_len": 16} if "max_len" in mixer_info(name).options else {}
    if "rope" in mixer_info(name).options:
        options["rope"] = True
    return options


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_on_meta_equals_eager(name: str, causal: bool) -> None:
    _meta_equals_eager(lambda: create_mixer(name, 16, causal=causal, **_mixer_options(name)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LanguageModel(40, 16, 2, ["flash", "aft_local"], positions="rope", max_len=32),
        lambda: LanguageModel(40, 16, 2, "aft_full", max_len=32, tie_weights=False),
        lambda: SequenceClassifier(40, 3, 16, 2, ["dynamic_conv", "lightconv"]),
        lambda: VisionTransformer(8, 2, 3, dim=16, depth=2, mixer="aft_conv", pool="mean"),
        lambda: VisionTransformer(8, 2, 3, dim=16, depth=1),
    ],
    ids=["lm-rope", "lm-untied", "classifier", "vit-aft-conv", "vit-cls"],
)
def test_every_model_on_meta_equals_eager(make) -> None:
    model = _meta_equals_eager(make)
    if isinstance(model, LanguageModel):
        assert (model.head.weight is model.embedding.weight) == model.tie_weights


def test_eager_construction_draws_as_reset_does() -> None:
    """A constructed model's weights are those reset_parameters draws from the seed it started from, and it
    leaves the random state where the reset left it."""
    torch.manual_seed(3)
    model = LanguageModel(40, 16, 1, "gau", ffn=False)
    after_construction = torch.rand(1)
    torch.manual_seed(3)
    model.reset_parameters()
    assert torch.equal(torch.rand(1), after_construction)


def test_a_billion_parameters_on_meta_in_under_two_seconds() -> None:
    start = time.perf_counter()
    with torch.device("meta"):
        model = LanguageModel(50257, 2048, 20, mixer_options={"heads": 16})
    seconds = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) > 1e9
    assert seconds < 2, seconds


def test_a_module_with_tensors_and_no_initialiser_is_a_library_bug() -> None:
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2))

    class Holder(SelfInitialising):
        def __init__(self) -> None:
            super().__init__()
            self.bare = Bare()

    with pytest.raises(TypeError, match="Bare has tensors of its own but no reset_parameters"):
        Holder()


def test_a_tied_head_keeps_the_embeddings_initialisation() -> None:
    """The head's own initialiser (Kaiming, std 1/√(3·dim) ≈ 0.07 here) runs on the tied weight too: the
    embedding's N(0, 0.02) must be what remains."""
    model = LanguageModel(1000, 64, 1)
    assert model.head.weight is model.embedding.weight
    weight = model.embedding.weight.detach()
    assert 0.019 < float(weight.std()) < 0.021
    assert abs(float(weight.mean())) < 1e-3
