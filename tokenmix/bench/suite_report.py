"""What ``tokenmix compare --suite`` writes: one table of mixers × tasks (mean ± sd over seeds, ≈ where the
data cannot separate a mixer from the task's best by ``report.RULE``), a heatmap, per task the mixers tied
with its best, in report.md and a self-contained report.html. Reads only the compare.json dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import (
    HIGHER_IS_BETTER,
    LABELS,
    RULE,
    _pyplot,
    below_floor,
    like_the_control,
    machine_text,
    off_budget,
    off_budget_note,
    ranking,
    tied_with_best,
    write_pages,
)
from .stats import MIN_SEEDS


def _cell(run: dict[str, Any], metric: str) -> str:
    spread = "" if run["spread"] is None else f" ± {run['spread']:.3f}"
    return f"{run[metric]:.3f}{spread}"


def suite_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: a row per mixer, a column per task (its metric); **best**, ≈ tied with it."""
    tasks = result["tasks"]
    mixers = list(next(iter(tasks.values()))["mixers"])
    header = ["mixer", *(f"{name} ({LABELS[record['metric']]})" for name, record in tasks.items())]
    rows = []
    for mixer in mixers:
        row = [mixer]
        for record in tasks.values():
            text = _cell(record["mixers"][mixer], record["metric"])
            best, tied = ranking(record)[0], tied_with_best(record)
            seeds = min(len(run["runs"]) for run in record["mixers"].values())
            if mixer == best:
                text = f"**{text}**"
            elif seeds >= MIN_SEEDS and mixer in tied:
                text = f"≈ {text}"
            row.append(text)
        rows.append(row)
    chance = ["chance", *(_level(record, "chance") for record in tasks.values())]
    floor = ["floor", *(_level(record, "floor") for record in tasks.values())]
    return header, [*rows, chance, floor]


def _level(record: dict[str, Any], key: str) -> str:
    return "—" if record.get(key) is None else f"{record[key]:.3f}"


def task_lines(result: dict[str, Any]) -> list[str]:
    """Per task: the best mixer and those the data cannot separate from it, or that one seed cannot; the
    runs trained off their time budget; the mixers like the control or not above the floor."""
    lines = []
    for name, record in result["tasks"].items():
        order, tied = ranking(record), tied_with_best(record)
        metric, best = record["metric"], order[0]
        seeds = min(len(run["runs"]) for run in record["mixers"].values())
        value = f"{record['mixers'][best][metric]:.3f}"
        chance = "" if record.get("chance") is None else f", chance {record['chance']:.3f}"
        if seeds < MIN_SEEDS:
            lines.append(f"{name}: {'highest' if metric in HIGHER_IS_BETTER else 'lowest'} {LABELS[metric]} "
                         f"{best} ({value}{chance}); {seeds} seed{'s' if seeds > 1 else ''} per mixer, fewer "
                         f"than {MIN_SEEDS}: nothing is told apart.")  # fmt: skip
            continue
        others = [mixer for mixer in order if mixer in tied and mixer != best]
        apart = (
            "told apart from every other mixer" if not others else f"not told apart from {', '.join(others)}"
        )
        lines.append(f"{name}: best **{best}** ({value}{chance}), {apart}.")
    for name, record in result["tasks"].items():
        off = off_budget(record)
        if off:
            lines.append(f"{name}: {off_budget_note(off)}; their values are not the budget's.")
        alike = like_the_control(record)
        if alike:
            lines.append(f"{name}: {', '.join(alike)} not told apart from the control (identity, no mixing).")
        stuck = below_floor(record)
        if stuck:
            lines.append(
                f"{name}: {', '.join(stuck)} did not rise above the floor {record['floor']:.3f} (what the "
                f"task's data gives without the mixing it tests) within their steps: they did not learn it."
            )
    return lines


def separating_tasks(result: dict[str, Any]) -> list[str]:
    """Tasks on which the data separates the best mixer from at least one other."""
    return [
        name
        for name, record in result["tasks"].items()
        if len(tied_with_best(record)) < len(record["mixers"])
    ]


def plot_heatmap(result: dict[str, Any], path: Path) -> None:
    """Mixers × tasks, each column scaled from its worst mixer (0) to its best (1), values written in."""
    plt = _pyplot()
    tasks = result["tasks"]
    mixers = list(next(iter(tasks.values()))["mixers"])
    grid = []
    for record in tasks.values():
        values = [record["mixers"][m][record["metric"]] for m in mixers]
        sign = 1 if record["metric"] in HIGHER_IS_BETTER else -1
        low, high = min(sign * v for v in values), max(sign * v for v in values)
        grid.append([(sign * v - low) / (high - low) if high > low else 1.0 for v in values])
    figure, axis = plt.subplots(figsize=(1.4 * len(tasks) + 2, 0.45 * len(mixers) + 1.5))
    columns = list(zip(*grid, strict=True))
    axis.imshow(columns, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    for i, mixer in enumerate(mixers):
        for j, record in enumerate(tasks.values()):
            value = record["mixers"][mixer][record["metric"]]
            colour = "black" if columns[i][j] > 0.6 else "white"
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)
    axis.set_xticks(range(len(tasks)), [f"{n}\n{LABELS[r['metric']]}" for n, r in tasks.items()], fontsize=8)
    axis.set_yticks(range(len(mixers)), mixers, fontsize=8)
    axis.set_title("each task scaled from its worst mixer (dark) to its best (light)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def setup_line(result: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in result["seeds"])
    data = "; ".join(f"{name}: {record['data']}" for name, record in result["tasks"].items())
    schemes = {record.get("positions", "as each mixer registers") for record in result["tasks"].values()}
    own = [f"{name} {record['time_budget']:g} s" for name, record in result["tasks"].items()
           if record.get("time_budget", result["time_budget"]) != result["time_budget"]]  # fmt: skip
    return (
        f"Suite {result['suite']}: d={result['dim']}, {result['depth']} layers, "
        f"{result['time_budget']:g} s of training per run{' (' + ', '.join(own) + ')' if own else ''}, each "
        f"run's steps planned from its step time measured just before it and re-planned at the pace it "
        f"trained; seeds {seeds}, positions "
        f"{', '.join(sorted(schemes))} for every mixer; learning rates chosen on the validation split, "
        f"every number the test split's. {data}. "
        f"{machine_text(result['machine'])} "
        f"Total {result['seconds'] / 60:.1f} min."
    )


def write_suite_report(result: dict[str, Any], out: Path) -> None:
    plot_heatmap(result, out / "heatmap.png")
    header, rows = suite_table(result)
    lines = task_lines(result)
    if len(result["seeds"]) > 1:
        lines += [f"Tasks that separate the mixers: {', '.join(separating_tasks(result)) or 'none'}.", RULE]
    figures = [("heatmap.png", "mixers × tasks")]
    write_pages(out, "tokenmix compare --suite", setup_line(result), header, rows, lines, figures)


__all__ = ["plot_heatmap", "separating_tasks", "suite_table", "task_lines", "write_suite_report"]
