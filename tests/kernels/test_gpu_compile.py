"""Every kernel compiles for an H100 (sm_90) down to a cubin, with the block sizes and flags the ops use on
a GPU, within an H100 block's shared memory: benchmarks/compile_sm90.py, run per op (so the work spreads
over the test workers). Triton's interpreter, which the other kernel tests use, accepts code that the
GPU compiler rejects; without a GPU this is what says the kernels build for one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.functional.ops import KERNELS

ROOT = Path(__file__).resolve().parents[2]


def test_the_compile_script_covers_every_kernel_of_the_op_table():
    """Issue 40.5: this list was kept by hand; the op table says which ops have kernels."""
    spec = importlib.util.spec_from_file_location("compile_sm90", ROOT / "benchmarks" / "compile_sm90.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert sorted(script.OPS) == KERNELS


@pytest.mark.parametrize("op", KERNELS)
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
