"""Memory that FSDP and activation checkpointing save (issue 28), on the CPU.

``activations``: peak live tensor memory of one forward + backward of a LanguageModel (d=256, 4 layers,
vocab 256, B=1, N=--seq-len) with and without ``Backbone.activation_checkpointing``, per mixer, each point
in a fresh process (``tokenmix.bench.measure.peak_allocated_mb``: the profiler's allocation records;
weights and inputs, alive before, are not counted). The gradients (as large as the weights, in both) are
subtracted: what remains is activation memory. The time of the same call shows the recomputation's cost.

``sharding``: two processes (torchrun, gloo) train a LanguageModel whose weights, gradients and AdamW's
moments dominate (each of --sizes: d × layers; vocab 256, 2 rows of 64 per rank, 3 steps), replicated
(DistributedDataParallel) or sharded (``tokenmix.training.sharding``: FSDP2 per block, then the root). Per
rank: the peak resident memory above the level before the model was built (what the OS sees). Both run
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_=65536``): by default glibc raises
the threshold as large blocks are freed, and FSDP's per-block all-gather buffers, freed after every
block, then stay in the heap and fragment it (measured here: the sharded rank's resident memory grew
every step, to 1.14× DDP's after 3 steps; with the threshold fixed it is flat). CUDA's caching allocator
has no such effect.

    python benchmarks/memory.py activations [--seq-len 2048]
    python benchmarks/memory.py sharding [--sizes 768x6,1024x8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from harness import run_point, write_results

from tokenmix.bench.measure import peak_allocated_mb, rss_mb
from tokenmix.models import LanguageModel
from tokenmix.models.backbone import set_activation_checkpointing

MIXERS = {
    "softmax": {"heads": 4},
    "flash": {"chunk_size": 256},
    "aft_local": {"window": 128, "max_len": 2048},
    "dynamic_conv": {"heads": 4},
}


def activations_point(point: dict) -> dict:
    torch.manual_seed(0)
    length = point["seq_len"]
    model = LanguageModel(256, 256, 4, point["mixer"], mixer_options=MIXERS[point["mixer"]], max_len=length)
    set_activation_checkpointing(model, point["checkpointing"])
    tokens = torch.randint(0, 256, (1, length))

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens).logsumexp(-1).mean().backward()

    run()  # warm-up
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = peak_allocated_mb(run, torch.device("cpu"))
    gradients = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {**point, "peak_allocated_mb": peak, "gradients_mb": gradients,
            "activations_mb": peak - gradients, "fwd_bwd_ms": 1000 * seconds}  # fmt: skip


def activations(args: argparse.Namespace) -> list[dict]:
    records = []
    for mixer in MIXERS:
        pair = {}
        for checkpointing in (False, True):
            point = {
                "part": "activations",
                "mixer": mixer,
                "seq_len": args.seq_len,
                "checkpointing": checkpointing,
            }
            pair[checkpointing] = record = run_point(__file__, point)
            records.append(record)
        ratio = pair[True]["activations_mb"] / pair[False]["activations_mb"]
        for record in pair.values():
            record["checkpointed_over_plain"] = ratio
        print(
            f"{mixer:>12} N={args.seq_len}: activations {pair[False]['activations_mb']:7.1f} MB → "
            f"{pair[True]['activations_mb']:7.1f} MB with checkpointing ({ratio:.2f}×); fwd+bwd "
            f"{pair[False]['fwd_bwd_ms']:.0f} → {pair[True]['fwd_bwd_ms']:.0f} ms"
        )
    return records


def sharding_rank(point: dict) -> None:
    """One torchrun rank: build, train 3 steps, report this rank's peak memory to rank 0."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tokenmix.training.sharding import build_sharded

    dist.init_process_group("gloo")
    baseline = rss_mb()

    def build() -> LanguageModel:
        return LanguageModel(
            256, point["dim"], point["depth"], "softmax", mixer_options={"heads": 8}, max_len=64
        )

    if point["mode"] == "fsdp":
        model = trained = build_sharded(build, torch.device("cpu"), 0)
    else:
        torch.manual_seed(0)
        model = build()
        trained = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        tokens = torch.randint(0, 256, (2, 65), generator=generator)
        logits = trained(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, rss_mb() - baseline)
    params = sum(p.numel() for p in model.parameters())
    if dist.get_rank() == 0:
        print(json.dumps({**point, "params": params, "peak_rss_extra_mb_per_rank": peaks}), flush=True)
    dist.barrier()  # (a rank that destroys the group while the other is still in a collective can hang it)
    dist.destroy_process_group()


def sharding(args: argparse.Namespace) -> list[dict]:
    records = []
    for size in args.sizes.split(","):
        dim, depth = (int(part) for part in size.split("x"))
        records += sharding_size(dim, depth)
    return records


def sharding_size(dim: int, depth: int) -> list[dict]:
    records = {}
    for mode in ("ddp", "fsdp"):
        point = {"part": "sharding", "mode": mode, "dim": dim, "depth": depth, "world_size": 2}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   __file__, "--rank-worker", json.dumps(point)]  # fmt: skip
        environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe, for the ranks' output
            result = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, timeout=1200
            )
            log.seek(0)
            output = log.read()
        if result.returncode:
            sys.exit(f"{mode} failed:\n{output[-3000:]}")
        records[mode] = json.loads(next(line for line in output.splitlines()[::-1] if line.startswith("{")))
    ratio = max(records["fsdp"]["peak_rss_extra_mb_per_rank"]) / max(
        records["ddp"]["peak_rss_extra_mb_per_rank"]
    )
    for record in records.values():
        record["fsdp_over_ddp"] = ratio
    ddp, fsdp = (records[mode]["peak_rss_extra_mb_per_rank"] for mode in ("ddp", "fsdp"))
    print(
        f"{records['ddp']['params'] / 1e6:.1f}M parameters, 2 ranks: peak RSS per rank DDP {ddp} MB, "
        f"FSDP {fsdp} MB (FSDP / DDP = {ratio:.2f})"
    )
    return list(records.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=["activations", "sharding"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--sizes", default="768x6,1024x8", help="sharding: models as DIMxDEPTH, comma-separated"
    )
    parser.add_argument(
        "--out", help="the JSON to write (default: benchmarks/results/cpu-memory-<part>-DATE.json)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(activations_point(json.loads(args.worker))))
        return
    if args.rank_worker:
        sharding_rank(json.loads(args.rank_worker))
        return
    if args.part is None:
        parser.error("choose a part: activations or sharding")
    records = activations(args) if args.part == "activations" else sharding(args)
    print(write_results(f"memory-{args.part}", records, args.out))


if __name__ == "__main__":
    main()
