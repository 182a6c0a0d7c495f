"""``tokenmix bench``: records, files and plots from small real runs."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmix.bench import bench, ratios, runner
from tokenmix.cli import main

FIELDS = {"mixer", "seq_len", "pass", "ms", "tokens_per_s", "peak_mem_mb", "device", "dtype", "oom"}


def test_bench_writes_records_and_plots(tmp_path):
    records = bench(["aft_simple"], [16, 32], passes=["fwd", "step"], dim=16, repeats=3, out=tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == records
    assert {(r["mixer"], r["pass"]) for r in records} == {
        ("aft_simple", "fwd"),
        ("aft_simple", "step"),
        ("sdpa", "fwd"),  # the baseline does not decode
    }
    for record in records:
        assert set(record) >= FIELDS and not record["oom"]
        assert record["ms"] > 0 and record["tokens_per_s"] > 0 and record["device"] == "cpu"
        # Issue 37.4: the range of the repeats is kept beside their median
        assert record["ms_min"] <= record["ms"] <= record["ms_max"] and record["repeats"] == 3
    fwd = {r["seq_len"]: r for r in records if r["mixer"] == "aft_simple" and r["pass"] == "fwd"}
    assert fwd[32]["tokens_per_s"] == pytest.approx(32 / (fwd[32]["ms"] / 1000))
    for name in ("time.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_memory_is_recorded_not_raised(monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(runner, "build", exhausted)
    point = {
        "mixer": "softmax",
        "seq_len": 8,
        "pass": "fwd",
        "device": "cpu",
        "dtype": "float32",
        "batch": 1,
        "dim": 16,
        "repeats": 1,
        "causal": True,
        "options": {},
    }
    assert runner.run_point(point) == {
        k: point[k] for k in ("mixer", "seq_len", "pass", "device", "dtype", "batch", "dim")
    } | {"oom": True}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mixers": ["nope"]}, "unknown mixer 'nope'"),
        ({"passes": ["backward"]}, "unknown pass 'backward'"),
        ({"device": "cuda"}, "no CUDA device"),
    ],
)
def test_bad_arguments(kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    arguments = {"mixers": ["softmax"], "seq_lens": [8], **kwargs}
    with pytest.raises(ValueError, match=message):
        bench(arguments.pop("mixers"), arguments.pop("seq_lens"), **arguments)


def test_ratios_pair_each_mixer_with_its_peer():
    records = [
        {"mixer": "flash", "seq_len": 64, "pass": "fwd", "ms": 2.0},
        {"mixer": "flash_pytorch:FLASH", "seq_len": 64, "pass": "fwd", "ms": 4.0},
        {"mixer": "gau", "seq_len": 64, "pass": "fwd", "ms": 1.0},  # no peer measured
    ]
    assert ratios(records) == [
        {"mixer": "flash", "peer": "flash_pytorch:FLASH", "seq_len": 64, "pass": "fwd", "ratio": 0.5}
    ]


def test_cli(tmp_path, capsys):
    argv = [
        "bench",
        "--mixers",
        "lightconv",
        "--seq-lens",
        "16",
        "--dim",
        "16",
        "--repeats",
        "1",
        "--no-baselines",
        "--mixer-opt",
        "kernel_size=3",
        "--mixer-opt",
        "heads=2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lightconv" in out and "tokens/s" in out
    assert json.loads((tmp_path / "bench.json").read_text())[0]["mixer"] == "lightconv"


def test_peers_run_at_matched_settings_and_get_a_ratio():
    records = bench(["softmax", "gau"], [32], dim=32, passes=["fwd"], repeats=1, baselines=False, peers=True)
    assert {r["mixer"] for r in records} == {
        "softmax",
        "gau",
        "x_transformers:Attention",
        "flash_pytorch:GAU",
    }
    assert all(r["ms"] > 0 and not r["oom"] for r in records)
    pairs = {(row["mixer"], row["peer"]) for row in ratios(records)}
    assert pairs == {("softmax", "x_transformers:Attention"), ("gau", "flash_pytorch:GAU")}


PROBES = """
import os, signal, sys
import torch


class Killed(torch.nn.Module):  # what the OS does to a point out of memory
    def __init__(self, **sizes):
        os.kill(os.getpid(), signal.SIGKILL)


class Broken(torch.nn.Module):
    def __init__(self, **sizes):
        raise ValueError("a broken layer")


class Chatty(torch.nn.Identity):
    def __init__(self, **sizes):
        print("something on stdout")
        super().__init__()
"""


def test_the_worker_records_a_killed_point_raises_a_failed_one_and_goes_on(tmp_path, monkeypatch):
    """Every point in a child forked from one worker: a child killed (as the OS kills one out of memory)
    is recorded as out of memory and the next point still runs; a child that fails raises its
    traceback here; what a child prints does not garble the records."""
    (tmp_path / "worker_probes.py").write_text(PROBES)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    base = {"seq_len": 8, "pass": "fwd", "device": "cpu", "dtype": "float32", "batch": 1, "dim": 16,
            "repeats": 1, "causal": False, "options": {}}  # fmt: skip
    worker = runner._Worker()
    try:
        killed = worker.run({**base, "mixer": "worker_probes:Killed"})
        assert killed["oom"] and killed["mixer"] == "worker_probes:Killed"
        chatty = worker.run({**base, "mixer": "worker_probes:Chatty"})
        assert not chatty["oom"] and chatty["ms"] > 0
        with pytest.raises(RuntimeError, match="a broken layer"):
            worker.run({**base, "mixer": "worker_probes:Broken"})
        assert worker.run({**base, "mixer": "sdpa"})["ms"] > 0
    finally:
        worker.close()
