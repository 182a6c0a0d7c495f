"""docs/spec.md §7 for every registered mixer: any split of a sequence into chunks and single tokens,
with left padding of different lengths per row, reproduces each row's own causal forward — outputs and
gradients — from a growing state or one of fixed capacity; and a fixed-capacity step compiles to one
graph that is not recompiled token after token."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.mixers.options import SMALL_OPTIONS
from tests.reference import assert_close
from tokenmix import create_mixer, list_mixers

DIM = 16


def make(name, dtype, seed=0):
    torch.manual_seed(seed)
    mixer = create_mixer(name, DIM, causal=True, **SMALL_OPTIONS.get(name, {})).to(dtype).eval()
    with torch.no_grad():  # off the init (AFT-conv's γ = β = 0 would hide its kernel)
        for parameter in mixer.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return mixer


def random_split(length: int, generator: torch.Generator) -> list[int]:
    """Cut points: chunks of 1 to 5 tokens (single tokens fed as (B, dim))."""
    cuts, position = [0], 0
    while position < length:
        position = min(length, position + int(torch.randint(1, 6, (1,), generator=generator)))
        cuts.append(position)
    return cuts


def feed(mixer, x, mask, cuts, capacity=None):
    state, outputs = mixer.init_state(x.shape[0], capacity), []
    for start, end in itertools.pairwise(cuts):
        if end - start == 1:
            y, state = mixer.step(x[:, start], state, None if mask is None else mask[:, start])
            outputs.append(y[:, None])
        else:
            y, state = mixer.step(x[:, start:end], state, None if mask is None else mask[:, start:end])
            outputs.append(y)
    return torch.cat(outputs, 1)


@pytest.mark.parametrize("name", list_mixers())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("capacity", [None, 11])
def test_chunks_and_tokens_reproduce_the_causal_forward(name, dtype, tol, capacity):
    mixer = make(name, dtype)
    generator = torch.Generator().manual_seed(list_mixers().index(name))
    lengths = (11, 7, 9)  # real tokens per row, left-padded to 11
    x = torch.randn(3, 11, DIM, generator=generator, dtype=torch.float64).to(dtype)
    mask = torch.arange(11)[None, :] >= (11 - torch.tensor(lengths))[:, None]
    x = torch.where(mask[..., None], x, torch.full_like(x, 1e3))  # padding is anything finite
    for _ in range(2):  # two random splits
        cuts = random_split(11, generator)
        leaf = x.clone().requires_grad_()
        chunked = feed(mixer, leaf, mask, cuts, capacity)
        grad = (
            torch.randn(chunked.shape, generator=generator, dtype=torch.float64).to(dtype) * mask[..., None]
        )
        chunked.backward(grad)
        for row, length in enumerate(lengths):
            own = x[row : row + 1, 11 - length :].clone().requires_grad_()
            expected = mixer(own)
            assert_close(chunked[row, 11 - length :], expected[0], tol, what=f"{name} row {row} cuts {cuts}")
            expected.backward(grad[row : row + 1, 11 - length :])
            assert_close(
                leaf.grad[row, 11 - length :], own.grad[0], 10 * tol, what=f"{name} row {row} gradient"
            )
            assert torch.all(leaf.grad[row, : 11 - length] == 0)  # padding reaches nothing
        assert torch.isfinite(chunked).all()


@pytest.mark.parametrize("name", list_mixers())
def test_a_padded_position_leaves_the_state_unchanged(name):
    mixer = make(name, torch.float64)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    reference_state = mixer.init_state(2)
    with torch.no_grad():
        _, reference_state = mixer.step(x[:, :4], reference_state)
        after, _ = mixer.step(x[:, 4:], reference_state)
        state = mixer.init_state(2)
        _, state = mixer.step(x[:, :4], state)
        for _ in range(3):  # a chunk of padding only, then a padded single token
            _, state = mixer.step(torch.randn(2, 2, DIM, dtype=torch.float64), state, torch.zeros(2, 2))
            _, state = mixer.step(torch.randn(2, DIM, dtype=torch.float64), state, torch.zeros(2))
        again, _ = mixer.step(x[:, 4:], state)
    assert_close(again, after, 1e-12)


def test_gradients_flow_across_chunked_calls():
    """Truncated backpropagation through time: the loss of the second chunk reaches the first."""
    mixer = make("softmax", torch.float64)
    x = torch.randn(1, 8, DIM, dtype=torch.float64, requires_grad=True)
    state = mixer.init_state(1)
    _, state = mixer.step(x[:, :4], state)
    y, state = mixer.step(x[:, 4:], state)
    y.sum().backward()
    assert x.grad[:, :4].abs().sum() > 0


@pytest.mark.parametrize("name", list_mixers())
def test_a_fixed_capacity_step_compiles_once(name):
    """torch.compile(step, fullgraph=True) on a fixed-capacity state: no graph break, the same outputs
    as eager, and no new graph after the second token (the first one's static shapes become dynamic
    once, in the number of positions fed)."""
    mixer = make(name, torch.float64)
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(mixer.step, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager_state, state = mixer.init_state(2, capacity=12), mixer.init_state(2, capacity=12)
        _, eager_state = mixer.step(x[:, :4], eager_state)
        _, state = mixer.step(x[:, :4], state)
        graphs = []
        for t in range(4, 12):
            expected, eager_state = mixer.step(x[:, t], eager_state)
            y, state = compiled(x[:, t], state)
            assert_close(y, expected, 1e-12, what=f"{name} compiled step {t}")
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1] <= 2, graphs
    with pytest.raises(ValueError, match="capacity=12"):
        mixer.step(x[:, 0], state)
