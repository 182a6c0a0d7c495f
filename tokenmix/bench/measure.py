"""Timing and memory of one benchmark point, on the CPU or a CUDA device."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch


def rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_allocated_mb(run: Callable[[], None], device: torch.device) -> float:
    """Peak of live tensor memory during one call, in MiB: CUDA's max_memory_allocated, or on the CPU
    the same quantity from the profiler's allocation records (tensors alive before the call, such as
    inputs and weights, are not counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
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


def time_ms(run: Callable[[], None], repeats: int, device: torch.device | None = None) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up call (synchronised on CUDA)."""
    return statistics.median(time_samples(run, repeats, device))


def time_samples(run: Callable[[], None], repeats: int, device: torch.device | None = None) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after one warm-up call (synchronised on CUDA)."""
    run()
    return [1000 * wall_clock(run, device) for _ in range(repeats)]


def wall_clock(run: Callable[[], None], device: torch.device | None = None) -> float:
    """Seconds of one call, synchronised on CUDA before and after."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(run: Callable[[], None], repeats: int, device: torch.device | None = None) -> dict:
    """Median time and the range of the repeats (``ms_min``, ``ms_max``: what a machine's noise did to
    it); peak resident memory above the level before the first call (what the OS sees, allocator caching
    included); peak live tensor memory of one call."""
    device = device or torch.device("cpu")
    baseline = rss_mb()
    samples = time_samples(run, repeats, device)
    return {
        "ms": statistics.median(samples),
        "ms_min": min(samples),
        "ms_max": max(samples),
        "peak_extra_mb": rss_mb() - baseline,
        "baseline_rss_mb": baseline,
        "peak_allocated_mb": peak_allocated_mb(run, device),
    }


def machine(device: torch.device | None = None) -> dict:
    """What the numbers were measured on."""
    info = {
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None and device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    return info
