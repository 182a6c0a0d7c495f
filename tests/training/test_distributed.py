"""DDP on 2 CPU processes (gloo) under torchrun: same steps on the same examples as one process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmix.training import train
from tokenmix.training.checkpoint import read_json_lines

from .conftest import TINY
from .test_trainer import assert_same_weights, interrupt_at, weights, without_timing

# Without q/k biases: softmax is blind to the key bias, and Adam turns that bias's zero gradient's
# round-off into full-size steps that would differ between one and two processes.
DDP = dict(TINY, grad_accum=2, mixer_options={"heads": 2, "bias": False})


def torchrun(tmp_path, out, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "tokenmix", "train", "--out", str(out), "--progress", "log",
        "--mixer", "softmax", "--mixer-opt", "heads=2", "--mixer-opt", "bias=False",
        "--dim", "32", "--depth", "2", "--seq-len", "32", "--batch-size", "8", "--steps", "12",
        "--eval-every", "5", "--eval-batches", "2", "--warmup-steps", "3", "--grad-accum", "2", *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("pack", [False, True])
def test_two_processes_equal_one(tmp_path, pack, bpe_data):
    # Packed: on a prepared BPE dataset, which both ranks map (the raw path's batches are the same).
    data = {"data": str(bpe_data)} if pack else {}
    one = train(dict(DDP, pack=pack, out=str(tmp_path / "one"), **data))
    extra = ["--pack", "--data", str(bpe_data)] if pack else []
    result = torchrun(tmp_path, tmp_path / "two", *extra)
    assert result.stdout.count('"step": 12') == 1  # only rank 0 reports
    two = read_json_lines(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(without_timing(one), without_timing(two), strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 and abs(a["train_loss"] - b["train_loss"]) < 1e-4
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), exact=False)


def test_a_run_stopped_in_one_process_resumes_under_ddp(tmp_path):
    full = tmp_path / "full"
    train(dict(DDP, out=str(full)))
    cut = tmp_path / "cut"
    train(dict(DDP, out=str(cut)), on_step=interrupt_at(7))
    torchrun(tmp_path, cut, "--resume")
    assert_same_weights(weights(cut), weights(full), exact=False)


def test_a_time_budget_is_planned_alike_on_every_rank(tmp_path):
    """Each rank times its own steps; the plan is the slowest rank's (``World.max``), so that no rank
    stops a step before the others (which would leave them waiting on a collective)."""
    # Far more steps than 0.5 s holds (12 did on a slow day: the plan then stayed 12, and the check that
    # the budget set it could not tell).
    many = ["--steps", "100000", "--eval-every", "100000"]
    torchrun(tmp_path, tmp_path / "run", "--time-budget", "0.5", *many)
    records = read_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["planned_steps"] == records[-1]["step"] < 100000
    assert 0.4 < records[-1]["trained_seconds"] < 1.5  # the budget, give or take the last step
