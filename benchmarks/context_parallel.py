"""Context parallelism on this machine (docs/spec.md §14): for each mixer and sequence length N, one
causal layer's forward and backward (batch 1, width --dim) run whole in one process and split over 2 (or
more) gloo processes; per rank: the most bytes of tensors the step holds at once beyond those before it
(PyTorch's MemTracker: activation memory, what a GPU's allocator counts), the peak resident memory the
step adds (ru_maxrss after the step minus before it, in a fresh process per point: the tensors and what
glibc's malloc keeps of freed ones, see --mmap-threshold), the seconds (median of --repeats after a
warm-up, with their spread) and the bytes the layer's exchanges send. ``--orders``: how a split lays
the sequence over the ranks, "contiguous" or "zigzag" (which only the all-pairs mixers take; a causal
one's ranks then do about the same work), or "auto" (zig-zag where the mixer takes it, as ``train
--context-parallel`` does).

    python benchmarks/context_parallel.py --lens 8192,16384 --ranks 1,2 --out benchmarks/results/X.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MIXERS = ["softmax", "pointwise", "gau", "flash", "aft_full", "aft_simple", "aft_local", "aft_conv",
          "lightconv", "dynamic_conv"]  # fmt: skip


def _counting_sends(sent: list[int]) -> None:
    """Count the bytes every exchange this rank starts sends, once per call: each all-gather's and
    all-reduce's input and each point-to-point send (ring attention's shares, forward and backward). A
    gather's backward (a reduce-scatter inside autograd) is not seen here."""
    from torch.distributed import _functional_collectives as funcol

    gather, reduce, batch = funcol.all_gather_single_autograd, dist.all_reduce, dist.batch_isend_irecv

    def gathered(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return gather(tensor, *args, **kwargs)

    def reduced(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return reduce(tensor, *args, **kwargs)

    def batched(operations):
        sends = [o.tensor for o in operations if o.op is dist.isend]
        sent.append(sum(t.numel() * t.element_size() for t in sends))
        return batch(operations)

    funcol.all_gather_single_autograd, dist.all_reduce, dist.batch_isend_irecv = gathered, reduced, batched


def _tensor_peak(step, mixer: torch.nn.Module, share: torch.Tensor) -> int:
    """The most bytes of tensors one more step holds at once beyond those held before it (PyTorch's
    MemTracker: every tensor storage made through the dispatcher, freed when its last reference goes),
    the gradients made afresh as a training step makes them: what a GPU's allocator counts as
    allocated, without what a CPU allocator keeps cached."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mixer.zero_grad(set_to_none=True)
    share.grad = None
    tracker = MemTracker()
    tracker.track_external(mixer, share)
    with tracker:
        before = sum(s["Total"] for s in tracker.get_tracker_snapshot("current").values())
        step()
    return max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values()) - before


def _point(
    rank: int, world: int, store: str, name: str, length: int, dim: int, repeats: int, out: str, order: str
):
    import tokenmix
    from tokenmix.context import Split

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    sent: list[int] = []
    _counting_sends(sent)
    torch.manual_seed(0)
    sized = {"max_len": length} if "max_len" in tokenmix.mixer_info(name).options else {}  # AFT's tables
    mixer = tokenmix.create_mixer(name, dim, causal=True, **sized)
    x = torch.randn(1, length, dim)
    split = Split.of(length, order=order) if world > 1 else None
    share = x if split is None else split.local(x)

    def step() -> None:
        y = mixer(share.requires_grad_(), context=split) if split else mixer(share.requires_grad_())
        y.sum().backward()

    if split is not None:  # the process group's own buffers, made at its first collectives: not the step's
        from tokenmix.context import gather_sequence

        gather_sequence(torch.zeros(1, split.length, 1, requires_grad=True), split, 1).sum().backward()
        dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # the warm-up, whose peak is the step's
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    per_step = len(sent) - (1 if split is not None else 0)
    sent = sent[len(sent) - per_step :]
    times = []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    record = {
        "mixer": name, "N": length, "ranks": world, "rank": rank,
        "peak_added_mib": peak / 1024, "tensor_peak_added_mib": _tensor_peak(step, mixer, share) / 2**20,
        "seconds": statistics.median(times), "seconds_all": times,
        "bytes_sent_per_step": sum(sent[:per_step]),
    }  # fmt: skip
    Path(out).joinpath(f"{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def measure(name: str, length: int, world: int, dim: int, repeats: int, order: str = "contiguous") -> dict:
    with tempfile.TemporaryDirectory() as folder:
        args = (world, str(Path(folder) / "store"), name, length, dim, repeats, folder, order)
        try:
            mp.spawn(_point, args=args, nprocs=world)
        except mp.ProcessExitedException as killed:  # the kernel's OOM killer: recorded, not a crash
            if "SIGKILL" not in str(killed):
                raise
            return {"mixer": name, "N": length, "ranks": world, "order": order, "oom": True}
        records = [json.loads(Path(folder, f"{r}.json").read_text()) for r in range(world)]
    worst = max(records, key=lambda r: r["peak_added_mib"])
    return {
        "mixer": name, "N": length, "ranks": world, "order": order,
        "peak_added_mib_per_rank": worst["peak_added_mib"],
        "tensor_peak_added_mib_per_rank": max(r["tensor_peak_added_mib"] for r in records),
        "seconds_per_rank": max(r["seconds"] for r in records),
        "seconds_by_rank": [r["seconds"] for r in records],
        "seconds_spread": [min(t for r in records for t in r["seconds_all"]),
                           max(t for r in records for t in r["seconds_all"])],
        "bytes_sent_per_rank": max(r["bytes_sent_per_step"] for r in records),
    }  # fmt: skip


def _orders(name: str, world: int, wanted: str) -> list[str]:
    """The orders to measure ``name`` in: one process has none to choose; "auto" is zig-zag where the
    mixer takes it; an order the mixer refuses is left out."""
    import tokenmix

    if world == 1:
        return ["contiguous"]
    takes = tokenmix.create_mixer(name, 8, causal=True).split_orders
    orders = [
        ("zigzag" if "zigzag" in takes else "contiguous") if o == "auto" else o for o in wanted.split(",")
    ]
    return [o for o in dict.fromkeys(orders) if o in takes]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mixers", default=",".join(MIXERS))
    parser.add_argument("--lens", default="8192,16384")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--orders", default="auto", help="contiguous, zigzag or auto, comma-separated")
    parser.add_argument("--out", required=True)
    parser.add_argument("--keep", help="the JSON lines of points an earlier run printed: kept, not rerun")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help="bytes: glibc's malloc maps each block this large or larger on its own and unmaps it when freed "
        "(MALLOC_MMAP_THRESHOLD_ in every process measured), so the resident set follows the tensors held; "
        "by default the threshold rises to 32 MiB once such a block is freed, and freed blocks below it "
        "stay resident",
    )
    args = parser.parse_args()
    if args.mmap_threshold is not None:  # read by glibc when each spawned process starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    out = Path(args.out)
    if out.exists() and out.read_text().strip() and "context_parallel" not in out.read_text():
        print(f"--out {out} exists and is not this script's record", file=sys.stderr)
        raise SystemExit(2)
    points = [json.loads(line) for line in Path(args.keep).read_text().splitlines()] if args.keep else []
    done = {(p["mixer"], p["N"], p["ranks"], p.get("order", "contiguous")) for p in points}
    for name in args.mixers.split(","):
        for length in (int(n) for n in args.lens.split(",")):
            for world in (int(w) for w in args.ranks.split(",")):
                for order in _orders(name, world, args.orders):
                    if (name, length, world, order) in done:
                        continue
                    point = measure(name, length, world, args.dim, args.repeats, order)
                    points.append(point)
                    print(json.dumps(point), flush=True)
    record = {
        "benchmark": "context_parallel", "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "dim": args.dim, "batch": 1, "causal": True, "repeats": args.repeats,
        "malloc_mmap_threshold": args.mmap_threshold,
        "points": points,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
