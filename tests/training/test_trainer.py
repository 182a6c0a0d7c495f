from __future__ import annotations

import itertools
import json
import math
import os
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tokenmix.data.tokenizer import BPETokenizer
from tokenmix.training import TrainConfig, evaluate, generate, load_run, train
from tokenmix.training.checkpoint import latest_checkpoint
from tokenmix.training.trainer import lr_factor

from .conftest import TINY


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def interrupt_at(stop_step: int, signum: int = signal.SIGINT):
    def on_step(step: int) -> None:
        if step == stop_step:
            os.kill(os.getpid(), signum)

    return on_step


def test_loss_falls_on_the_embedded_corpus(trained_run):
    out, records = trained_run
    assert [r["step"] for r in records] == [50, 100, 150, 200]
    for record in records:
        assert {"step", "train_loss", "val_loss", "val_bpc"} <= record.keys()
        assert record["val_bpc"] == pytest.approx(record["val_loss"] / math.log(2))
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.15  # still falling after step 50
    assert records[-1]["val_bpc"] < 4.0  # uniform is 8 bits per byte; byte frequencies alone give ≈ 4.4
    saved = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved == records
    assert TrainConfig.load(out).steps == 200


def test_evaluate_reproduces_the_logged_validation_loss(trained_run):
    out, records = trained_run
    config = TrainConfig.load(out)
    scores = evaluate(out, "val", weights="last", device="cpu", max_batches=config.eval_batches)
    assert scores["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)
    test = evaluate(out, device="cpu")
    assert test["split"] == "test" and test["test_bpc"] == pytest.approx(test["test_loss"] / math.log(2))
    assert test["test_bpc"] < 5


def test_best_weights_are_those_of_the_lowest_validation_loss(tmp_path):
    records = train(dict(TINY, out=str(tmp_path), lr=3e-2, steps=15))  # a high lr makes the loss bounce
    best = min(records, key=lambda r: r["val_loss"])
    with safe_open(str(tmp_path / "model-best.safetensors"), "pt") as handle:
        assert int(handle.metadata()["step"]) == best["step"]


def test_generate_decodes_through_the_states_and_matches_the_full_forward(trained_run):
    out, _ = trained_run
    text = generate(out, "Call me ", 24, temperature=0, device="cpu")
    assert text.startswith("Call me ") and len(text.encode()) >= len("Call me ")
    # Greedy decoding token by token must agree with greedy decoding by re-running the full forward.
    _, _, model = load_run(out, device="cpu")
    tokens = torch.tensor([list(b"Call me ")])
    with torch.no_grad():
        for _ in range(24):
            tokens = torch.cat((tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert text == bytes(tokens[0].tolist()).decode("utf-8", errors="replace")
    sampled = {generate(out, "The ", 16, seed=seed, device="cpu") for seed in range(3)}
    assert len(sampled) > 1  # sampling depends on the seed


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_a_stop_is_bit_exact(tmp_path, signum):
    # Dropout and accumulation make the check cover the RNG state and the micro-batch split.
    config = dict(TINY, dropout=0.1, grad_accum=2, mixer="aft_local", mixer_options={"window": 4})
    full = train(dict(config, out=str(tmp_path / "full")))
    before = signal.getsignal(signum)
    stopped = train(dict(config, out=str(tmp_path / "cut")), on_step=interrupt_at(7, signum))
    assert signal.getsignal(signum) is before  # handlers are restored
    assert [r["step"] for r in stopped] == [5]
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000007"
    resumed = train(dict(config, out=str(tmp_path / "cut"), resume=True))
    assert without_timing(resumed) == without_timing(full)
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "full"))


def test_a_checkpoint_killed_mid_write_never_replaces_the_good_one(tmp_path, monkeypatch):
    from tokenmix.training import checkpoint

    run = tmp_path / "run"
    config = dict(TINY, steps=10, out=str(run))
    real_save = torch.save

    def dies_at_step_10(state, path):
        if state["step"] == 10:
            path.write_bytes(b"half a file")
            raise OSError("killed mid-write")
        real_save(state, path)

    monkeypatch.setattr(checkpoint.torch, "save", dies_at_step_10)
    with pytest.raises(OSError, match="killed mid-write"):
        train(config)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    good = latest_checkpoint(run)
    assert good.name == "step-00000005"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step-00000005"]
    assert torch.load(good / "trainer.pt", weights_only=True)["step"] == 5
    resumed = train(dict(config, resume=True))
    full = train(dict(config, out=str(tmp_path / "full")))
    assert without_timing(resumed) == without_timing(full)
    assert_same_weights(weights(run), weights(tmp_path / "full"))


def test_resume_refuses_a_different_configuration_and_damages_nothing(tmp_path):
    run = tmp_path / "run"
    train(dict(TINY, steps=5, out=str(run)))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"different configuration \(dim: 32 != 48"):
        train(dict(TINY, steps=5, dim=48, out=str(run), resume=True))
    with pytest.raises(FileExistsError, match="already holds a training run; pass --resume"):
        train(dict(TINY, steps=5, out=str(run)))
    with pytest.raises(FileNotFoundError, match="holds no training run"):
        train(dict(TINY, out=str(tmp_path / "empty"), resume=True))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # A resume may move the run to another device or turn on compilation: those are not differences.
    assert not TrainConfig(**dict(TINY, device="cpu")).differences(TrainConfig(**TINY))


def test_bad_configuration_is_named(tmp_path):
    with pytest.raises(
        ValueError, match="batch_size=10 must be divisible by data-parallel processes × grad_accum"
    ):
        train(dict(TINY, batch_size=10, grad_accum=4, out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(task="speech")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"stpes": 3})
    for budget in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="time_budget must be a finite number of seconds > 0"):
            TrainConfig(time_budget=budget)
    with pytest.raises(ValueError, match="pack applies to the charlm task"):
        TrainConfig(task="mqar", pack=True)
    assert not (tmp_path / "a").exists()


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(s, config) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(55, config) == pytest.approx(0.55)
    assert lr_factor(100, config) == pytest.approx(0.1)
    factors = [lr_factor(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_packed_training_on_prepared_bpe_resumes_bit_exact_evaluates_and_generates(tmp_path, bpe_data):
    """--pack on a prepared BPE dataset: batches stay a pure function of (seed, step), so a stopped run
    resumes bit-exactly; the evaluation reproduces the logged validation loss on the packed validation
    rows; generation decodes through the run's tokenizer as greedy full forwards do."""
    config = dict(TINY, pack=True, grad_accum=2, mixer="aft_simple", mixer_options={}, data=str(bpe_data))
    full = train(dict(config, out=str(tmp_path / "full")))
    assert all(math.isfinite(r["val_loss"]) for r in full)
    train(dict(config, out=str(tmp_path / "cut")), on_step=interrupt_at(7))
    resumed = train(dict(config, out=str(tmp_path / "cut"), resume=True))
    assert without_timing(resumed) == without_timing(full)
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "full"))
    scores = evaluate(tmp_path / "full", "val", weights="last", device="cpu", max_batches=2)
    assert scores["val_loss"] == pytest.approx(full[-1]["val_loss"], rel=1e-5)
    tokenizer = BPETokenizer.load(tmp_path / "full" / "tokenizer.json")  # the run keeps its tokenizer
    # Bits per byte: the loss summed over the targets, over the bytes of text they decode to.
    targets = torch.cat(
        [batch[1].flatten() for batch in load_run(tmp_path / "full")[1].eval_batches("val", 2)]
    )
    counted = targets[targets != -100].tolist()
    per_byte = scores["val_loss"] * len(counted) / len(tokenizer.decode(counted)) / math.log(2)
    assert scores["val_bpc"] == pytest.approx(per_byte, rel=1e-6) and per_byte < scores[
        "val_loss"
    ] / math.log(2)
    text = generate(tmp_path / "full", "Call me Ishmaël", 12, temperature=0, weights="last", device="cpu")
    _, _, model = load_run(tmp_path / "full", weights="last", device="cpu")
    tokens = torch.from_numpy(tokenizer.encode("Call me Ishmaël".encode()))[None]
    with torch.no_grad():
        for _ in range(12):
            tokens = torch.cat((tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert text == tokenizer.decode(tokens[0].tolist()).decode("utf-8", errors="replace")
    assert text.startswith("Call me Ishmaël") and model.vocab_size == 512


def test_packed_rows_are_predicted_document_by_document():
    """forward_rows on packed rows equals each document alone: no document sees another."""
    from tokenmix.data.documents import cu_seqlens_of
    from tokenmix.models import LanguageModel
    from tokenmix.training.trainer import forward_rows

    torch.manual_seed(0)
    model = LanguageModel(256, 16, depth=1, max_len=8).double().eval()
    inputs = torch.randint(0, 256, (2, 8))
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    logits = forward_rows(model, inputs, segments)
    bounds = cu_seqlens_of(segments).tolist()
    flat_inputs, flat_logits = inputs.reshape(-1), logits.reshape(16, -1)
    for start, end in itertools.pairwise(bounds):
        alone = model(flat_inputs[None, start:end])[0]
        torch.testing.assert_close(flat_logits[start:end], alone, rtol=1e-10, atol=1e-10)


def test_weight_decay_leaves_gains_offsets_and_position_tables_alone():
    """Issue 37.7: GAU/FLASH's γ and β (2-D) were decayed towards 0, as were AFT's position tables and the
    learned positions; the rule is now what each parameter is, marked where it is made."""
    from tokenmix.models import LanguageModel, VisionTransformer
    from tokenmix.training.trainer import build_optimizer

    model = LanguageModel(
        50, 16, depth=4, max_len=16, mixer=["gau", "flash", "aft_full", "aft_local"],
        layer_options=[{}, {"chunk_size": 4}, {"max_len": 16}, {"max_len": 16, "window": 3, "bias_rank": 2}],
    )  # fmt: skip
    vit = VisionTransformer(
        image_size=8, patch_size=2, dim=16, depth=1, mixer="softmax", num_classes=3, pool="cls"
    )
    config = TrainConfig(weight_decay=0.1)
    for net in (model, vit):
        decayed, kept = build_optimizer(net, config).param_groups
        assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
        names = {id(p): name for name, p in net.named_parameters()}
        kept_names = {names[id(p)] for p in kept["params"]}
        decayed_names = {names[id(p)] for p in decayed["params"]}
        assert kept_names | decayed_names == set(names.values()) and not kept_names & decayed_names
        assert all(p.dim() >= 2 for p in decayed["params"])
        assert "backbone.position_embedding.weight" in kept_names
    assert (
        "cls_token" in kept_names
    )  # the VisionTransformer's, from the loop's last pass and "patch_embedding.weight" in decayed_names
    decayed, kept = build_optimizer(model, config).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    kept_names = {names[id(p)] for p in kept["params"]}
    for expected in ("blocks.0.mixer.gamma", "blocks.1.mixer.beta", "blocks.2.mixer.bias.u",
                     "blocks.3.mixer.bias.u", "blocks.3.mixer.bias.v"):  # fmt: skip
        assert f"backbone.{expected}" in kept_names, (expected, sorted(kept_names))
    assert "backbone.blocks.0.mixer.to_uvz.weight" not in kept_names


def test_a_time_budget_fills_its_seconds_whatever_the_first_plan(tmp_path, paced_steps):
    """Issue 37.4: the steps are re-planned at the pace the run trains, so a first plan set from a timing
    that did not hold (here 30 steps, where a step takes 0.1 s, then 0.2 s from step 5) still trains for
    the budget, and the schedule ends where the run does."""
    paced_steps["*"] = lambda step: 0.1 if step < 5 else 0.2
    config = dict(TINY, steps=30, eval_every=4, time_budget=2.0, out=str(tmp_path / "run"))
    records = train(config)
    # 5 steps of 0.1 s, then 0.2 s a step: 0.5 + 7 × 0.2 = 1.9 s at step 12, 2.1 s at 13
    assert records[-1]["step"] in (12, 13)
    assert records[-1]["planned_steps"] == records[-1]["step"]
    assert records[-1]["trained_seconds"] == pytest.approx(2.0, abs=0.2)  # within a step of it
    assert [r["planned_steps"] for r in records][:1] == [20]  # 4 steps of 0.1 s: 2.0 s fill 20
    assert records[-1]["lr"] == pytest.approx(TrainConfig().lr * TrainConfig().min_lr_ratio)
    # The caller's configuration is left as given; the run's own keeps the first plan.
    assert config["steps"] == 30 and TrainConfig.load(tmp_path / "run").steps == 30


def test_a_time_budget_is_resumed_with_its_plan_and_seconds(tmp_path, paced_steps):
    paced_steps["*"] = 0.125  # exact in binary: the clock's sums are the same whichever way taken
    config = dict(TINY, steps=30, eval_every=4, time_budget=1.875, out=str(tmp_path / "full"))
    full = train(config)
    assert full[-1]["step"] == 15
    cut = dict(config, out=str(tmp_path / "cut"))
    assert [r["step"] for r in train(cut, on_step=interrupt_at(6))] == [4]
    resumed = train(dict(cut, resume=True))
    assert without_timing(resumed) == without_timing(full)
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "full"))
