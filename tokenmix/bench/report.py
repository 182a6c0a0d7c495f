"""What ``tokenmix compare`` writes: the statistics over seeds, the table, the plain-language summary,
the plots (learning curves, quality against cost with the Pareto front) and report.md / report.html.

Everything here reads the ``compare.json`` dictionary (``tokenmix.bench.compare.compare`` returns it),
so a report can be rebuilt from a saved comparison.
"""

from __future__ import annotations

import base64
import html
import statistics
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

from .runner import plot
from .stats import ALPHA, MIN_SEEDS, pair_tests

HIGHER_IS_BETTER = frozenset({"val_acc", "test_acc"})
LABELS = {"val_bpc": "val bpc", "val_bpd": "val bpd", "val_acc": "val acc",
          "test_bpc": "test bpc", "test_bpd": "test bpd", "test_acc": "test acc"}  # fmt: skip
# Two mixers whose curves agree this closely at every evaluation of every seed learned the same model.
SAME_CURVE = 1e-4
OFF_BUDGET = 0.15  # a run whose training time is further than this from its time budget is flagged
RULE = (
    f"Two mixers are told apart when Welch's t-test on their seeds' values (unequal variances, "
    f"Welch–Satterthwaite degrees of freedom) gives p < {ALPHA:g} after Holm's correction over every pair "
    f"of the table; with fewer than {MIN_SEEDS} seeds per mixer nothing is told apart. ≈ best marks those "
    f"not told apart from the best. Every pair's p-values are in compare.json (pairs)."
)


def test_metric(metric: str) -> str:
    """The test split's name for a task's validation metric (``val_acc`` → ``test_acc``): tables report
    it; the validation split's is where choices (learning rate, positions) are made."""
    return "test_" + metric.removeprefix("val_")


def mean_and_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value: no spread was measured)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _better(result: dict[str, Any]) -> int:
    return -1 if result["metric"] in HIGHER_IS_BETTER else 1  # sort key sign: best first


def ranking(result: dict[str, Any]) -> list[str]:
    """Mixers from best to worst mean of the task metric."""
    metric, sign = result["metric"], _better(result)
    return sorted(result["mixers"], key=lambda name: sign * result["mixers"][name][metric])


def pairs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pair of the table's mixers with its Welch p-value, Holm-corrected, and whether it is told
    apart (``tokenmix.bench.stats``): what compare.json records as ``pairs``."""
    metric = result["metric"]
    return pair_tests({name: [r[metric] for r in run["runs"]] for name, run in result["mixers"].items()})


def apart_pairs(result: dict[str, Any]) -> set[frozenset[str]]:
    """The pairs of mixers the table's test tells apart (``RULE``), each as a frozenset of two names:
    the test runs over all pairs at once (Holm's correction), so callers ask it once per table."""
    return {frozenset((pair["a"], pair["b"])) for pair in pairs(result) if pair["apart"]}


def separated(result: dict[str, Any], a: str, b: str) -> bool:
    """Whether the table's test tells mixers ``a`` and ``b`` apart (``RULE``)."""
    return frozenset((a, b)) in apart_pairs(result)


def below_floor(result: dict[str, Any]) -> list[str]:
    """The mixers whose mean does not rise above the task's floor (``Task.floor``: what no mixing scores
    on this data): they did not learn what the task tests. Empty where the task states no floor."""
    floor, metric = result.get("floor"), result["metric"]
    if floor is None:
        return []
    return [name for name in ranking(result) if result["mixers"][name][metric] <= floor]


def off_budget(result: dict[str, Any]) -> list[str]:
    """Each run whose training time is over ``OFF_BUDGET`` off its time budget, as ``name seed S (T s)``."""
    return [
        f"{name} seed {run['seed']} ({run['train_seconds']:.1f} s for {run['budget_seconds']:g})"
        for name, mixer in result["mixers"].items()
        for run in mixer["runs"]
        if run.get("off_budget")
    ]


def like_the_control(result: dict[str, Any]) -> list[str]:
    """The mixers not told apart from the table's control (``identity``: the same model, no mixing):
    no evidence that they learned what the task tests. Empty without a control or below ``MIN_SEEDS``."""
    controls = [name for name in result["mixers"] if _is_control(name)]
    seeds = min(len(run["runs"]) for run in result["mixers"].values())
    if not controls or seeds < MIN_SEEDS:
        return []
    apart = apart_pairs(result)
    return [
        name
        for name in ranking(result)
        if not _is_control(name) and not any(frozenset((name, c)) in apart for c in controls)
    ]


def _is_control(name: str) -> bool:
    from ..mixers import mixer_info  # a registered name; a table rebuilt from old JSON may hold others

    try:
        return mixer_info(name).control
    except ValueError:
        return False


def tied_with_best(result: dict[str, Any]) -> set[str]:
    """The mixers the data cannot separate from the best (the best included)."""
    best, apart = ranking(result)[0], apart_pairs(result)
    return {name for name in result["mixers"] if frozenset((name, best)) not in apart}


def unseparated_neighbours(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Pairs of mixers next to each other in the ranking that the data cannot separate."""
    order, apart = ranking(result), apart_pairs(result)
    return [(a, b) for a, b in pairwise(order) if frozenset((a, b)) not in apart]


def same_curves(result: dict[str, Any]) -> list[tuple[str, str, float]]:
    """Pairs of mixers whose validation-loss curves agree within ``SAME_CURVE`` at every evaluation of
    every seed, with the largest difference: at this budget they are one model. The loss, not the metric:
    an accuracy moves in steps of 1/examples, and two different models tie on it by chance."""
    pairs = []
    for a, b in combinations(sorted(result["mixers"]), 2):
        runs_a, runs_b = result["mixers"][a]["runs"], result["mixers"][b]["runs"]
        if [r["seed"] for r in runs_a] != [r["seed"] for r in runs_b]:
            continue
        gaps = []
        for run_a, run_b in zip(runs_a, runs_b, strict=True):
            if "loss_curve" not in run_a or "loss_curve" not in run_b:  # a record from before the loss
                if result["metric"] in HIGHER_IS_BETTER:
                    break
                curve_a, curve_b = run_a["curve"], run_b["curve"]
            else:
                curve_a, curve_b = run_a["loss_curve"], run_b["loss_curve"]
            steps_a, values_a = zip(*curve_a, strict=True)
            steps_b, values_b = zip(*curve_b, strict=True)
            if steps_a != steps_b:
                break
            gaps += [abs(x - y) for x, y in zip(values_a, values_b, strict=True)]
        else:
            if gaps and max(gaps) < SAME_CURVE:
                pairs.append((a, b, max(gaps)))
    return pairs


def _bench_record(records: list[dict], mixer: str, pass_name: str, seq_len: int) -> dict | None:
    for record in records:
        if (record["mixer"], record["pass"], record["seq_len"]) == (mixer, pass_name, seq_len):
            return record
    return None


def _bench_value(records: list[dict], mixer: str, pass_name: str, seq_len: int, key: str) -> float | None:
    record = _bench_record(records, mixer, pass_name, seq_len)
    return None if record is None or record.get("oom") else record.get(key)


def costs(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each mixer's two costs for the quality-vs-cost plot: training seconds per step (mean over
    seeds) and the decoding state's size at the longest benchmark length."""
    longest = result["budget"]["seq_lens"][-1]
    return {
        name: {
            "seconds_per_step": run["seconds_per_step"],
            "state_mb": _bench_value(result["bench"], name, "step", longest, "state_mb"),
        }
        for name, run in result["mixers"].items()
    }


def pareto_front(points: dict[str, tuple[float, float]], higher_is_better: bool) -> set[str]:
    """Names not dominated: no other point is at most as costly and at least as good, one of the two
    strictly. ``points``: name → (cost, quality)."""
    sign = -1 if higher_is_better else 1

    def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
        return p[0] <= q[0] and sign * p[1] <= sign * q[1] and (p[0] < q[0] or p[1] != q[1])

    return {name for name, p in points.items() if not any(dominates(q, p) for q in points.values())}


def _metric_cell(run: dict[str, Any], metric: str) -> str:
    digits = 4 if metric == "val_acc" else 3
    if run["spread"] is None:
        return f"{run[metric]:.{digits}f}"
    return f"{run[metric]:.{digits}f} ± {run['spread']:.{digits}f}"


def _steps_cell(run: dict[str, Any]) -> str:
    """A mixer's steps: one number, or the range of its runs' (a time budget sets each run's)."""
    steps = [r.get("steps", run["steps"]) for r in run["runs"]]
    return str(steps[0]) if min(steps) == max(steps) else f"{min(steps)}–{max(steps)}"


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report's table, best mean first: header and rows of formatted cells."""
    lens, records, metric = result["budget"]["seq_lens"], result["bench"], result["metric"]
    header = ["mixer", "params", LABELS[metric], "≈ best", "seeds", "steps", "s/step", "train tok/s"]
    header += [f"ms fwd+bwd N={n}" for n in lens]
    header += [f"peak MB N={lens[-1]}", f"state MB N={lens[-1]}", f"ms/step N={lens[-1]}"]
    tied = tied_with_best(result)

    def cell(name: str, pass_name: str, n: int, key: str, digits: int) -> str:
        record = _bench_record(records, name, pass_name, n)
        if record is None:
            return "—"
        return "OOM" if record.get("oom") else f"{record[key]:.{digits}f}"

    rows = []
    for name in ranking(result):
        run = result["mixers"][name]
        row = [
            name,
            f"{run['params'] / 1e6:.2f}M",
            _metric_cell(run, metric),
            "yes" if name in tied else "",
            str(len(run["runs"])),
            _steps_cell(run),
            f"{run['seconds_per_step']:.3f}",
            f"{run['train_tokens_per_s']:,.0f}",
        ]
        row += [cell(name, "fwd+bwd", n, "ms", 1) for n in lens]
        row.append(cell(name, "fwd+bwd", lens[-1], "peak_mem_mb", 1))
        row.append(cell(name, "step", lens[-1], "state_mb", 3))
        row.append(cell(name, "step", lens[-1], "ms", 2))
        rows.append(row)
    return header, rows


def fastest_line(records: list[dict], mixers: list[str], n: int) -> str:
    """Who is fastest forward+backward at length ``n``: named only when its slowest repeat beats every
    other mixer's fastest; where the ranges overlap, the machine's noise could have ordered them."""
    timed = {
        name: r for name in mixers if (r := _bench_record(records, name, "fwd+bwd", n)) and not r.get("oom")
    }
    if not timed:
        return f"Forward+backward at N={n}: no mixer measured."
    order = sorted(timed, key=lambda name: timed[name]["ms"])
    first = timed[order[0]]
    high = first.get("ms_max", first["ms"])  # a record from before ranges were kept: its median alone
    overlapping = [name for name in order[1:] if timed[name].get("ms_min", timed[name]["ms"]) <= high]

    def spread(name: str) -> str:
        r = timed[name]
        return f"{name} {r['ms']:.1f} ms ({r.get('ms_min', r['ms']):.1f}–{r.get('ms_max', r['ms']):.1f})"

    if not overlapping:
        return (
            f"Fastest forward+backward at N={n}: **{order[0]}** ({spread(order[0])}, apart from every other)."
        )
    return (
        f"Fastest forward+backward at N={n}: none named — the ranges of the repeats of "
        f"{', '.join(spread(name) for name in [order[0], *overlapping])} overlap."
    )


def summary(result: dict[str, Any]) -> list[str]:
    """Plain statements read off the measurements: which mixers the data can and cannot separate,
    which learned the same model, who is fastest at each length, and the Pareto front."""
    metric, runs, records = result["metric"], result["mixers"], result["bench"]
    label, order, tied = LABELS[metric], ranking(result), tied_with_best(result)
    best, seeds = order[0], min(len(run["runs"]) for run in runs.values())
    lines = []
    if seeds < MIN_SEEDS:
        lines.append(
            f"{seeds} seed{'s' if seeds > 1 else ''} per mixer: fewer than {MIN_SEEDS} measure the spread "
            f"between seeds too poorly to test, so this run tells no difference in {label} apart and "
            f"names no winner. {'Highest' if metric in HIGHER_IS_BETTER else 'Lowest'} mean: {best} "
            f"({runs[best][metric]:.3f}). `--seeds {MIN_SEEDS}` or more makes the test."
        )
    elif tied == {best}:
        lines.append(
            f"Best mean {label} at this budget: **{best}** ({_metric_cell(runs[best], metric)}, "
            f"{len(runs[best]['runs'])} seeds), told apart from every other mixer by the rule below."
        )
    else:
        others = ", ".join(name for name in order if name in tied and name != best)
        lines.append(
            f"Best mean {label} at this budget: **{best}** ({_metric_cell(runs[best], metric)}); the data "
            f"cannot separate it from {others} — at this budget they are equally good."
        )
    neighbours = [pair for pair in unseparated_neighbours(result) if not set(pair) <= tied]  # not said above
    if seeds >= MIN_SEEDS and neighbours:
        lines.append(
            "Neighbours in the ranking that the data cannot tell apart: "
            + ", ".join(f"{a} ≈ {b}" for a, b in neighbours)
            + "."
        )
    off = off_budget(result)
    if off:
        lines.append(
            f"T{off_budget_note(off)[1:]}. Their quality is not the budget's; rerun them on a quiet machine."
        )
    alike = like_the_control(result)
    if alike:
        lines.append(
            f"{', '.join(alike)} not told apart from the control (identity: the same model without "
            f"mixing): no evidence they learned what the task tests."
        )
    stuck = below_floor(result)
    if stuck:
        lines.append(
            f"{', '.join(stuck)} did not rise above the task's floor, {result['floor']:.3f} (what its data "
            f"gives without the mixing the task tests), within their steps: they did not learn it."
        )
    for a, b, gap in same_curves(result):
        lines.append(
            f"{a} and {b} learned the same model at this budget: their curves agree within {gap:.1e} at "
            "every evaluation, so whatever distinguishes them has not moved from its initial value yet."
        )
    candidates = [name for name in runs if not _is_control(name)]  # the control is no choice to make
    lines += [fastest_line(records, candidates, n) for n in result["budget"]["seq_lens"]]
    for key, what in (("seconds_per_step", "training time per step"), ("state_mb", "decoding-state size")):
        points = {
            name: (c[key], runs[name][metric]) for name, c in costs(result).items() if c[key] is not None
        }
        front = pareto_front(points, metric in HIGHER_IS_BETTER)
        lines.append(
            f"Pareto-optimal in {label} against {what}: {', '.join(n for n in order if n in front)}."
        )
    lines.append(RULE)
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """The mean validation curve of each mixer, shaded between its seeds' lowest and highest."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, run in result["mixers"].items():
        curves = [dict(r["curve"]) for r in run["runs"]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        (line,) = axis.plot(
            steps, [statistics.fmean(v) for v in values], marker="o", markersize=3, label=name
        )
        if len(curves) > 1:
            axis.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2
            )
    selection = result.get("selection", result["metric"])  # the curves are the validation split's
    axis.set(xlabel="optimiser step", ylabel=LABELS[selection], title="learning curves (band: seeds)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_pareto(result: dict[str, Any], path: Path) -> None:
    """Quality against two costs, one panel each; Pareto-optimal mixers drawn as filled stars and
    joined, error bars one standard deviation over seeds."""
    plt = _pyplot()
    metric, runs = result["metric"], result["mixers"]
    panels = (("seconds_per_step", "training seconds per step"), ("state_mb", "decoding state MB (log)"))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (key, xlabel) in zip(axes, panels, strict=True):
        points = {
            name: (c[key], runs[name][metric]) for name, c in costs(result).items() if c[key] is not None
        }
        front = pareto_front(points, metric in HIGHER_IS_BETTER)
        for name, (x, y) in points.items():
            optimal = name in front
            style = dict(fmt="*", markersize=11, color="tab:red") if optimal else dict(fmt="o", markersize=6)
            axis.errorbar(x, y, yerr=runs[name]["spread"] or 0, capsize=3, **style)
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        line = sorted(points[name] for name in front)
        if line:
            axis.plot(*zip(*line, strict=True), color="tab:red", alpha=0.4, linestyle="--")
        axis.set(xlabel=xlabel, ylabel=LABELS[metric], xscale="log" if key == "state_mb" else "linear")
        axis.grid(True, alpha=0.3)
    figure.suptitle("quality against cost (stars: Pareto-optimal)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


FIGURES = (
    ("curves.png", "Learning curves"),
    ("pareto.png", "Quality against cost"),
    ("time.png", "Time vs N"),
    ("memory.png", "Memory vs N"),
)


def off_budget_note(off: list[str]) -> str:
    """The runs ``off_budget`` named, as a one-task report and a suite's say them."""
    return (
        f"trained for another time than the budget (over {OFF_BUDGET * 100:g} % off: the machine's load "
        f"changed while they trained, faster than the steps were re-planned): {', '.join(off)}"
    )


def calibration_note(result: dict[str, Any]) -> str:
    """How a time budget set the steps, and how noisy the timing that set them was."""
    timed = {
        f"{name} seed {run['seed']}": run["calibration"]
        for name, mixer in result["mixers"].items()
        for run in mixer["runs"]
        if run.get("calibration")
    }
    if not timed:
        return "steps set from a measured throughput"

    def width(c: dict[str, float]) -> float:
        return (c["max_s"] - c["min_s"]) / c["median_s"]

    noisiest = max(timed, key=lambda name: width(timed[name]))
    c = timed[noisiest]
    return (
        f"each run's steps planned from the median of {c['timed_steps']} steps timed just before it and "
        f"re-planned at the pace it trained; the noisiest timing, {noisiest}'s, ranged "
        f"{c['min_s']:.3g}–{c['max_s']:.3g} s a step around {c['median_s']:.3g} s"
    )


def setup_line(result: dict[str, Any]) -> str:
    budget, info = result["budget"], result["machine"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    if result["time_budget"] is not None:
        length = f"{result['time_budget']:g} s of training per run ({calibration_note(result)})"
    else:
        length = f"{budget['steps']} steps"
    return (
        f"Task {result['task']} on {result['data']}; d={budget['dim']}, {budget['depth']} layers, "
        f"N={budget['seq_len']}, batch {budget['batch_size']}, {length}, seeds {seeds} (the same batches "
        f"for every mixer at each seed); positions {budget.get('positions', 'as each mixer registers')} "
        f"for every mixer. Benchmarks: one causal layer, d={budget['dim']}, batch 1, "
        f"{budget['dtype']}. {machine_text(info)} Total {result['seconds'] / 60:.1f} min."
    )


def write_report(result: dict[str, Any], out: Path) -> None:
    """report.md (plots beside it) and report.html (plots inlined)."""
    plot_curves(result, out / "curves.png")
    plot_pareto(result, out / "pareto.png")
    figures = FIGURES[:2]
    if result["bench"]:
        plot(result["bench"], out)
        figures = FIGURES
    header, rows = table(result)
    write_pages(out, "tokenmix compare", setup_line(result), header, rows, summary(result), figures)


def machine_text(info: dict[str, Any]) -> str:
    return (
        f"Machine: {info['device']} ({info['processor']}, {info['cpu_count']} cores, torch {info['torch']})."
    )


def write_pages(
    out: Path,
    title: str,
    setup: str,
    header: list[str],
    rows: list[list[str]],
    lines: list[str],
    figures: list[tuple[str, str]],
) -> None:
    """report.md (figures beside it, by file name) and report.html (figures inlined): the setup, the
    table, the statements and the figures ``(file name, title)`` in ``out``."""
    markdown = [f"# {title}", "", setup, ""]
    markdown += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    markdown += ["", *[f"- {line}" for line in lines], ""]
    markdown += [f"![{caption}]({name})" for name, caption in figures]
    (out / "report.md").write_text("\n".join(markdown) + "\n")

    def inline(name: str) -> str:
        return base64.b64encode((out / name).read_bytes()).decode()

    def text(line: str) -> str:
        return html.escape(line).replace("**", "")

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{text(c)}</td>" for c in row) + "</tr>" for row in rows)
    items = "".join(f"<li>{text(line)}</li>" for line in lines)
    images = "".join(
        f"<h2>{caption}</h2><img alt='{caption}' src='data:image/png;base64,{inline(name)}'>"
        for name, caption in figures
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        f"</style></head><body><h1>{title}</h1>"
        f"<p>{html.escape(setup)}</p><table><tr>{head}</tr>{body}</table><ul>{items}</ul>{images}</body></html>"
    )
    (out / "report.html").write_text(page)


__all__ = [
    "RULE",
    "machine_text",
    "mean_and_spread",
    "pareto_front",
    "ranking",
    "same_curves",
    "separated",
    "summary",
    "table",
    "test_metric",
    "tied_with_best",
    "unseparated_neighbours",
    "write_pages",
    "write_report",
]
