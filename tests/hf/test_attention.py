"""tokenmix's attention functions inside a transformers model (tokenmix.hf.attention): a Llama built from
scratch with attn_implementation="tokenmix_*" attends as the float64 equation over the very mask
transformers built (causal, left padding, grouped-query attention, the KV cache), trains with Trainer,
and generates the same with its KV cache as without."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmix.errors import InvalidTypeError, InvalidValueError, UnavailableError  # noqa: E402
from tokenmix.functional import ACTIVATIONS, pointwise_attention  # noqa: E402
from tokenmix.hf import register_attention  # noqa: E402
from tokenmix.hf.attention import ATTENTION_FUNCTIONS  # noqa: E402

NAMES = register_attention()
CASES = {
    "tokenmix_pointwise": {},
    "tokenmix_pointwise-relu2-half-qknorm": {"activation": "relu2", "alpha": 0.5, "qk_norm": True},
    "tokenmix_pointwise-length": {"activation": "gelu", "length": 16},
    "tokenmix_softmax": {},
    "tokenmix_softmax-qknorm": {"qk_norm": True},
    "tokenmix_aft_simple": {},
}


def rms(x):
    """x over its root mean square across the head (eps 1e-6): the parameter-free qk-norm."""
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def oracle(implementation, q, k, v, allowed, scale, options):
    """The float64 equation over an explicit (B, Q, K) boolean mask; q (B, H, Q, D), k, v (B, H, K, D)."""
    q, k, v = q.double(), k.double(), v.double()
    if options.get("qk_norm"):
        q, k = rms(q), rms(k)
    allowed = allowed[:, None]  # (B, 1, Q, K)
    if implementation == "tokenmix_aft_simple":  # per channel of the flattened heads
        weights = torch.where(allowed[..., None], k.exp()[:, :, None], 0.0)  # (B, H, Q, K, D)
        return q.sigmoid() * (weights * v[:, :, None]).sum(3) / weights.sum(3)
    scores = scale * q @ k.transpose(-1, -2)
    if implementation == "tokenmix_softmax":
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    phi = ACTIVATIONS[options.get("activation", "relu")].forward
    count = allowed.sum(-1, keepdim=True).double() if options.get("length") is None else options["length"]
    weights = torch.where(allowed, phi(scores), 0.0)
    return (weights @ v) * torch.as_tensor(count).clamp_min(1) ** -options.get("alpha", 1.0)


def tiny_llama(implementation, options, **overrides):
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=implementation,
        pad_token_id=0, **overrides,
    )  # fmt: skip
    config.tokenmix_attention = options
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def spy():
    """Records every call of the registered functions: (name, module, query, key, value, mask, out)."""
    from transformers import AttentionInterface

    calls = []
    for name, function in ATTENTION_FUNCTIONS.items():

        def recording(module, query, key, value, attention_mask, *args, _f=function, _n=name, **kwargs):
            out = _f(module, query, key, value, attention_mask, *args, **kwargs)
            calls.append((_n, module, query, key, value, attention_mask, out[0]))
            return out

        AttentionInterface.register(name, recording)
    yield calls
    register_attention()


def allowed_from(mask, queries, keys, batch):
    """transformers' mask as (B, Q, K) booleans; None is SDPA's causal (upper-left) or every key."""
    if mask is not None:
        return mask[:, 0]
    causal = torch.ones(queries, keys, dtype=torch.bool).tril()
    return (causal if queries > 1 else torch.ones(1, keys, dtype=torch.bool)).expand(batch, -1, -1)


def check_calls(calls, options):
    assert calls
    for name, module, query, key, value, mask, out in calls:
        groups = query.shape[1] // key.shape[1]
        assert groups == 2  # grouped-query attention: 4 query heads over 2 key/value heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        allowed = allowed_from(mask, query.shape[2], key.shape[2], query.shape[0])
        want = oracle(name, query, key, value, allowed, module.scaling, options).transpose(1, 2)
        rows = allowed.any(-1)  # a query that sees no key (left padding) is unspecified but finite
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[rows].double(), want[rows], rtol=1e-5, atol=1e-5)
        if name == "tokenmix_pointwise" and mask is not None and query.shape[2] == key.shape[2]:
            # the same as tokenmix's own op, causal over the left-padded keys
            q, k = (rms(query), rms(key)) if options.get("qk_norm") else (query, key)
            op_options = {name: value for name, value in options.items() if name != "qk_norm"}
            ours = pointwise_attention(
                q, k, value, causal=True, attention_mask=mask[:, 0, -1], scale=module.scaling, **op_options
            )
            torch.testing.assert_close(out[rows], ours.transpose(1, 2)[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_a_llama_attends_as_the_equation_with_padding_gqa_and_the_cache(case, spy):
    implementation, options = case.split("-")[0], CASES[case]
    model = tiny_llama(implementation, options)
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        model(ids, attention_mask=mask)
        check_calls(spy, options)
        spy.clear()
        greedy = {
            "max_new_tokens": 4,
            "do_sample": False,
            "return_dict_in_generate": True,
            "output_scores": True,
        }
        cached = model.generate(ids, attention_mask=mask, **greedy)
        check_calls(spy, options)
        assert any(call[2].shape[2] == 1 < call[3].shape[2] for call in spy)  # steps over the cache
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **greedy)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-4)


def test_a_static_cache_generates_as_the_dynamic_one():
    model = tiny_llama("tokenmix_pointwise", {})
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        static = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                cache_implementation="static")  # fmt: skip
    assert torch.equal(dynamic, static)


def test_bidirectional_layers_attend_to_every_real_key():
    module = torch.nn.Module()
    module.is_causal, module.scaling = False, 0.25
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    padding = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    mask = sdpa_mask(batch_size=2, q_length=6, kv_length=6, mask_function=bidirectional_mask_function,
                     attention_mask=padding)  # fmt: skip
    for name in NAMES:
        out = ATTENTION_FUNCTIONS[name](module, q, k, v, mask, scaling=0.25)[0]
        want = oracle(name, q, k, v, mask[:, 0], 0.25, {}).transpose(1, 2)
        assert torch.isfinite(out).all()  # padded queries: unspecified but finite, as tokenmix's ops
        torch.testing.assert_close(out[padding], want[padding], rtol=1e-10, atol=1e-10)


def test_trainer_runs_a_few_steps(tmp_path):
    model = tiny_llama("tokenmix_pointwise", {"alpha": 1.0}).train()
    ids = torch.randint(1, 50, (8, 12), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    result = transformers.Trainer(model=model, args=arguments, train_dataset=data).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_what_tokenmix_attention_cannot_serve_is_refused_naming_it():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    window = sdpa_mask(batch_size=1, q_length=6, kv_length=6, allow_is_causal_skip=False,
                       mask_function=sliding_window_causal_mask_function(2))  # fmt: skip
    with pytest.raises(UnavailableError, match="sliding"):
        ATTENTION_FUNCTIONS["tokenmix_pointwise"](module, q, k, v, window)
    with pytest.raises(InvalidValueError, match="dropout"):
        ATTENTION_FUNCTIONS["tokenmix_softmax"](module, q, k, v, None, dropout=0.1)
    with pytest.raises(InvalidTypeError, match="SDPA mask"):
        ATTENTION_FUNCTIONS["tokenmix_softmax"](module, q, k, v, torch.zeros(1, 1, 6, 6))
    module.is_causal = False
    with pytest.raises(UnavailableError, match="cross-attention"):
        ATTENTION_FUNCTIONS["tokenmix_softmax"](module, q, k[:, :, :4], v[:, :, :4], None)
    module.config = transformers.PretrainedConfig()
    module.config.tokenmix_attention = {"alpha": 1.0}
    with pytest.raises(InvalidTypeError, match="alpha"):
        ATTENTION_FUNCTIONS["tokenmix_softmax"](module, q, k, v, None)
    module.config.tokenmix_attention = {"activation": "tanh"}
    with pytest.raises(InvalidValueError, match="activation"):
        ATTENTION_FUNCTIONS["tokenmix_pointwise"](module, q, k, v, None)


def test_a_saved_model_loads_running_the_same_attention_with_its_options(tmp_path):
    """Issue 38.9: saved and loaded, a tokenmix_pointwise Llama came back as SDPA with its options
    ignored (logits 0.54 apart) unless attn_implementation was passed again."""
    options = {"activation": "relu2", "alpha": 0.5}
    model = tiny_llama("tokenmix_pointwise", options)
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config._attn_implementation == "tokenmix_pointwise"
    assert loaded.config.tokenmix_attention == options
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)
    chosen = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="sdpa")
    assert chosen.config._attn_implementation == "sdpa"  # what the caller passes still wins
