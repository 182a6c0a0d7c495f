"""One mixer over a sequence split across processes (docs/guide.md, "Split a long sequence over ranks"):

    torchrun --nproc-per-node 2 docs/examples/split_sequence.py [--mixer flash] [--length 10000]

Each rank keeps its share of the positions; the mixer exchanges what its shape needs. Rank 0 prints how
far its share of the output is from the same mixer run on the whole sequence in one process."""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import tokenmix
from tokenmix.context import Split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mixer", default="flash")
    parser.add_argument("--length", type=int, default=10_000)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # "nccl" on GPUs
    torch.manual_seed(0)  # the same weights and inputs on every rank
    mixer = tokenmix.create_mixer(args.mixer, 64, causal=True)
    x = torch.randn(2, args.length, 64)  # a loader would give each rank only its share
    split = Split.of(x.shape[1])  # this rank holds positions [split.start, split.stop)
    y = mixer(split.local(x), context=split)  # this rank's share of the whole sequence's output
    y.sum().backward()  # gradients reach every rank's inputs; DDP would sum the parameters' over ranks
    with torch.no_grad():
        whole = mixer(x)  # for the check only: the whole sequence in one process
    difference = (y.detach() - split.local(whole)).abs().max()
    if split.rank == 0:
        print(
            f"{args.mixer}: {split.world} ranks, rank 0 holds {split.length} of {split.total} positions; "
            f"max |split − whole| = {difference:.2e}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
