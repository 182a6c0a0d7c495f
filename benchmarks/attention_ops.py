"""Forward+backward time and peak memory of softmax_attention (PyTorch SDPA) and pointwise_attention.

Each point runs in a fresh subprocess, so its peak resident memory is its own. Prints a table and
writes JSON (with the machine named) to benchmarks/results/.

    python benchmarks/attention_ops.py                      # N = 1024, 4096, 8192; B=1, H=8, D=64, float32
    python benchmarks/attention_ops.py --seq-lens 256,1024 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPS = ("softmax_attention", "pointwise_attention")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(point: dict) -> dict:
    import torch

    from tokenmix import functional

    torch.manual_seed(0)
    op = getattr(functional, point["op"])
    dtype = getattr(torch, point["dtype"])
    shape = (point["batch"], point["heads"], point["seq_len"], point["head_dim"])
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)
    baseline = _rss_mb()

    def run() -> None:
        op(q, k, v, causal=point["causal"]).backward(grad)
        q.grad = k.grad = v.grad = None

    run()  # warm-up
    times = []
    for _ in range(point["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        **point,
        "ms": 1000 * statistics.median(times),
        "peak_rss_mb": _rss_mb(),
        "baseline_rss_mb": baseline,
        "peak_extra_mb": _rss_mb() - baseline,
        "nxn_float32_mb": point["seq_len"] ** 2 * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-lens", default="1024,4096,8192")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="bidirectional,causal")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/cpu-attention-DATE.json)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    records = []
    for seq_len in map(int, args.seq_lens.split(",")):
        for mode in args.modes.split(","):
            for op in OPS:
                point = dict(
                    op=op,
                    seq_len=seq_len,
                    causal=mode == "causal",
                    batch=args.batch,
                    heads=args.heads,
                    head_dim=args.head_dim,
                    dtype=args.dtype,
                    repeats=args.repeats,
                )
                result = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(point)], capture_output=True, text=True
                )
                if result.returncode:
                    sys.exit(f"point {point} failed:\n{result.stderr}")
                records.append(json.loads(result.stdout.strip().splitlines()[-1]))
                r = records[-1]
                print(
                    f"N={seq_len:6d} {mode:13s} {op:20s} {r['ms']:10.1f} ms  "
                    f"peak +{r['peak_extra_mb']:8.1f} MB (N×N float32 = {r['nxn_float32_mb']:.0f} MB)",
                    flush=True,
                )
    print("\npointwise / softmax time ratio (target ≤ 1.5):")
    for seq_len in map(int, args.seq_lens.split(",")):
        for mode in args.modes.split(","):
            by_op = {
                r["op"]: r for r in records if r["seq_len"] == seq_len and r["causal"] == (mode == "causal")
            }
            ratio = by_op["pointwise_attention"]["ms"] / by_op["softmax_attention"]["ms"]
            print(f"  N={seq_len:6d} {mode:13s} {ratio:.2f}")
    machine = {
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = Path(args.out or f"benchmarks/results/cpu-attention-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "records": records}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
