"""Training throughput with ``--compile`` (torch.compile, inductor) against eager, per mixer, on the CPU:
the language model of ``tokenmix compare --quick`` (d=64, 2 layers — GAU and FLASH 4 blocks without FFN —,
N=128, batch 16, AdamW) on the embedded corpus. Each mode: one warm-up step (compiling, when compiled),
then --steps timed optimiser steps; graph breaks counted by dynamo.

    python benchmarks/compile_training.py [--mixers softmax,aft_local] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse

import torch
from harness import write_results

from tokenmix.bench.compare import BUDGETS, training_options
from tokenmix.mixers import list_mixers
from tokenmix.training.trainer import measure_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixers", default=",".join(list_mixers()))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    budget = BUDGETS["quick"]
    records = []
    for mixer in args.mixers.split(","):
        config = {"mixer": mixer, "dim": budget.dim, "depth": budget.depth, "seq_len": budget.seq_len,
                  "batch_size": budget.batch_size, "device": "cpu", "out": "unused",
                  **training_options(mixer, budget)}  # fmt: skip
        record = {"mixer": mixer}
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            measured = measure_steps({**config, "compile": mode == "compiled"}, args.steps)
            record[mode] = {
                "tokens_per_s": measured.tokens_per_step / measured.seconds_per_step,
                "ms_per_step": 1000 * measured.seconds_per_step,
                "first_step_s": measured.first_step_seconds,
                "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            }
        record["speedup"] = record["compiled"]["tokens_per_s"] / record["eager"]["tokens_per_s"]
        records.append(record)
        eager, compiled = record["eager"], record["compiled"]
        print(
            f"{mixer:13s} eager {eager['tokens_per_s']:9,.0f} tok/s"
            f"  compiled {compiled['tokens_per_s']:9,.0f} tok/s"
            f"  ×{record['speedup']:.2f}  (compiling {compiled['first_step_s']:.0f} s, "
            f"{compiled['graph_breaks']} graph breaks)",
            flush=True,
        )
    print(f"wrote {write_results('compile-training', records, args.out)}")


if __name__ == "__main__":
    main()
