"""docs/spec.md §8 in the models: packed documents (cu_seqlens, B = 1) are each predicted and classified
as if alone (positions restart), gradients included; perturbing one document leaves another's logits
unchanged when packed, not when merely concatenated."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.functional.test_varlen import CU_SEQLENS, N
from tests.reference import assert_close
from tokenmix.models import LanguageModel, SequenceClassifier

VOCAB = 17


def documents(seed=0):
    return torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "mixer,positions,options",
    [
        ("softmax", "rope", {"heads": 2}),
        ("softmax", "learned", {"heads": 2}),
        ("flash", "rope", {"chunk_size": 3}),
        ("aft_local", "learned", {"window": 2, "max_len": 16}),
        ("dynamic_conv", "none", {}),
    ],
)
def test_packed_documents_are_predicted_each_alone(mixer, positions, options):
    torch.manual_seed(0)
    model = LanguageModel(
        VOCAB, 16, depth=2, mixer=mixer, positions=positions, mixer_options=options, max_len=16
    )
    model = model.double().eval()
    tokens, cu_seqlens = documents(), torch.tensor(CU_SEQLENS)
    packed = model(tokens, cu_seqlens=cu_seqlens)
    grad = torch.randn(packed.shape, dtype=torch.float64)
    parameters = list(model.parameters())
    got = torch.autograd.grad(packed, parameters, grad)
    expected = [torch.zeros_like(p) for p in parameters]
    for start, end in itertools.pairwise(CU_SEQLENS):
        if start == end:
            continue
        alone = model(tokens[:, start:end])
        assert_close(packed[:, start:end], alone, 1e-10, what=f"{mixer} [{start}, {end})")
        parts = torch.autograd.grad(alone, parameters, grad[:, start:end], allow_unused=True)
        expected = [e if p is None else e + p for e, p in zip(expected, parts, strict=True)]
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(g, e, 1e-9, floor=1e-4, what=f"{mixer} gradient of parameter {index}")


def test_packed_sequences_are_classified_each_alone():
    torch.manual_seed(0)
    model = SequenceClassifier(
        VOCAB, 3, dim=16, depth=2, mixer="pointwise", mixer_options={"heads": 2}
    ).double()
    tokens = documents(1)
    logits = model.eval()(tokens, cu_seqlens=torch.tensor(CU_SEQLENS))
    assert logits.shape == (len(CU_SEQLENS) - 1, 3)
    for index, (start, end) in enumerate(itertools.pairwise(CU_SEQLENS)):
        if start == end:  # an empty sequence pools to zeros
            assert_close(logits[index], model.head.bias, 1e-12)
        else:
            assert_close(logits[index], model(tokens[:, start:end])[0], 1e-10, what=f"segment {index}")


@pytest.mark.parametrize("mixer", ["softmax", "aft_simple", "lightconv"])
def test_packing_stops_documents_from_seeing_each_other(mixer):
    """Perturb document A = [0, 5): with cu_seqlens, document B = [5, N)'s logits do not move; as a
    plain concatenation (what training without --pack does) they do."""
    torch.manual_seed(0)
    model = LanguageModel(VOCAB, 16, depth=2, mixer=mixer, max_len=N).double().eval()
    tokens = documents(2)
    other = tokens.clone()
    other[0, :5] = (tokens[0, :5] + 1) % VOCAB
    cu_seqlens = torch.tensor([0, 5, N])
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu_seqlens)[0, 5:], model(other, cu_seqlens=cu_seqlens)[0, 5:]
        joined = model(tokens)[0, 5:], model(other)[0, 5:]
    assert torch.equal(packed[0], packed[1])
    assert (joined[0] - joined[1]).abs().max() > 1e-3


def test_models_refuse_malformed_cu_seqlens_naming_it():
    model = LanguageModel(VOCAB, 16, depth=1, max_len=16)
    with pytest.raises(ValueError, match="batch size must be 1, got 2"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="cu_seqlens and attention_mask together"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at N=4"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="max_len=16"):  # the longest segment counts, not N
        model(torch.zeros(1, 20, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 20]))
    model(torch.zeros(1, 20, dtype=torch.long), cu_seqlens=torch.tensor([0, 10, 20]))  # N > max_len is fine
