"""lightconv / dynamic_conv on the CPU: where the band-matrix path stops beating the sliding window
(the crossover behind ``tokenmix.functional.conv.BAND_RULE``), and how the causal mixers scale.

    python benchmarks/conv.py                    # crossover table, then N = 2048, 8192 (K=31, d=64)
"""

from __future__ import annotations

import argparse
import functools
import json
from unittest import mock

from harness import measure, run_point, summary, time_ms, write_results


def _forward_backward(op, x, weight) -> None:
    op(x, weight, causal=True).sum().backward()


def crossover(seq_lens: list[int], kernel_sizes: list[int], batch: int, dim: int, heads: int) -> list[dict]:
    """Forward+backward milliseconds of each op along each path, in this process."""
    import torch

    from tokenmix.functional import conv

    records = []
    for op_name in ("lightconv", "dynamic_conv"):
        for kernel_size in kernel_sizes:
            for seq_len in seq_lens:
                x = torch.randn(batch, seq_len, dim, requires_grad=True)
                shape = (
                    (batch, seq_len, heads, kernel_size)
                    if op_name == "dynamic_conv"
                    else (heads, kernel_size)
                )
                weight = torch.randn(shape, requires_grad=True)
                run = functools.partial(_forward_backward, getattr(conv, op_name), x, weight)
                times = {}
                for path, rule in (("band", (1, 10**9)), ("window", (10**9, 0))):
                    with mock.patch.dict(conv.BAND_RULE, {op_name: rule}):
                        times[path] = time_ms(run, 5)
                records.append({"op": op_name, "kernel_size": kernel_size, "seq_len": seq_len, **times})
                faster = "band" if times["band"] < times["window"] else "window"
                print(
                    f"{op_name:13s} K={kernel_size:3d} N={seq_len:5d}  band {times['band']:8.2f} ms  "
                    f"window {times['window']:8.2f} ms  {faster}",
                    flush=True,
                )
    return records


def worker(point: dict) -> dict:
    import torch

    from tokenmix import create_mixer

    torch.manual_seed(0)
    mixer = create_mixer(point["mixer"], point["dim"], causal=True, kernel_size=point["kernel_size"])
    x = torch.randn(1, point["seq_len"], point["dim"], requires_grad=True)
    grad = torch.randn_like(x)

    def run() -> None:
        mixer(x).backward(grad)
        mixer.zero_grad(set_to_none=True)
        x.grad = None

    return {**point, **measure(run, point["repeats"])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crossover-lens", default="16,32,64,128,256")
    parser.add_argument("--crossover-kernels", default="3,7,15,31,63")
    parser.add_argument("--crossover-batch", type=int, default=8)
    parser.add_argument("--crossover-dim", type=int, default=256)
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--kernel-size", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/cpu-conv-DATE.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    cross = crossover(
        [int(n) for n in args.crossover_lens.split(",")],
        [int(k) for k in args.crossover_kernels.split(",")],
        args.crossover_batch,
        args.crossover_dim,
        heads=8,
    )
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    records = []
    for mixer in ("lightconv", "dynamic_conv"):
        for seq_len in seq_lens:
            point = dict(
                mixer=mixer, seq_len=seq_len, dim=args.dim, kernel_size=args.kernel_size, repeats=args.repeats
            )
            records.append(run_point(__file__, point))
            print(f"N={seq_len:6d} {mixer:13s} {summary(records[-1])}", flush=True)
        growth = records[-1]["ms"] / records[-len(seq_lens)]["ms"]
        print(f"  {mixer} N={seq_lens[-1]} / N={seq_lens[0]}: {growth:.2f} (target ≤ 6)")
    for record in cross:
        record["pass"] = "crossover"
    print(f"\nwrote {write_results('conv', records + cross, args.out)}")


if __name__ == "__main__":
    main()
