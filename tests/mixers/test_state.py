"""The decoding-state base every mixer's and model's state derives from (docs/spec.md §7): checked and
counted once, in ``Mixer.step`` / ``Backbone.step``, the same for every family."""

from __future__ import annotations

import pytest
import torch

import tokenmix
from tokenmix.mixers.state import DecodingState
from tokenmix.models import LanguageModel


@pytest.mark.parametrize("name", tokenmix.list_mixers())
def test_every_state_counts_fed_positions_and_real_tokens(name):
    mixer = tokenmix.create_mixer(name, 16, causal=True)
    state = mixer.init_state(2, capacity=6)
    assert isinstance(state, DecodingState) and (state.batch_size, state.capacity, state.fed) == (2, 6, 0)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    with torch.no_grad():
        _, state = mixer.step(torch.randn(2, 3, 16), state, mask)
        _, state = mixer.step(torch.randn(2, 16), state)
    assert state.fed == 4 and state.positions.tolist() == [3, 2]  # padding fed, not counted
    assert state.nbytes() > 0
    with pytest.raises(ValueError, match="capacity=6 positions; 7 were fed"):
        mixer.step(torch.randn(2, 3, 16), state)


def test_a_model_state_is_checked_by_the_same_base():
    model = LanguageModel(vocab_size=11, dim=16, depth=2, mixer="aft_simple")
    state = model.init_state(2, capacity=3)
    assert isinstance(state, DecodingState) and all(isinstance(s, DecodingState) for s in state.layers)
    with pytest.raises(ValueError, match="state was made for batch_size=2, got a batch of 3"):
        model.step(torch.randint(11, (3,)), state)
    with torch.no_grad():
        model.step(torch.randint(11, (2, 3)), state)
    assert state.fed == 3 and state.nbytes() == sum(layer.nbytes() for layer in state.layers) > 0
    with pytest.raises(ValueError, match="capacity=3 positions; 4 were fed"):
        model.step(torch.randint(11, (2,)), state)
