"""Associative recall against decoding-state size, as Zoology measures it (Arora et al. 2023, figure 2):
two-layer models trained on MQAR at sequence lengths L with L/16 key–value pairs and model widths d,
each mixer at the best of a small learning-rate grid, accuracy plotted against the bytes of the
decoding state the model carries from token to token (``Mixer.state_bytes``, summed over its layers).

    python benchmarks/recall.py [--lens 64,128,256] [--dims 64,128] [--lrs 1e-3,3e-3] [--steps 600]
        [--mixers NAMES] [--jobs 2] [--out DIR]

Every run trains for the same number of steps on the same batches (seed 0; steps, not seconds, so what
a run learns does not depend on how busy the machine was), with ``tokens`` positions per step (batch =
tokens / L). The learning rate is chosen on the validation split; the accuracy reported is the test
split's (both fixed sets of rows, apart from training). Each run records the step at which it left the
no-recall plateau (the first evaluation half-way from the floor to 1; None: it did not within its
steps). ``DIR/recall.json`` holds every run, ``DIR/recall.png`` the plot, ``DIR/recall.md`` the table;
runs live in ``DIR/runs`` (not kept in git) and a finished one is reused when the script is run again,
so a sweep can be extended length by length (``--lens 64``, later ``--lens 64,128``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tokenmix.bench.compare import BUDGETS, training_options
from tokenmix.bench.measure import machine
from tokenmix.mixers import list_mixers
from tokenmix.mixers.base import Mixer
from tokenmix.models.backbone import POSITIONS
from tokenmix.training import TrainConfig, train
from tokenmix.training.runs import evaluate
from tokenmix.training.tasks import create_task

HEAD_WIDTH = 64  # attention as Zoology's small models have it: heads as wide as d=64
EVALUATIONS = 10


def vocab_for(pairs: int) -> int:
    """32 tokens (15 keys, 16 values) where they hold the pairs, else 4 per pair: a larger vocabulary
    keeps even softmax on the plateau far longer at this scale (64 tokens at L=64: no exit in 600 steps
    of 64 rows, where 32 leave it by step 300)."""
    return max(32, 4 * pairs)


def config_of(
    mixer: str,
    seq_len: int,
    dim: int,
    lr: float,
    steps: int,
    tokens: int,
    positions: str,
    out: Path,
) -> dict:
    budget = replace(
        BUDGETS["quick"], dim=dim, depth=2, seq_len=seq_len, head_width=HEAD_WIDTH, positions=positions
    )
    pairs = seq_len // 16
    return {
        "task": "mqar", "mixer": mixer, "dim": dim, "depth": 2, "seq_len": seq_len, "num_pairs": pairs,
        "vocab_size": vocab_for(pairs), "batch_size": max(1, tokens // seq_len),
        "steps": steps, "eval_every": max(1, steps // EVALUATIONS), "warmup_steps": max(1, steps // 20),
        "lr": lr, "eval_batches": 8, "seed": 0, "device": "cpu", "progress": "log",
        "out": str(out / "runs" / f"L{seq_len}-d{dim}" / mixer / f"lr-{lr:g}"),
        **training_options(mixer, budget),
    }  # fmt: skip


def left_plateau(curve: list[tuple[int, float]], floor: float) -> int | None:
    """The first evaluated step whose accuracy is half-way from the no-recall floor to 1 (None: none)."""
    return next((step for step, acc in curve if acc >= floor + (1 - floor) / 2), None)


def model_state_bytes(config: TrainConfig) -> int:
    """Bytes of the whole model's decoding state after ``seq_len`` tokens of one sequence."""
    model = create_task(config).build_model()
    return sum(m.state_bytes(config.seq_len) for m in model.modules() if isinstance(m, Mixer))


_SWEEP: int | None = None  # in a pool worker: the sweep's pid


def _stop_with_the_sweep() -> None:
    """A pool worker's initializer (Linux): SIGTERM when the sweep's process dies, even by a SIGTERM of its
    own. An idle worker ends; a training one stops at its next step with its checkpoint kept (``run``
    then ends the worker: nobody is left to take its result). Without it such workers trained on."""
    global _SWEEP
    _SWEEP = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run(point: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration (or reuse its finished run) and score it on both held-out splits."""
    torch.set_num_threads(1)  # one run a core: ``--jobs`` runs side by side
    config = TrainConfig.from_dict(point)
    config.resume = (Path(config.out) / "config.json").is_file()
    logged = train(config)
    if not finished(Path(config.out), config.steps):  # stopped by a signal, checkpoint kept
        if _SWEEP is not None and os.getppid() != _SWEEP:
            os._exit(1)  # the sweep is gone
        raise KeyboardInterrupt(
            f"{config.out}: stopped before step {config.steps}; run the sweep again to resume"
        )
    floor = create_task(config).floor()
    curve = [(r["step"], r["val_acc"]) for r in logged]
    test = evaluate(config.out, "test", device="cpu")
    seconds = sum(r.get("seconds", 0.0) for r in logged)
    return {
        "mixer": config.mixer, "seq_len": config.seq_len, "dim": config.dim, "lr": config.lr,
        "num_pairs": config.num_pairs, "steps": config.steps, "batch_size": config.batch_size,
        "positions": config.positions, "floor": floor, "val_acc": logged[-1]["val_acc"],
        "test_acc": test["test_acc"], "curve": curve, "left_plateau_at": left_plateau(curve, floor),
        "state_bytes": model_state_bytes(config), "seconds": seconds,
    }  # fmt: skip


def key(point: dict[str, Any]) -> tuple[str, int, int]:
    """A configuration of the sweep, whose learning-rate grid is one choice."""
    return point["mixer"], point["seq_len"], point["dim"]


def finished(run_dir: Path, steps: int) -> bool:
    """Whether ``run_dir`` holds a run that trained all its ``steps``."""
    try:
        last = (run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    except (OSError, IndexError):
        return False
    return json.loads(last)["step"] == steps


def best_of_grid(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (mixer, L, d) at the learning rate with the best validation accuracy (ties: the first)."""
    chosen: dict[tuple, dict] = {}
    for record in runs:
        if key(record) not in chosen or record["val_acc"] > chosen[key(record)]["val_acc"]:
            chosen[key(record)] = record
    return list(chosen.values())


def plot(best: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against state bytes, one panel per L, a line per mixer through its widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({r["seq_len"] for r in best})
    figure, axes = plt.subplots(1, len(lens), figsize=(5 * len(lens), 4.2), squeeze=False, sharey=True)
    for axis, seq_len in zip(axes[0], lens, strict=True):
        for i, mixer in enumerate(dict.fromkeys(r["mixer"] for r in best)):
            points = sorted((max(r["state_bytes"], 1), r["test_acc"]) for r in best
                            if r["mixer"] == mixer and r["seq_len"] == seq_len)  # fmt: skip
            if points:  # tab20: eleven mixers and more, each its own colour
                axis.plot(*zip(*points, strict=True), marker="o", label=mixer, color=plt.cm.tab20(i % 20))
        floor = max(r["floor"] for r in best if r["seq_len"] == seq_len)
        axis.axhline(floor, color="grey", linestyle=":", label="no-recall floor")
        axis.set(
            xscale="log",
            xlabel="decoding state (bytes, 1 = none)",
            title=f"L={seq_len}, {seq_len // 16} pairs",
        )
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("MQAR test accuracy")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(best: list[dict[str, Any]]) -> str:
    """Markdown: a row per mixer, a column per (L, d): test accuracy, the step it left the plateau at
    (— where it did not), the decoding state in KB."""
    columns = sorted({(r["seq_len"], r["dim"]) for r in best})
    cells = {(r["mixer"], r["seq_len"], r["dim"]): r for r in best}
    lines = ["| mixer | " + " | ".join(f"L={n}, d={d}" for n, d in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    for mixer in dict.fromkeys(r["mixer"] for r in best):
        row = []
        for n, d in columns:
            r = cells.get((mixer, n, d))
            left = "—" if r is None or r["left_plateau_at"] is None else str(r["left_plateau_at"])
            row.append("" if r is None else f"{r['test_acc']:.3f} ({left}; {r['state_bytes'] / 1024:.1f} KB)")
        lines.append(f"| {mixer} | " + " | ".join(row) + " |")
    floors = [f"{max(r['floor'] for r in best if (r['seq_len'], r['dim']) == c):.3f}" for c in columns]
    lines.append("| floor | " + " | ".join(floors) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps(result, indent=2))
    plot(result["best"], out / "recall.png")
    (out / "recall.md").write_text(table(result["best"]))
    print(f"wrote {out}/recall.json, recall.png and recall.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lens", default="64,128,256")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--lrs", default="1e-3,3e-3")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tokens", type=int, default=4096, help="positions per step (batch = tokens / L)")
    parser.add_argument("--positions", default="learned", choices=POSITIONS)
    parser.add_argument("--mixers", default=",".join(list_mixers()))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=f"benchmarks/results/cpu-recall-{datetime.date.today()}")
    parser.add_argument("--replot", action="store_true", help="rewrite the plot and table of DIR/recall.json")
    parser.add_argument("--finished", action="store_true", help="gather only the runs already finished")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        return write(json.loads((out / "recall.json").read_text()), out)
    points = [
        config_of(mixer, seq_len, dim, lr, args.steps, args.tokens, args.positions, out)
        for seq_len in map(int, args.lens.split(","))
        for dim in map(int, args.dims.split(","))
        for mixer in args.mixers.split(",")
        for lr in map(float, args.lrs.split(","))
    ]
    if args.finished:  # a sweep cut short: record the configurations whose whole grid finished
        done = {key(p) for p in points} - {key(p) for p in points if not finished(Path(p["out"]), p["steps"])}
        points = [point for point in points if key(point) in done]
    with ProcessPoolExecutor(args.jobs, initializer=_stop_with_the_sweep) as pool:
        runs = []
        for record in pool.map(run, points):
            runs.append(record)
            print(f"L={record['seq_len']} d={record['dim']} {record['mixer']} lr={record['lr']:g}: test "
                  f"{record['test_acc']:.3f} (floor {record['floor']:.3f}), left the plateau at "
                  f"{record['left_plateau_at']}", flush=True)  # fmt: skip
    result = {"machine": machine(), "head_width": HEAD_WIDTH, "steps": args.steps,
              "positions": args.positions, "tokens_per_step": args.tokens, "lrs": args.lrs, "runs": runs,
              "best": best_of_grid(runs)}  # fmt: skip
    write(result, out)


if __name__ == "__main__":
    main()
