"""Every kernel compiles for an H100 (sm_90) down to a cubin, with the block sizes and flags the ops use on
a GPU, within an H100 block's shared memory: benchmarks/compile_sm90.py, run per op (so the work spreads
over the test workers). Triton's interpreter, which the other kernel tests use, accepts code that the
GPU compiler rejects; without a GPU this is what says the kernels build for one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPS = ["pointwise_attention", "mixed_chunk_attention", "aft_simple", "aft_full", "aft_local", "aft_conv",
       "lightconv", "dynamic_conv"]  # fmt: skip


@pytest.mark.parametrize("op", OPS)
def test_the_kernels_compile_for_sm90(op, tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONWARNINGS"] = "ignore"
    out = tmp_path / "compile.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/compile_sm90.py", "--ops", op, "--out", str(out)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = json.loads(out.read_text())["ops"][op]
    assert compiled["launches"] >= 2  # forward and backward
    assert all("cubin" in stages for stages in compiled["stages"]), compiled
    assert max(compiled["shared"]) <= 227 * 1024, compiled["shared"]  # an H100 block's shared memory
