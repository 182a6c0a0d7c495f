"""``tokenmix compare``: mixers side by side — what they learn (val bits per byte on the embedded
corpus at one shared training budget) and what they cost (time, memory and decoding state across
sequence lengths) — in ``report.md``, a self-contained ``report.html`` and ``compare.json``."""

from __future__ import annotations

import base64
import html
import json
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import RunDirectoryError
from ..functional._checks import check_positive_int
from ..mixers import list_mixers, mixer_info
from ..training import TrainConfig, load_run, train
from ..training.checkpoint import check_directory_path
from .measure import machine
from .runner import bench, plot


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
    dtype: str = "float32"
    baselines: bool = True  # the raw SDPA layer in the benchmark


BUDGETS = {
    "quick": Budget(dim=64, depth=2, seq_len=128, batch_size=16, steps=120, eval_every=40,
                    seq_lens=(256, 512), repeats=3, baselines=False),
    "default": Budget(dim=128, depth=2, seq_len=256, batch_size=16, steps=600, eval_every=100,
                      seq_lens=(256, 1024, 4096), repeats=5),
    "gpu": Budget(dim=256, depth=6, seq_len=512, batch_size=32, steps=2000, eval_every=250,
                  seq_lens=(1024, 2048, 4096, 8192, 16384), repeats=10, dtype="bfloat16"),
}  # fmt: skip


def training_options(mixer: str, budget: Budget) -> dict[str, Any]:
    """How each mixer is put into the shared language model. GAU and FLASH follow their paper: blocks
    without an FFN, two per Transformer layer, RoPE inside the mixer. Attention gets 32-channel heads."""
    info = mixer_info(mixer)
    options: dict[str, Any] = {}
    if mixer in ("softmax", "pointwise"):
        options["heads"] = max(1, budget.dim // 32)
    if "chunk_size" in info.options:
        options["chunk_size"] = min(info.options["chunk_size"], budget.seq_len // 2)
    if mixer in ("gau", "flash"):
        return {"mixer_options": options, "depth": 2 * budget.depth, "ffn": False, "positions": "none"}
    return {"mixer_options": options}


def _train_one(mixer: str, budget: Budget, run_dir: Path, device: str, seed: int) -> dict[str, Any]:
    config = {
        "task": "charlm",
        "mixer": mixer,
        "dim": budget.dim,
        "depth": budget.depth,
        "seq_len": budget.seq_len,
        "batch_size": budget.batch_size,
        "steps": budget.steps,
        "eval_every": budget.eval_every,
        "warmup_steps": max(1, budget.steps // 20),
        "eval_batches": None,
        "seed": seed,
        "device": device,
        "progress": "log",
        "out": str(run_dir),
        **training_options(mixer, budget),
    }
    # An existing run of the same configuration is continued (or reused when finished).
    config["resume"] = (run_dir / "config.json").is_file()
    records = train(TrainConfig.from_dict(config))
    if not records or records[-1]["step"] < budget.steps:  # train returns early only when signalled
        raise CompareStopped(f"stopped while training {mixer}; run the same compare again to resume")
    _, _, model = load_run(run_dir, weights="last", device="cpu")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "curve": [(r["step"], r["val_bpc"]) for r in records],
        "val_bpc": records[-1]["val_bpc"],
        "best_val_bpc": min(r["val_bpc"] for r in records),
        "train_tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records),
    }


class CompareStopped(KeyboardInterrupt):
    """A signal (Ctrl-C, SIGTERM) stopped the comparison; finished runs are kept for the next one."""


class _SignalsStop:
    """SIGTERM stops the whole comparison as Ctrl-C does (a KeyboardInterrupt), between trainings too;
    the trainer handles both itself while a run trains (checkpoint, then stop)."""

    def __enter__(self) -> None:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        raise CompareStopped("stopped by SIGTERM; run the same compare again to resume")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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


def compare(
    mixers: Sequence[str] | None = None,
    *,
    out: str | Path = "compare-out",
    quick: bool = False,
    device: str = "auto",
    seq_lens: Sequence[int] | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train each mixer (default: all registered) on the embedded corpus at one budget, benchmark them,
    and write the report. On a GPU the budget and the lengths scale up. Returns what compare.json holds."""
    mixers = list(mixers or list_mixers())
    for name in mixers:
        mixer_info(name)  # unknown names fail before any work
    check_positive_int("steps", steps, allow_none=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = BUDGETS["quick" if quick else "gpu" if device == "cuda" else "default"]
    if seq_lens:
        budget = replace(budget, seq_lens=tuple(seq_lens))
    if steps is not None:
        budget = replace(budget, steps=steps, eval_every=max(1, min(budget.eval_every, steps)))
    out = Path(out)
    _claim(out)
    started = time.perf_counter()
    trained = {}
    with _SignalsStop():
        for name in mixers:
            print(f"== training {name}", flush=True)
            trained[name] = _train_one(name, budget, out / "runs" / name, device, seed)
        print("== benchmarking", flush=True)
        records = _bench_all(mixers, budget, device)
    return _write(out, budget, device, trained, records, started)


def _bench_all(mixers: list[str], budget: Budget, device: str) -> list[dict]:
    """Forward+backward at every length; a decoding step (which first decodes N − 1 tokens, one Python
    call each) only at the longest, the one the table reports."""
    options = dict(dim=budget.dim, batch=1, dtype=budget.dtype, device=device, repeats=budget.repeats)
    records = bench(mixers, budget.seq_lens, passes=("fwd+bwd",), baselines=budget.baselines, **options)
    return records + bench(mixers, budget.seq_lens[-1:], passes=("step",), baselines=False, **options)


def _write(
    out: Path, budget: Budget, device: str, trained: dict, records: list[dict], started: float
) -> dict[str, Any]:
    result = {
        "machine": machine(torch.device(device)),
        "budget": budget.__dict__,
        "mixers": trained,
        "bench": records,
        "seconds": time.perf_counter() - started,
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    print(f"wrote {out}/report.md, report.html, compare.json and plots")
    return result


def _bench_value(records: list[dict], mixer: str, pass_name: str, seq_len: int, key: str) -> float | None:
    for record in records:
        if (record["mixer"], record["pass"], record["seq_len"]) == (mixer, pass_name, seq_len):
            return None if record.get("oom") else record.get(key)
    return None


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report's one table: header and rows of formatted cells."""
    lens, records = result["budget"]["seq_lens"], result["bench"]
    header = ["mixer", "params", "val bpc", "train tok/s"]
    header += [f"ms fwd+bwd N={n}" for n in lens]
    header += [f"peak MB N={lens[-1]}", f"state MB N={lens[-1]}", f"ms/step N={lens[-1]}"]

    def cell(value: float | None, digits: int) -> str:
        return "OOM" if value is None else f"{value:.{digits}f}"

    rows = []
    for name, run in sorted(result["mixers"].items(), key=lambda item: item[1]["val_bpc"]):
        row = [
            name,
            f"{run['params'] / 1e6:.2f}M",
            f"{run['val_bpc']:.3f}",
            f"{run['train_tokens_per_s']:,.0f}",
        ]
        row += [cell(_bench_value(records, name, "fwd+bwd", n, "ms"), 1) for n in lens]
        row.append(cell(_bench_value(records, name, "fwd+bwd", lens[-1], "peak_mem_mb"), 1))
        row.append(cell(_bench_value(records, name, "step", lens[-1], "state_mb"), 3))
        row.append(cell(_bench_value(records, name, "step", lens[-1], "ms"), 2))
        rows.append(row)
    return header, rows


def summary(result: dict[str, Any]) -> list[str]:
    """Plain statements read off the measurements: who learned most, who is fastest at each length."""
    runs, records = result["mixers"], result["bench"]
    best = min(runs, key=lambda name: runs[name]["val_bpc"])
    lines = [f"Lowest validation bits per byte at this budget: **{best}** ({runs[best]['val_bpc']:.3f})."]
    for n in result["budget"]["seq_lens"]:
        times = {
            name: value
            for name in runs
            if (value := _bench_value(records, name, "fwd+bwd", n, "ms")) is not None
        }
        if times:
            fastest = min(times, key=times.get)
            lines.append(f"Fastest forward+backward at N={n}: **{fastest}** ({times[fastest]:.1f} ms).")
    return lines


def plot_curves(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, run in result["mixers"].items():
        steps, bpc = zip(*run["curve"], strict=True)
        axis.plot(steps, bpc, marker="o", markersize=3, label=name)
    axis.set(xlabel="optimiser step", ylabel="validation bits per byte", title="learning curves")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(result: dict[str, Any], out: Path) -> None:
    """report.md (plots beside it) and report.html (plots inlined)."""
    plot_curves(result, out / "curves.png")
    plot(result["bench"], out)
    header, rows = table(result)
    budget, info = result["budget"], result["machine"]
    setup = (
        f"Character LM on the embedded corpus (Moby-Dick), d={budget['dim']}, {budget['depth']} layers, "
        f"N={budget['seq_len']}, batch {budget['batch_size']}, {budget['steps']} steps, seed-matched. "
        f"Benchmarks: one causal layer, d={budget['dim']}, batch 1, {budget['dtype']}. "
        f"Machine: {info['device']} ({info['processor']}, {info['cpu_count']} cores, torch {info['torch']}). "
        f"Total {result['seconds'] / 60:.1f} min."
    )
    figures = [("curves.png", "Learning curves"), ("time.png", "Time vs N"), ("memory.png", "Memory vs N")]
    markdown = ["# tokenmix compare", "", setup, ""]
    markdown += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    markdown += ["", *[f"- {line}" for line in summary(result)], ""]
    markdown += [f"![{title}]({name})" for name, title in figures]
    (out / "report.md").write_text("\n".join(markdown) + "\n")

    def inline(name: str) -> str:
        return base64.b64encode((out / name).read_bytes()).decode()

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    bold = [html.escape(line).replace("**", "") for line in summary(result)]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>tokenmix compare</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "</style></head><body><h1>tokenmix compare</h1>"
        f"<p>{html.escape(setup)}</p><table><tr>{head}</tr>{body}</table>"
        "<ul>"
        + "".join(f"<li>{line}</li>" for line in bold)
        + "</ul>"
        + "".join(
            f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{inline(name)}'>"
            for name, title in figures
        )
        + "</body></html>"
    )
    (out / "report.html").write_text(page)


__all__ = ["BUDGETS", "Budget", "compare", "summary", "table", "write_report"]
