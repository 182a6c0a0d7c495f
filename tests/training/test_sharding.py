"""``train --fsdp`` (FSDP2) and ``--activation-checkpointing``: the same training as one plain process, on
2 CPU processes (gloo) under torchrun and in one; distributed checkpoints resumed at another world size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmix.cli import main
from tokenmix.models.backbone import set_activation_checkpointing
from tokenmix.models.language_model import LanguageModel
from tokenmix.training import evaluate, generate, train
from tokenmix.training.checkpoint import latest_checkpoint, read_json_lines
from tokenmix.training.sharding import is_distributed_checkpoint

from .conftest import TINY
from .test_trainer import assert_same_weights, interrupt_at, weights, without_timing

WORKER = Path(__file__).with_name("fsdp_worker.py")
pytestmark = pytest.mark.starts_first  # tests/conftest.py
# One evaluation per step, so every step's loss is compared. Softmax without q/k biases: see
# test_distributed.py (Adam turns a zero gradient's round-off into full-size steps).
STEPS = dict(TINY, steps=10, eval_every=1, eval_batches=1, grad_accum=2)
MIXERS = {
    "softmax": {"heads": 2, "bias": False},
    "flash": {"chunk_size": 8, "qk_dim": 16},
    "aft_local": {"window": 8, "max_len": 32, "bias_rank": 4},
    "dynamic_conv": {"heads": 2, "kernel_size": 5},
}
RESUMED = dict(STEPS, eval_every=5)  # a checkpoint at step 5, where the runs below are cut


def _config(mixer: str, out: Path, **extra) -> dict:
    return dict(STEPS, mixer=mixer, mixer_options=MIXERS[mixer], out=str(out), **extra)


def _torchrun(tmp_path: Path, jobs: list[dict]) -> None:
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), str(tmp_path / "jobs.json"),
    ]  # fmt: skip
    log = tmp_path / "torchrun.log"  # a file, not a pipe (a pipe stalled benchmarks/memory.py's ranks)
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, log.read_text()[-4000:]


def _assert_same_losses(one: list[dict], two: list[dict], tolerance: float) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(without_timing(one), without_timing(two), strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= tolerance, (a, b)
        assert abs(a["val_loss"] - b["val_loss"]) <= tolerance, (a, b)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun of 2 processes: each mixer trained with --fsdp; a run cut at step 6 (to be resumed
    in one process); a run cut in one process resumed in two."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    cut_in_one = tmp_path / "cut-in-one"
    train(
        dict(RESUMED, mixer_options=MIXERS["softmax"], fsdp=True, out=str(cut_in_one)),
        on_step=interrupt_at(6),
    )
    jobs = [{"config": _config(mixer, tmp_path / mixer, fsdp=True)} for mixer in MIXERS]
    jobs.append(
        {
            "config": dict(
                RESUMED, mixer_options=MIXERS["softmax"], fsdp=True, out=str(tmp_path / "cut-in-two")
            ),
            "stop_at": 6,
        }
    )
    jobs.append(
        {
            "config": dict(
                RESUMED, mixer_options=MIXERS["softmax"], fsdp=True, resume=True, out=str(cut_in_one)
            )
        }
    )
    _torchrun(tmp_path, jobs)
    return tmp_path


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_two_sharded_processes_equal_one_plain_process(two_processes, tmp_path, mixer):
    one = train(_config(mixer, tmp_path / "one"))
    two = read_json_lines(two_processes / mixer / "metrics.jsonl")
    assert len(two) == 10
    _assert_same_losses(one, two, 1e-5)
    # AFT's key bias is invisible (a softmax over positions of k + w): its gradient is round-off, which
    # Adam scales to full-size steps that differ between one and two processes.
    ours, theirs = weights(tmp_path / "one"), weights(two_processes / mixer)
    blind = [name for name in ours if mixer.startswith("aft") and name.endswith("to_k.bias")]
    for name in blind:
        del ours[name], theirs[name]
    assert_same_weights(ours, theirs, exact=False)


@pytest.mark.parametrize("cut", ["cut-in-two", "cut-in-one"])
def test_a_sharded_run_resumes_at_another_world_size(two_processes, tmp_path, cut):
    """Stopped at step 6 (its checkpoint there) by one world size and finished by the other: the loss
    curve of a run never cut, by one plain process."""
    full = train(dict(RESUMED, mixer_options=MIXERS["softmax"], out=str(tmp_path / "full")))
    run = two_processes / cut
    if cut == "cut-in-two":  # written by two processes, finished here by one
        assert is_distributed_checkpoint(latest_checkpoint(run))
        assert latest_checkpoint(run).name == "step-00000006"  # the stop's own checkpoint
        train(dict(RESUMED, mixer_options=MIXERS["softmax"], fsdp=True, resume=True, out=str(run)))
    _assert_same_losses(full, read_json_lines(run / "metrics.jsonl"), 1e-5)


def test_eval_generate_and_export_read_a_sharded_run(two_processes, tmp_path):
    run = two_processes / "softmax"
    scores = evaluate(run, "val", weights="last", max_batches=1)
    assert scores["val_loss"] == pytest.approx(
        read_json_lines(run / "metrics.jsonl")[-1]["val_loss"], abs=1e-5
    )
    assert isinstance(generate(run, "ab", max_new_tokens=3, weights="last"), str)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_fsdp_in_one_process_without_torchrun_trains_as_plain(tmp_path):
    plain = train(_config("flash", tmp_path / "plain", steps=4))
    sharded = train(_config("flash", tmp_path / "sharded", steps=4, fsdp=True))
    _assert_same_losses(plain, sharded, 0.0)  # one process: the same arithmetic
    assert is_distributed_checkpoint(latest_checkpoint(tmp_path / "sharded"))
    assert not torch.distributed.is_initialized()  # the group it made for itself is gone


def test_resuming_with_another_sharding_or_another_models_checkpoint_is_one_line(tmp_path, capsys):
    config = _config("softmax", tmp_path / "a", steps=2, eval_every=2, fsdp=True)
    train(config)
    assert main(["train", "--out", str(tmp_path / "a"), "--resume", "--steps", "2", "--eval-every", "2",
                 "--mixer-opt", "heads=2", "--mixer-opt", "bias=False", "--dim", "32", "--depth", "2",
                 "--seq-len", "32", "--batch-size", "8", "--eval-batches", "1", "--warmup-steps", "3",
                 "--grad-accum", "2"]) == 2  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "fsdp: True != False" in error, error
    other = tmp_path / "b"
    train(dict(config, dim=16, steps=4, out=str(other)), on_step=interrupt_at(2))
    theirs, ours = latest_checkpoint(tmp_path / "a"), latest_checkpoint(other)
    shutil.rmtree(ours)
    shutil.copytree(theirs, ours)  # another model's checkpoint where this run's was
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    capsys.readouterr()
    arguments = ["train", "--out", str(other), "--resume", "--fsdp", "--steps", "4", "--eval-every", "2",
                 "--mixer-opt", "heads=2", "--mixer-opt", "bias=False", "--dim", "16", "--depth", "2",
                 "--seq-len", "32", "--batch-size", "8", "--eval-batches", "1", "--warmup-steps", "3",
                 "--grad-accum", "2"]  # fmt: skip
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "does not fit this model" in error, error
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    # Issue 38.10: this run's own checkpoint with a shard cut short is damaged, not another model's.
    shutil.rmtree(ours)
    train(dict(config, dim=16, steps=4, out=str(tmp_path / "c")), on_step=interrupt_at(2))
    shutil.copytree(latest_checkpoint(tmp_path / "c"), ours)
    shard = next(ours.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is damaged: its .distcp shards" in error, error


def _gradients(model: torch.nn.Module, tokens: torch.Tensor, recompute: bool) -> dict[str, torch.Tensor]:
    set_activation_checkpointing(model, recompute)
    model.zero_grad()
    torch.manual_seed(1)  # dropout's masks: drawn again, the same, in the recomputation
    model(tokens).logsumexp(-1).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_activation_checkpointing_gives_the_same_gradients(mixer):
    torch.manual_seed(0)
    options = {k: v for k, v in MIXERS[mixer].items() if k != "bias"}
    model = LanguageModel(50, 32, 2, mixer, mixer_options=options, dropout=0.1, max_len=32)
    tokens = torch.randint(0, 50, (2, 32))
    plain, recomputed = _gradients(model, tokens, False), _gradients(model, tokens, True)
    for name, gradient in plain.items():
        torch.testing.assert_close(recomputed[name], gradient, rtol=0, atol=1e-6, msg=name)


def test_activation_checkpointing_keeps_only_the_blocks_inputs():
    """What autograd saves for the backward pass, counted: with recomputation, each block's input (and the
    layers outside the blocks); without, every block's intermediate activations."""
    model = LanguageModel(50, 32, 4, "softmax", mixer_options={"heads": 2}, max_len=64)
    tokens = torch.randint(0, 50, (2, 64))

    def saved_bytes(recompute: bool) -> int:
        set_activation_checkpointing(model, recompute)
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if not isinstance(tensor, torch.nn.Parameter) and tensor.untyped_storage().nbytes():
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        weights_bytes = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(size for pointer, size in storages.items() if pointer not in weights_bytes)

    assert saved_bytes(True) < 0.5 * saved_bytes(False)
