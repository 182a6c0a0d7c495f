"""benchmarks/kernels_gpu.py runs end to end (tiny sizes, Triton's interpreter), so a lent GPU's time
goes to measuring, not to fixing the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_gpu.py"


def test_the_gpu_benchmark_script_checks_times_and_writes(tmp_path):
    out = tmp_path / "kernels.json"
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {c["op"] for c in data["checks"]} == {
        "pointwise_attention", "mixed_chunk_attention", "aft_simple", "aft_full", "aft_local", "aft_conv",
        "lightconv", "dynamic_conv",
    }  # fmt: skip
    assert all(c["ok"] for c in data["checks"]), data["checks"]
    kinds = {(r["op"], r["backend"]) for r in data["records"]}
    assert ("sdpa", "sdpa") in kinds and ("pointwise_attention", "triton") in kinds
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in data["records"])
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
