"""tokenmix in Hugging Face transformers: exported runs load through the Auto classes and agree with
tokenmix — logits, greedy generation (alone and batched with left padding), save/load — the byte
tokenizer round-trips any text, and transformers' Trainer trains the model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenmix.hf  # noqa: E402
from tokenmix.cli import main  # noqa: E402
from tokenmix.errors import InvalidValueError  # noqa: E402
from tokenmix.hf.export import export_run  # noqa: E402
from tokenmix.training import load_run, train  # noqa: E402

RUNS = {
    "softmax-rope": {"mixer": "softmax", "positions": "rope", "mixer_options": {"heads": 2}},
    "flash": {"mixer": "flash", "positions": "rope", "mixer_options": {"chunk_size": 8, "qk_dim": 8}},
    "aft_local": {"mixer": "aft_local", "mixer_options": {"window": 4}},
    "dynamic_conv": {"mixer": "dynamic_conv", "mixer_options": {"kernel_size": 3}},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (run directory, exported directory) for a few steps of `tokenmix train` per mixer."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, options in RUNS.items():
        run = root / name
        config = {
            "dim": 32, "depth": 2, "seq_len": 32, "batch_size": 4, "steps": 4, "eval_every": 2,
            "eval_batches": 1, "warmup_steps": 1, "progress": "log", "out": str(run), **options,
        }  # fmt: skip
        train(config)
        out[name] = (run, export_run(run, root / f"{name}-hf"))
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_an_exported_run_loads_through_the_auto_classes_and_agrees(exported, name):
    run, directory = exported[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == "TokenmixForCausalLM" and type(tokenizer).__name__ == "ByteTokenizer"
    _, _, ours = load_run(run)
    batch = tokenizer(["Call me Ishmael.", "It was"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        alone = ours(ids[:1])
        torch.testing.assert_close(model(ids[:1]).logits, alone, rtol=1e-5, atol=1e-5)
        # greedy generate equals tokenmix's greedy decoding, token for token
        generated = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
        assert torch.equal(generated, ours.generate(ids[:1], 12, temperature=0))
        # batched, left-padded: each row as if alone
        together = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for row in range(2):
            real = ids[row, mask[row].bool()][None]
            single = model.generate(real, max_new_tokens=8, do_sample=False)
            assert torch.equal(together[row, ids.shape[1] :], single[0, real.shape[1] :]), row


def test_save_and_load_are_exact_and_the_tokenizer_round_trips(exported, tmp_path):
    _, directory = exported["aft_local"]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    text = "naïve café — 東京 ✓ 🐋"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text


def test_labels_give_the_next_token_loss_and_the_trainer_trains(exported, tmp_path):
    _, directory = exported["softmax-rope"]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(2)] * 4
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", use_cpu=True, learning_rate=1e-3, logging_steps=1,
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    result = transformers.Trainer(model=model, args=arguments, train_dataset=data).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_export_refuses_a_directory_in_use_and_names_it(exported, tmp_path, capsys):
    run, _ = exported["aft_local"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", "--run", str(run), "--out", str(taken)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "new"), "--weights", "last"]) == 0
    assert (tmp_path / "new" / "config.json").is_file()


def tiny_model(mixer="softmax", positions="learned", **options):
    config = tokenmix.hf.TokenmixConfig(
        dim=32, depth=2, mixer=mixer, positions=positions, max_len=64, pad_token_id=0, mixer_options=options
    )
    torch.manual_seed(0)
    return tokenmix.hf.TokenmixForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("mixer", "positions", "options"),
    [("softmax", "learned", {"heads": 2}), ("aft_full", "none", {}), ("aft_local", "learned", {"window": 4})],
)
def test_a_left_padded_forward_equals_the_row_alone_and_its_decoding(mixer, positions, options):
    model = tiny_model(mixer, positions, **options)
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 4:]).logits
        decoded = model(ids, attention_mask=mask, use_cache=True).logits
    torch.testing.assert_close(padded[1, 4:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1, 4:], decoded[1, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[0], model(ids[:1]).logits[0], rtol=1e-5, atol=1e-5)


def test_generate_without_the_cache_equals_generate_with_it_and_runs_the_forward(monkeypatch):
    model = tiny_model("aft_full")
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    steps = []
    original = model.model.step
    monkeypatch.setattr(model.model, "step", lambda *a, **k: steps.append(1) or original(*a, **k))
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False)
    assert not steps  # use_cache=False is the forward, every step
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mixer", ["softmax", "flash", "aft_local", "lightconv"])
def test_beam_search_with_the_cache_gives_the_beams_of_the_forward(mixer):
    """Issue 38.8: beam search reorders the mixers' states (TokenmixState.reorder_cache → select)."""
    model = tiny_model(mixer)
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    options = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "num_beams": 3}
    options.update(num_return_sequences=3, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(ids, **options)
    uncached = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-4, atol=1e-4)
    assert len({tuple(row) for row in cached.sequences[:3].tolist()}) == 3  # three different beams


def test_prompts_generate_cannot_continue_are_refused_naming_the_row():
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    right = torch.ones_like(ids)
    right[1, 3:] = 0
    with pytest.raises(InvalidValueError, match="row 1 of the prompt ends in padding"):
        model.generate(ids, attention_mask=right, max_new_tokens=2)
    empty = torch.ones_like(ids)
    empty[0] = 0
    with pytest.raises(InvalidValueError, match="row 0 of the prompt has no real token"):
        model.generate(ids, attention_mask=empty, max_new_tokens=2)
    with pytest.raises(InvalidValueError, match="at least one token"):
        model.generate(ids[:, :0], max_new_tokens=2)
    with pytest.raises(InvalidValueError, match="no position to predict"):
        model(ids, labels=torch.full_like(ids, -100))


def test_the_token_embeddings_resize():
    model = tiny_model()
    model.resize_token_embeddings(260)
    assert model.config.vocab_size == 260 and model.get_output_embeddings().weight.shape == (260, 32)
    logits = model(torch.tensor([[259, 3]])).logits
    assert logits.shape == (1, 2, 260)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def test_an_export_pads_with_the_tokenizers_pad_and_refuses_runs_whose_tokens_are_not_bytes(
    exported, tmp_path, capsys
):
    _, directory = exported["flash"]
    config = transformers.AutoConfig.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert config.pad_token_id == tokenizer.pad_token_id == 0
    run = tmp_path / "mqar"
    train({"task": "mqar", "mixer": "softmax", "dim": 16, "depth": 1, "seq_len": 32, "batch_size": 4,
           "steps": 1, "eval_every": 1, "eval_batches": 1, "progress": "log", "out": str(run)})  # fmt: skip
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "'mqar' run, whose tokens are not text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_through_symlinks(exported, tmp_path, capsys):
    run, _ = exported["aft_local"]
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(["export", "--run", str(run), "--out", str(link)]) == 0
    assert link.is_symlink() and (target / "config.json").is_file()  # written where the link points
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(dangling)]) == 2
    assert "symlink to nothing" in capsys.readouterr().err
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
