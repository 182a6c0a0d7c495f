"""benchmarks/kernels_gpu.py runs end to end (tiny sizes, Triton's interpreter), so a lent GPU's time
goes to measuring, not to fixing the script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_gpu.py"
pytestmark = pytest.mark.starts_first  # tests/conftest.py
# `python SCRIPT ARGS` with the kernel tests' interpreter (tests/interpreter.py: the same values, faster).
RUN_AS_SCRIPT = """
import os, runpy, sys
from tests import interpreter
interpreter.install()
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_gpu_benchmark_script_checks_times_and_writes(tmp_path):
    out = tmp_path / "kernels.json"
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", RUN_AS_SCRIPT, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=SCRIPT.parents[1],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {c["op"] for c in data["checks"]} == {
        "pointwise_attention", "mixed_chunk_attention", "aft_simple", "aft_full", "aft_local", "aft_conv",
        "lightconv", "dynamic_conv", "aft_conv_2d",
    }  # fmt: skip
    assert all(c["ok"] for c in data["checks"]), data["checks"]
    kinds = {(r["op"], r["backend"]) for r in data["records"]}
    assert ("sdpa", "sdpa") in kinds and ("pointwise_attention", "triton") in kinds
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in data["records"])
    assert {row["op"] for row in data["packing"]} == {
        "pointwise_attention", "mixed_chunk_attention", "aft_simple", "lightconv",
    }  # fmt: skip
    packed = {c["op"] for c in data["checks"] if c.get("packed")}  # documents of several blocks each
    assert packed == {row["op"] for row in data["packing"]}
    assert any("fraction_of_copy_bandwidth" in r for r in data["records"])
    assert out.with_suffix(".png").is_file()
    measured = {row["op"] for row in data["targets"]}
    assert {
        "pointwise_attention",
        "mixed_chunk_attention",
        "aft_simple",
        "lightconv",
        "dynamic_conv",
    } <= measured
    assert all(row["value"] > 0 and isinstance(row["met"], bool) for row in data["targets"])


def _script():
    spec = importlib.util.spec_from_file_location("kernels_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_points_the_targets_need_run_first_and_the_reference_path_last():
    script = _script()
    kernels = list(script.FUNCTIONS)[:8]
    points = script.plan(kernels, [1024, 2048, 8192], [64, 128], False, 2048, 8192)
    backends = [backend for _, backend, *_ in points]
    assert backends.index("reference") > max(i for i, b in enumerate(backends) if b != "reference")
    first_other = next(i for i, (op, b, n, _, causal) in enumerate(points) if op == "aft_full")
    needed = [i for i, (op, b, n, _, causal) in enumerate(points) if op == "mixed_chunk_attention" and causal
              and n == 8192 and b == "triton"]  # fmt: skip
    assert needed and needed[0] < first_other
    assert len(points) == len(set(points))


def test_documents_pack_into_one_row_or_pad_to_the_longest():
    script = _script()
    lengths = script.document_lengths(16384, False)
    assert sum(lengths) == 16384 and min(lengths) > 0
    args = SimpleNamespace(tokens=64, smoke=True, device="cpu", shapes=script.SMOKE)
    generator = torch.Generator().manual_seed(0)
    tensors, options, sizes = script.documents("aft_simple", "packed", 32, args, generator)
    assert tensors[0].shape[:2] == (1, 64) and options["cu_seqlens"].tolist() == [0, 20, 27, 57, 64]
    assert sizes == {"batch": 1, "seq_len": 64}
    tensors, options, sizes = script.documents("aft_simple", "padded", 32, args, generator)
    assert tensors[0].shape[:2] == (4, 30) and options["attention_mask"].sum().item() == 64
    assert sizes == {"batch": 4, "seq_len": 30}


def test_a_timing_stops_at_the_deadline_and_takes_the_repeats_that_fit():
    script = _script()
    calls = []

    def run():
        calls.append(1)
        time.sleep(0.01)

    args = SimpleNamespace(point_seconds=0.05, repeats=20, smoke=False)
    assert script._budgeted_ms(run, None, args, time.monotonic() - 1) is None and not calls
    ms = script._budgeted_ms(run, None, args, time.monotonic() + 60)
    assert ms >= 10 and 3 <= len(calls) <= 2 + 6  # warm-up, one call, then what fits in 0.05 s
