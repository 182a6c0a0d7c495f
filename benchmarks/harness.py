"""What every benchmark script shares: each point in a fresh subprocess (so peak resident memory is
the point's own), a median of timed repeats after a warm-up, the machine's description, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_allocated_mb(run: Callable[[], None]) -> float:
    """Peak of live tensor memory allocated by PyTorch during one call, in MiB: the CPU counterpart of
    CUDA's max_memory_allocated, from the profiler's allocation records (tensors alive before the call,
    such as inputs and weights, are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def time_ms(run: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(run: Callable[[], None], repeats: int) -> dict:
    """Median time (``time_ms``); peak resident memory above the level before the first call (what the
    OS sees, allocator caching included); peak live tensor memory of one call."""
    baseline = rss_mb()
    return {
        "ms": time_ms(run, repeats),
        "peak_extra_mb": rss_mb() - baseline,
        "baseline_rss_mb": baseline,
        "peak_allocated_mb": peak_allocated_mb(run),
    }


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


def machine() -> dict:
    import torch

    return {
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_results(name: str, records: list[dict], out: str | None) -> Path:
    path = Path(out or f"benchmarks/results/cpu-{name}-{datetime.date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "records": records}, indent=2))
    return path
