"""``train --context-parallel`` under torchrun on CPU processes (gloo): each sequence split over the
ranks (docs/spec.md §14), the run follows one process's losses (≤ 1e-4 over 10 steps) and ends at its
weights; with --fsdp on 4 processes (2 replicas × 2 context ranks) too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmix.training import train
from tokenmix.training.checkpoint import read_json_lines

from .conftest import TINY
from .test_trainer import assert_same_weights, interrupt_at, weights, without_timing

MIXERS = {  # bias-free projections, as test_distributed's DDP run: Adam amplifies a zero gradient's round-off
    "softmax": {"heads": 2, "bias": False},
    "flash": {"chunk_size": 8},
    "aft_local": {"window": 5},
    "lightconv": {"heads": 2, "kernel_size": 5},
}
CONFIG = dict(TINY, steps=10, eval_every=5, seq_len=30)  # 30 = 15 + 15, or 8 + 8 + 7 + 7 at 4


def _torchrun(tmp_path, out, processes: int, mixer: str, *extra: str) -> None:
    options = [item for key, value in MIXERS[mixer].items() for item in ("--mixer-opt", f"{key}={value}")]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "tokenmix", "train", "--out", str(out), "--progress", "log", "--mixer", mixer, *options,
        "--dim", "32", "--depth", "2", "--seq-len", "30", "--batch-size", "8", "--steps", "10",
        "--eval-every", "5", "--eval-batches", "2", "--warmup-steps", "3", *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _same_run(one, out) -> None:
    split = read_json_lines(out / "metrics.jsonl")
    assert [r["step"] for r in split] == [r["step"] for r in one]
    for a, b in zip(without_timing(one), without_timing(split), strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 and abs(a["train_loss"] - b["train_loss"]) < 1e-4


@pytest.mark.parametrize("mixer", ["softmax", "aft_local", "lightconv"])  # flash: on 4 processes below
def test_a_sequence_split_over_two_ranks_follows_one_process(tmp_path, mixer):
    one = train(dict(CONFIG, mixer=mixer, mixer_options=MIXERS[mixer], out=str(tmp_path / "one")))
    _torchrun(tmp_path, tmp_path / "split", 2, mixer, "--context-parallel", "2")
    _same_run(one, tmp_path / "split")
    # AFT's key bias adds the same to every key of a channel, which its normalisation cancels: its
    # gradient is 0 up to round-off, which Adam scales to full steps (as softmax's, made bias-free above).
    blind = [
        name for name in weights(tmp_path / "one") if mixer.startswith("aft") and name.endswith("to_k.bias")
    ]
    one_weights, split_weights = (
        {k: v for k, v in weights(tmp_path / run).items() if k not in blind} for run in ("one", "split")
    )
    assert_same_weights(one_weights, split_weights, exact=False)


def test_context_parallel_with_fsdp_on_four_processes(tmp_path):
    one = train(dict(CONFIG, mixer="flash", mixer_options=MIXERS["flash"], out=str(tmp_path / "one")))
    _torchrun(tmp_path, tmp_path / "split", 4, "flash", "--context-parallel", "2", "--fsdp")
    _same_run(one, tmp_path / "split")


def test_context_parallel_is_checked_before_anything_runs():
    with pytest.raises(ValueError, match="context_parallel must be a positive integer"):
        train(dict(CONFIG, context_parallel=0, out="unused"))


def test_a_run_stopped_in_one_process_resumes_split_over_two(tmp_path):
    """Checkpoints do not depend on the split: a run resumes at another context-parallel size."""
    config = dict(CONFIG, mixer="lightconv", mixer_options=MIXERS["lightconv"])
    train(dict(config, out=str(tmp_path / "full")))
    train(dict(config, out=str(tmp_path / "cut")), on_step=interrupt_at(6))
    _torchrun(tmp_path, tmp_path / "cut", 2, "lightconv", "--context-parallel", "2", "--resume")
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"), exact=False)


@pytest.mark.parametrize(
    "mixer,causal,order",
    [
        ("softmax", True, "zigzag"),  # so the softmax run above is split zig-zag
        ("gau", True, "zigzag"),
        ("aft_full", True, "zigzag"),
        ("softmax", False, "contiguous"),  # no imbalance to even out
        ("aft_local", True, "contiguous"),  # windows and states pass in the sequence's order
        ("flash", True, "contiguous"),
    ],
)
def test_a_causal_all_pairs_model_is_split_zigzag(mixer, causal, order):
    from tokenmix.models import Backbone
    from tokenmix.training.trainer import split_order

    model = Backbone(16, 2, mixer, causal=causal, max_len=32)
    assert split_order(model) == order
