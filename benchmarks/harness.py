"""What the benchmark scripts share beyond ``tokenmix.bench.measure``: each point in a fresh subprocess
(so peak resident memory is the point's own), a one-line summary, JSON output with the machine named."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

from tokenmix.bench.measure import machine, measure, time_ms

__all__ = ["alternated", "measure", "run_point", "summary", "time_ms", "write_results"]


def summary(record: dict) -> str:
    """Time and memory of one record, with the N×N float32 size beside them for scale."""
    return (
        f"{record['ms']:10.1f} ms  allocated {record['peak_allocated_mb']:7.1f} MB, "
        f"RSS +{record['peak_extra_mb']:7.1f} MB (N×N float32 = {record['seq_len'] ** 2 * 4 / 2**20:.0f} MB)"
    )


def run_point(script: str, point: dict) -> dict:
    """Run ``script --worker POINT`` in a fresh interpreter and return the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(point)], capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"point {point} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_results(name: str, records: list[dict], out: str | None) -> Path:
    path = Path(out or f"benchmarks/results/cpu-{name}-{datetime.date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "records": records}, indent=2))
    return path


def alternated(layers: dict, x, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Forward+backward of each layer on ``x`` (which requires grad) in one process, calls alternated so
    that drift in the machine's speed hits all alike: median milliseconds of each over ``repeats``
    rounds, after ``warmup`` rounds."""
    import statistics
    import time

    import torch

    grad = torch.randn_like(x)
    samples = {name: [] for name in layers}
    for round_ in range(warmup + repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            layer(x).backward(grad)
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
            layer.zero_grad(set_to_none=True)
            x.grad = None
    return {name: 1000 * statistics.median(times) for name, times in samples.items()}
