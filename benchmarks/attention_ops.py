"""Forward+backward time and peak memory of softmax_attention (PyTorch SDPA) and pointwise_attention.

Each point runs in a fresh subprocess, so its peak resident memory is its own. Prints a table and
writes JSON (with the machine named) to benchmarks/results/.

    python benchmarks/attention_ops.py                      # N = 1024, 4096, 8192; B=1, H=8, D=64, float32
    python benchmarks/attention_ops.py --seq-lens 256,1024 --repeats 2
"""

from __future__ import annotations

import argparse
import json

from harness import measure, run_point, summary, write_results

OPS = ("softmax_attention", "pointwise_attention")


def worker(point: dict) -> dict:
    import torch

    from tokenmix import functional

    torch.manual_seed(0)
    op = getattr(functional, point["op"])
    dtype = getattr(torch, point["dtype"])
    shape = (point["batch"], point["heads"], point["seq_len"], point["head_dim"])
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)

    def run() -> None:
        op(q, k, v, causal=point["causal"]).backward(grad)
        q.grad = k.grad = v.grad = None

    return {**point, **measure(run, point["repeats"])}


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
    parser.add_argument("--out", help="JSON path (default benchmarks/results/cpu-attention-DATE.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    seq_lens, modes = [int(n) for n in args.seq_lens.split(",")], args.modes.split(",")
    records = []
    for seq_len in seq_lens:
        for mode in modes:
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
                r = run_point(__file__, point)
                records.append(r)
                print(f"N={seq_len:6d} {mode:13s} {op:20s} {summary(r)}", flush=True)
    print("\npointwise / softmax time ratio (target ≤ 1.5):")
    for seq_len in seq_lens:
        for mode in modes:
            by_op = {
                r["op"]: r for r in records if r["seq_len"] == seq_len and r["causal"] == (mode == "causal")
            }
            ratio = by_op["pointwise_attention"]["ms"] / by_op["softmax_attention"]["ms"]
            print(f"  N={seq_len:6d} {mode:13s} {ratio:.2f}")
    print(f"\nwrote {write_results('attention', records, args.out)}")


if __name__ == "__main__":
    main()
