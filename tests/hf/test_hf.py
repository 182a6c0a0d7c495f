"""tokenmix in Hugging Face transformers: exported runs load through the Auto classes and agree with
tokenmix — logits, greedy generation (alone and batched with left padding), save/load — the byte
tokenizer round-trips any text, and transformers' Trainer trains the model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmix.cli import main  # noqa: E402
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
