"""Every kernel compiles for an H100 (sm_90) down to a cubin, with the block sizes and flags the ops use on
a GPU, within an H100 block's shared memory: benchmarks/compile_sm90.py, run once for every op. Triton's
interpreter, which the other kernel tests use, accepts code that the GPU compiler rejects; without a GPU
this is what says the kernels build for one."""

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
pytestmark = pytest.mark.starts_first  # tests/conftest.py


def test_the_compile_script_covers_every_kernel_of_the_op_table():
    """Issue 40.5: this list was kept by hand; the op table says which ops have kernels."""
    spec = importlib.util.spec_from_file_location("compile_sm90", ROOT / "benchmarks" / "compile_sm90.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert sorted(script.OPS) == KERNELS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Every op compiled in one process (their imports of torch and Triton once, not once per op); an op
    that fails is recorded with its error and the others still compile."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONWARNINGS"] = "ignore"
    out = tmp_path_factory.mktemp("sm90") / "compile.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/compile_sm90.py", "--ops", *KERNELS, "--out", str(out)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.is_file(), result.stderr[-4000:]
    return json.loads(out.read_text())["ops"]


@pytest.mark.parametrize("op", KERNELS)
def test_the_kernels_compile_for_sm90(op, compiled):
    assert "error" not in compiled[op], compiled[op]["error"][-4000:]
    compiled = compiled[op]
    assert compiled["launches"] >= 2  # forward and backward
    assert all("cubin" in stages for stages in compiled["stages"]), compiled
    assert max(compiled["shared"]) <= 227 * 1024, compiled["shared"]  # an H100 block's shared memory
