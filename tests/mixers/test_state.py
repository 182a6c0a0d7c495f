"""The decoding-state base every mixer's and model's state derives from (docs/spec.md §7): checked and
counted once, in ``Mixer.step`` / ``Backbone.step``, the same for every family."""

from __future__ import annotations

import sys

import pytest
import torch

import tokenmix
import tokenmix.functional as F
from tokenmix.core import chunks
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
    assert state.nbytes() > 0 or tokenmix.mixer_info(name).control  # the control carries nothing
    with pytest.raises(ValueError, match="capacity=6 positions; 7 were fed"):
        mixer.step(torch.randn(2, 3, 16), state)


def test_a_model_state_is_checked_by_the_same_base():
    model = LanguageModel(vocab_size=11, dim=16, depth=2, mixer="aft_simple")
    state = model.init_state(2, capacity=3)
    assert isinstance(state, DecodingState) and all(isinstance(s, DecodingState) for s in state.layers)
    with pytest.raises(ValueError, match="state was made for batch_size=2, got a batch of 3"):
        model.step(torch.randint(11, (3,)), state)
    with torch.no_grad():
        _, state = model.step(torch.randint(11, (2, 3)), state)
    assert state.fed == 3 and state.nbytes() == sum(layer.nbytes() for layer in state.layers) > 0
    with pytest.raises(ValueError, match="capacity=3 positions; 4 were fed"):
        model.step(torch.randint(11, (2,)), state)


def _stepped(mixer, x, state, mask=None):
    """Outputs of feeding x (B, T, dim) one token at a time from ``state``, and the state after."""
    outputs = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state, None if mask is None else mask[:, t])
        outputs.append(y)
    return torch.stack(outputs, 1), state


@pytest.mark.parametrize("name", tokenmix.list_mixers())
@pytest.mark.parametrize("capacity", [None, 8])
def test_a_stepped_state_is_stale_and_clone_and_select_branch(name, capacity):
    """Issue 38.8: stepping a state a step already advanced gave the logits of another position with no
    error. Now it is refused; clone() branches, select() takes rows (repeats allowed), each equal to the
    causal forward of its own sequence."""
    torch.manual_seed(0)
    mixer = tokenmix.create_mixer(name, 16, causal=True).double().eval()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    other = torch.randn(3, 2, 16, dtype=torch.float64)
    with torch.no_grad():
        start = mixer.init_state(3, capacity)
        _, state = mixer.step(x[:, :4], start)  # a prefill, then tokens
        with pytest.raises(ValueError, match="state is stale: a step already advanced it from position 0"):
            mixer.step(x[:, 4], start)
        for stale in (start.clone, lambda: start.select([0])):
            with pytest.raises(ValueError, match="state is stale"):
                stale()
        branch = state.clone()
        y, _ = _stepped(mixer, x[:, 4:], state)
        y_branch, _ = _stepped(mixer, other, branch)
        picked = state_after(mixer, x[:, :4], capacity).select(torch.tensor([2, 0, 2]))
        y_picked, picked = _stepped(mixer, x[[2, 0, 2], 4:], picked)
        full = mixer(x)
        branched = mixer(torch.cat((x[:, :4], other), 1))
    torch.testing.assert_close(y, full[:, 4:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_branch, branched[:, 4:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_picked, full[[2, 0, 2], 4:], rtol=1e-9, atol=1e-9)
    assert picked.batch_size == 3 and picked.positions.tolist() == [6, 6, 6]


def state_after(mixer, x, capacity):
    return mixer.step(x, mixer.init_state(x.shape[0], capacity))[1]


def test_select_refuses_indices_that_are_not_rows():
    state = state_after(tokenmix.create_mixer("softmax", 16, causal=True), torch.randn(2, 3, 16), None)
    for indices, message in (([2], r"\[0, batch_size=2\)"), ([], "non-empty"), (torch.zeros(2, 1), "1-D")):
        with pytest.raises(ValueError, match=message):
            state.select(indices)


def test_a_model_state_is_stale_after_a_step_and_branches_by_clone():
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=11, dim=16, depth=2, mixer="flash").double().eval()
    prompt, a, b = torch.randint(11, (2, 5)), torch.randint(11, (2,)), torch.randint(11, (2,))
    with torch.no_grad():
        _, state = model.step(prompt, model.init_state(2))
        branch = state.clone()
        logits_a, _ = model.step(a, state)
        with pytest.raises(ValueError, match="state is stale"):
            model.step(b, state)
        logits_b, _ = model.step(b, branch)
        for token, logits in ((a, logits_a), (b, logits_b)):
            torch.testing.assert_close(logits, model(torch.cat((prompt, token[:, None]), 1))[:, -1])


@pytest.mark.parametrize("name", tokenmix.list_mixers())
def test_state_bytes_is_what_decoding_n_tokens_leaves_behind(name):
    """Issue 37.5: the x-axis of a recall-against-state plot, measured the way a user decodes."""
    mixer = tokenmix.create_mixer(name, 16, causal=True)
    state = mixer.init_state(2)
    with torch.no_grad():
        for _ in range(12):
            _, state = mixer.step(torch.randn(2, 16), state)
    assert mixer.state_bytes(12, batch=2) == state.nbytes()
    grows = mixer.state_bytes(24) > mixer.state_bytes(12)
    assert grows == (name in ("softmax", "pointwise", "gau", "aft_full"))  # a cache of every token


def test_state_bytes_of_attention_is_its_keys_and_values():
    mixer = tokenmix.create_mixer("softmax", 32, causal=True)
    assert mixer.state_bytes(100, batch=3) == 2 * 3 * 100 * 32 * 4  # K and V, float32
    assert tokenmix.create_mixer("identity", 32, causal=True).state_bytes(100) == 0
    with pytest.raises(tokenmix.errors.UnavailableError, match="causal=True"):
        tokenmix.create_mixer("softmax", 32).state_bytes(10)
    with pytest.raises(ValueError, match="seq_len"):
        mixer.state_bytes(0)


def _nested_states(value, found):
    """Every DecodingState inside ``value`` (its fields, recursively), ``value`` itself excluded."""
    for item in value.own_values():
        if isinstance(item, DecodingState):
            found.append(item)
            _nested_states(item, found)
    return found


@pytest.mark.parametrize("name", tokenmix.list_mixers())
def test_a_mixer_holds_one_state_and_counts_positions_once(name):
    """Issue 40.2: a mixer's decoding state was a wrapper around its op's state, both counting positions.
    Now a mixer whose op is recurrent holds the op's own state type, and no state nested in it counts
    positions (an op's running sums may nest, positionless)."""
    recurrent_types = {getattr(F, op).state_type for op in F.__all__ if hasattr(getattr(F, op), "state_type")}
    mixer = tokenmix.create_mixer(name, 16, causal=True)
    mask = torch.tensor([[False, True, True], [True, True, False]])
    with torch.no_grad():
        _, state = mixer.step(torch.randn(2, 3, 16), mixer.init_state(2), mask)
    expected = {
        "flash": F.MixedChunkState, "aft_simple": F.AFTSimpleState, "aft_local": F.AFTWindowState,
        "aft_conv": F.AFTWindowState, "lightconv": F.ConvWindowState, "dynamic_conv": F.ConvWindowState,
    }  # fmt: skip
    if name in expected:
        assert type(state) is expected[name] and type(state) in recurrent_types
    assert all(inner.positions is None for inner in _nested_states(state, []))
    assert state.positions.tolist() == [2, 2]


@pytest.mark.parametrize("name", tokenmix.list_mixers())
def test_a_padded_chunk_is_compacted_once(name, monkeypatch):
    """Issue 40.2: a chunk was compacted by Mixer.step and again inside AFT-local's recurrent op. Every
    module that imported ``compact`` has it replaced by a counting one; two steps, each once."""
    calls, original = [], chunks.compact

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mixer = tokenmix.create_mixer(name, 16, causal=True)
    mask = torch.tensor([[False, True, True, True], [True, True, False, True]])
    with torch.no_grad():
        _, state = mixer.step(torch.randn(2, 4, 16), mixer.init_state(2), mask)  # imports what it uses
        for module in list(sys.modules.values()):
            if module.__name__.startswith("tokenmix") and getattr(module, "compact", None) is original:
                monkeypatch.setattr(module, "compact", counted)
        _, state = mixer.step(torch.randn(2, 4, 16), state, mask)  # continued from the op's state
        mixer.step(torch.randn(2, 4, 16), mixer.init_state(2), mask)  # the op's first chunk
    assert len(calls) == 2
