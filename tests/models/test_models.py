"""LanguageModel, SequenceClassifier and VisionTransformer with every mixer."""

from __future__ import annotations

import pytest
import torch

from tests.reference import assert_close, decode
from tokenmix import list_mixers, mixer_info
from tokenmix.models import LanguageModel, SequenceClassifier, VisionTransformer

VOCAB = 37


def tokens(batch=2, seq_len=11, seed=0):
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def language_model(mixer="softmax", **options):
    torch.manual_seed(0)
    return LanguageModel(VOCAB, dim=32, depth=2, mixer=mixer, max_len=64, **options).eval()


@pytest.mark.parametrize("mixer", list_mixers())
@pytest.mark.parametrize("positions", ["learned", "rope", "none"])
def test_language_model_steps_reproduce_forward(mixer, positions):
    if positions == "rope" and "rope" not in mixer_info(mixer).options:
        with pytest.raises(ValueError, match=r"positions='rope' needs a mixer with rotary positions"):
            language_model(mixer, positions=positions)
        return
    model = language_model(mixer, positions=positions)
    x = tokens()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (*x.shape, VOCAB)
    assert_close(decode(model, x)[0], logits, 1e-5)


def test_language_model_is_causal_and_ties_weights():
    model = language_model()
    x = tokens()
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    assert torch.equal(model(x)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(x)[:, 6:], model(changed)[:, 6:])
    assert model.head.weight is model.embedding.weight


def test_greedy_generation_follows_the_forward_argmax():
    model = language_model("pointwise")
    prompt = tokens(seq_len=4)
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    # Each generated token is the argmax of the full forward over everything before it.
    assert torch.equal(model(out[:, :-1]).argmax(-1)[:, 3:], out[:, 4:])


def test_sampling_respects_top_k_and_the_generator():
    model = language_model()
    prompt = tokens(seq_len=3)
    first = model.generate(prompt, 8, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, model.generate(prompt, 8, temperature=0))  # top-1 sampling is greedy
    a = model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_per_layer_mixers_and_options():
    model = LanguageModel(
        VOCAB,
        dim=32,
        depth=2,
        mixer=["softmax", "pointwise"],
        layer_options=[{"heads": 4}, {"heads": 2, "activation": "relu2"}],
    )
    assert [block.mixer.heads for block in model.backbone.blocks] == [4, 2]
    assert model.backbone.blocks[1].mixer.activation == "relu2"
    assert model(tokens()).shape == (2, 11, VOCAB)
    with pytest.raises(ValueError, match="depth=3"):
        LanguageModel(VOCAB, dim=32, depth=3, mixer=["softmax", "pointwise"])


def test_ffn_can_be_turned_off():
    model = LanguageModel(VOCAB, dim=32, depth=2, ffn=False)
    assert all(block.ffn is None for block in model.backbone.blocks)
    assert model(tokens()).shape == (2, 11, VOCAB)


def test_model_errors_are_clear():
    model = language_model()
    with pytest.raises(ValueError, match="max_len=64"):
        model(tokens(seq_len=65))
    with pytest.raises(ValueError, match="vocab_size=37"):
        model(torch.full((1, 3), VOCAB))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="accepted"):
        LanguageModel(VOCAB, dim=32, depth=1, mixer_options={"window": 3})
    with pytest.raises(ValueError, match="unknown mixer"):
        LanguageModel(VOCAB, dim=32, depth=1, mixer="nope")
    with pytest.raises(ValueError, match="positions"):
        LanguageModel(VOCAB, dim=32, depth=1, positions="sinusoidal")
    state = model.init_state(1)
    state.positions = torch.tensor([64])
    with pytest.raises(ValueError, match="max_len=64"):
        model.step(torch.zeros(1, dtype=torch.long), state)


@pytest.mark.parametrize("mixer", list_mixers())
def test_classifier_pools_real_tokens_only(mixer):
    torch.manual_seed(0)
    model = SequenceClassifier(VOCAB, 5, dim=32, depth=2, mixer=mixer).eval()
    x = tokens(seq_len=9)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 6:] = False
    changed = x.clone()
    changed[0, 6:] = (changed[0, 6:] + 3) % VOCAB
    logits = model(x, mask)
    assert logits.shape == (2, 5)
    assert_close(model(changed, mask), logits, 1e-6)
    assert not torch.allclose(model(changed), model(x))  # without the mask the change is seen


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("mixer", list_mixers())
def test_vision_transformer(pool, mixer):
    if pool == "cls" and "grid" in mixer_info(mixer).options:  # grid mixers (AFT-conv): no class token
        with pytest.raises(ValueError, match="pool='mean'"):
            VisionTransformer(12, 4, 10, in_channels=1, dim=32, depth=2, mixer=mixer, pool=pool)
        return
    model = VisionTransformer(12, 4, 10, in_channels=1, dim=32, depth=2, mixer=mixer, pool=pool)
    images = torch.randn(3, 1, 12, 12)
    logits = model(images)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    if mixer_info(mixer).control and pool == "cls":  # no mixing: the class token never sees a patch
        assert model.patch_embedding.weight.grad is None or not model.patch_embedding.weight.grad.any()
    else:
        assert model.patch_embedding.weight.grad.abs().sum() > 0
    assert model.backbone.position_embedding.num_embeddings == 9 + (pool == "cls")


def test_vision_transformer_errors():
    with pytest.raises(ValueError, match="patch_size 5 must divide image_size 12"):
        VisionTransformer(12, 5, 10)
    model = VisionTransformer((8, 12), (4, 4), 10, dim=16, depth=1, mixer_options={"heads": 2})
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 8, 12\)"):
        model(torch.randn(2, 3, 12, 8))


def test_rope_goes_to_the_layers_that_take_it():
    """A hybrid stack with positions='rope': attention layers rotate, AFT and convolution layers keep
    their own positions (w, taps) instead of failing on an unknown option."""
    torch.manual_seed(0)
    model = LanguageModel(
        VOCAB, dim=32, depth=4, mixer=["softmax", "aft_full", "lightconv", "pointwise"], max_len=64,
        positions="rope",
    ).eval()  # fmt: skip
    mixers = [block.mixer for block in model.backbone.blocks]
    assert mixers[0].rotary is not None and mixers[3].rotary is not None
    x = tokens()
    with torch.no_grad():
        logits = model(x)
    assert_close(decode(model, x)[0], logits, 1e-5)


def test_vision_transformer_gives_the_grid_to_every_layer_that_takes_it():
    vit = VisionTransformer(
        8, 2, 3, in_channels=1, dim=16, depth=2, mixer=["softmax", "aft_conv"], pool="mean"
    )
    assert vit.backbone.blocks[1].mixer.grid == (4, 4)
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="works on the patch grid"):
        VisionTransformer(8, 2, 3, in_channels=1, dim=16, depth=2, mixer=["softmax", "aft_conv"])


def test_decoding_needs_a_state_from_init_state():
    model = language_model()
    with pytest.raises(TypeError, match="state must be what init_state"):
        model.step(tokens()[:, 0], None)


@pytest.mark.parametrize(
    "other",
    [
        {"depth": 3},  # deeper: an IndexError past the last layer's state
        {"depth": 1},  # shallower: accepted, silently, before
        {"dim": 48},  # wider
        {"mixer_options": {"heads": 4}},  # the same parameters, other heads: a RuntimeError in SDPA
        {"mixer": ["softmax", "pointwise"]},
    ],
)
def test_a_state_of_another_model_is_refused_naming_both(other):
    model = language_model(mixer_options={"heads": 2})
    state = model.init_state(2)
    options = {"vocab_size": VOCAB, "dim": 32, "depth": 2, "mixer": "softmax", "max_len": 64,
               "mixer_options": {"heads": 2}, **other}  # fmt: skip
    torch.manual_seed(0)
    another = LanguageModel(**options)
    with pytest.raises(ValueError, match=r"state was made by another model: 2 layers \[SoftmaxAttention"):
        another.step(tokens()[:, 0], state)
    model.step(tokens()[:, 0], state)  # its own model takes it


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_a_packed_call_over_no_position_is_empty(positions):
    cu_seqlens = torch.tensor([0])
    logits = language_model(positions=positions)(tokens(1, 0), cu_seqlens=cu_seqlens)
    assert logits.shape == (1, 0, VOCAB)
    classifier = SequenceClassifier(VOCAB, 3, dim=16, depth=1, positions=positions)
    assert classifier(tokens(1, 0), cu_seqlens=cu_seqlens).shape == (0, 3)


@pytest.mark.parametrize("mixer", ["softmax", "aft_local", "flash", "lightconv"])
def test_batched_left_padded_greedy_generation_equals_each_prompt_alone(mixer):
    model = language_model(mixer, **({"mixer_options": {"chunk_size": 4}} if mixer == "flash" else {}))
    prompts = [tokens(1, n, seed=n)[0] for n in (5, 2, 8)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, True
    together = model.generate(batch, 6, attention_mask=mask, temperature=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 6, temperature=0)
        assert torch.equal(together[row, width:], alone[0, len(prompt) :]), f"row {row}"
        assert torch.equal(model.generate(prompt[None], 6, top_k=1), alone)  # top_k=1 is greedy too


def test_prefill_in_one_call_equals_the_forward():
    model = language_model("aft_full")
    x = tokens(2, 9)
    state = model.init_state(2)
    with torch.no_grad():
        logits, state = model.step(x[:, :6], state)
        last, state = model.step(x[:, 6:], state)
        assert_close(torch.cat((logits, last), 1), model(x), 1e-5)


def test_eos_stops_each_row():
    model = language_model()
    prompt = tokens(3, 4)
    free = model.generate(prompt, 8, temperature=0)
    eos = int(free[0, 5])  # the first row's second new token
    stopped = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    for row in range(3):
        new = free[row, 4:].tolist()
        cut = new.index(eos) + 1 if eos in new else len(new)
        assert stopped[row, 4 : 4 + cut].tolist() == new[:cut]
        assert all(t == eos for t in stopped[row, 4 + cut :].tolist())
    assert stopped.shape[1] <= free.shape[1]


def test_top_p_keeps_the_nucleus_only():
    model = language_model()
    prompt = tokens(1, 4)
    with torch.no_grad():
        logits, _ = model.step(prompt, model.init_state(1))
    probabilities = logits[0, -1].softmax(-1)
    best = int(probabilities.argmax())
    nucleus = float(probabilities.max()) * 0.999  # only the most likely token reaches it
    seen = {
        int(model.generate(prompt, 1, top_p=nucleus, generator=torch.Generator().manual_seed(s))[0, -1])
        for s in range(20)
    }
    assert seen == {best}
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 1, top_p=0)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_compiled_decoding_from_a_fixed_capacity_state(positions):
    """torch.compile(model.step, fullgraph=True): no graph break (no host sync on the way: the token
    and length checks are bounded by the capacity), the eager logits, and no graph compiled after the
    second token; past the capacity → ValueError naming it."""
    model = language_model("softmax", positions=positions)
    prompt = tokens(2, 5)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model.step, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager_state, state = model.init_state(2), model.init_state(2, capacity=12)
        expected, eager_state = model.step(prompt, eager_state)
        logits, state = model.step(prompt, state)
        graphs = []
        for _ in range(7):
            token = expected[:, -1].argmax(-1) if expected.dim() == 3 else expected.argmax(-1)
            expected, eager_state = model.step(token, eager_state)
            logits, state = compiled(token, state)
            assert_close(logits, expected, 1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[-1] == graphs[1], graphs
        with pytest.raises(ValueError, match="capacity=12"):
            model.step(token, state)
