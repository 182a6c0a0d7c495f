"""The seed papers' own claims, each tested in its own setting at this project's CPU scale, every
variant trained for the same steps at every seed (the same batches), every mixer with the same position
scheme, the number reported the test split's:

- ``alpha``: ReLU attention scaled by L^(−α), α ∈ {0, 0.5, 1, 1.5}, against softmax in a Vision
  Transformer on Fashion-MNIST (Wortsman et al. 2023, "Replacing softmax with ReLU in Vision
  Transformers": α ≈ 1 matches softmax; without the scaling accuracy drops). 4×4 patches (49 tokens and a
  class token), learned positions for all.
- ``flash``: FLASH against a softmax Transformer at equal parameters on the byte-level LM, both with
  rotary positions (Hua et al. 2022, "Transformer quality in linear time"); FLASH's expansion is chosen
  so that its parameter count is the nearest to the Transformer's.
- ``aft``: the AFT paper's ordering on character LM (Zhai et al. 2021, Table 5: Transformer ≤ AFT-local
  < AFT-simple in bits per character), the Transformer with rotary positions and the AFTs with their own
  position terms only (neither takes rotary ones; none gets learned absolute positions).

    python benchmarks/claims.py [--claims alpha,flash,aft] [--steps 600] [--seeds 0,1,2] [--jobs 2]
        [--out FILE]

d=64, 2 layers (GAU and FLASH as their registration stacks them); byte LM: N=256, batch 16, the
embedded corpus; images: batch 64. Told apart: Welch's t-test with Holm's correction over each claim's
pairs (``tokenmix.bench.stats``), three seeds or more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from harness import write_results

from tokenmix.bench.compare import BUDGETS, training_options
from tokenmix.bench.stats import pair_tests
from tokenmix.training import train
from tokenmix.training.runs import evaluate
from tokenmix.training.trainer import measure_steps

DIM, LAYERS = 64, 2
SETTINGS = {  # claim → the task it is tested on and the position scheme every variant shares
    "alpha": {"task": "image-cls", "data": "fashion-mnist", "batch_size": 64, "positions": "learned"},
    "flash": {"task": "charlm", "seq_len": 256, "batch_size": 16, "positions": "rope"},
    "aft": {"task": "charlm", "seq_len": 256, "batch_size": 16, "positions": "rope"},
}


def _config(claim: str, mixer: str, **mixer_options: Any) -> dict[str, Any]:
    setting = dict(SETTINGS[claim])
    budget = replace(BUDGETS["quick"], dim=DIM, depth=LAYERS, positions=setting.pop("positions"),
                     seq_len=setting.get("seq_len", 256))  # fmt: skip
    options = training_options(mixer, budget)
    options["mixer_options"] = {**options["mixer_options"], **mixer_options}
    return {**setting, "mixer": mixer, "dim": DIM, "depth": LAYERS, **options, "eval_batches": 16,
            "device": "cpu", "progress": "log"}  # fmt: skip


def _params(config: dict[str, Any]) -> int:
    return measure_steps({**config, "steps": 1, "eval_every": 1, "warmup_steps": 1}).params


def _flash_at_equal_params(softmax: dict[str, Any]) -> dict[str, Any]:
    target = _params(softmax)
    candidates = [_config("flash", "flash", expansion=e) for e in (1.0, 1.25, 1.5, 1.75, 2.0)]
    return min(candidates, key=lambda config: abs(_params(config) - target))


def variants(claim: str) -> dict[str, dict[str, Any]]:
    if claim == "alpha":
        pointwise = {f"relu α={a:g}": _config(claim, "pointwise", alpha=a) for a in (0.0, 0.5, 1.0, 1.5)}
        return {"softmax": _config(claim, "softmax"), **pointwise}
    if claim == "flash":
        softmax = _config(claim, "softmax")
        return {"softmax": softmax, "flash": _flash_at_equal_params(softmax)}
    return {name: _config(claim, name) for name in ("softmax", "aft_local", "aft_simple")}


def run(point: dict[str, Any]) -> dict[str, Any]:
    """Train one variant at one seed; its test split's metric, the weights the last validation scored."""
    torch.set_num_threads(1)  # one run a core: ``--jobs`` runs side by side
    with tempfile.TemporaryDirectory() as out:
        logged = train({**point["config"], "seed": point["seed"], "out": out})
        test = evaluate(
            out, "test", weights="last", device="cpu", max_batches=point["config"]["eval_batches"]
        )
    metric = next(key for key in test if key.startswith("test_") and key != "test_loss")
    value = test[metric]
    print(f"{point['claim']}: {point['name']}, seed {point['seed']}: {metric} {value:.4f}", flush=True)
    return {**point, "metric": metric, "value": value, "val": logged[-1][metric.replace("test_", "val_")]}


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """One panel per claim: each variant's seeds (dots) and mean ± sd (bar), on the claim's test metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(records), figsize=(4.5 * len(records), 4), squeeze=False)
    for axis, record in zip(axes[0], records, strict=True):
        metric = record["metric"]
        for i, variant in enumerate(record["variants"].values()):
            values = [run[metric] for run in variant["runs"]]
            axis.errorbar(i, variant["mean"], yerr=variant["spread"] or 0, fmt="s", capsize=4, color="black")
            axis.scatter([i] * len(values), values, alpha=0.5)
        axis.set_xticks(range(len(record["variants"])), list(record["variants"]), rotation=30, fontsize=8)
        axis.set(title=record["claim"], ylabel=metric.replace("_", " "))
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", default="alpha,flash,aft")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out")
    parser.add_argument("--plot", metavar="JSON", help="only draw JSON's records beside it (.png)")
    args = parser.parse_args()
    if args.plot:
        source = Path(args.plot)
        return plot(json.loads(source.read_text())["records"], source.with_suffix(".png"))
    seeds = [int(s) for s in args.seeds.split(",")]
    claims = args.claims.split(",")
    steps = {"steps": args.steps, "eval_every": args.steps, "warmup_steps": args.steps // 20}
    chosen = {claim: variants(claim) for claim in claims}
    points = [
        {"claim": claim, "name": name, "seed": seed, "config": {**config, **steps}}
        for claim in claims
        for name, config in chosen[claim].items()
        for seed in seeds
    ]

    # The flash and aft claims share one softmax Transformer: each configuration trains once per seed.
    def key(point: dict[str, Any]) -> str:
        return json.dumps([point["config"], point["seed"]], sort_keys=True)

    unique: dict[str, dict[str, Any]] = {}
    for point in points:
        unique.setdefault(key(point), point)
    with ProcessPoolExecutor(args.jobs) as pool:
        trained = dict(zip(unique, pool.map(run, unique.values()), strict=True))
    results = [{**trained[key(p)], "claim": p["claim"], "name": p["name"]} for p in points]
    records = []
    for claim in claims:
        record: dict[str, Any] = {"claim": claim, "steps": args.steps, "seeds": seeds, "variants": {}}
        for name, config in chosen[claim].items():
            runs = [r for r in results if r["claim"] == claim and r["name"] == name]
            values = [r["value"] for r in runs]
            record["metric"] = runs[0]["metric"]
            record["variants"][name] = {
                "config": config,
                "params": _params(config),
                "runs": [{"seed": r["seed"], r["metric"]: r["value"], "val": r["val"]} for r in runs],
                "mean": statistics.fmean(values),
                "spread": statistics.stdev(values) if len(values) > 1 else None,
            }
        record["pairs"] = pair_tests({name: [r["value"] for r in results if r["claim"] == claim
                                             and r["name"] == name] for name in chosen[claim]})  # fmt: skip
        records.append(record)
        for name, v in record["variants"].items():
            spread = "" if v["spread"] is None else f" ± {v['spread']:.4f}"
            print(f"{claim}: {name} ({v['params'] / 1e6:.3f}M): {record['metric']} {v['mean']:.4f}{spread}")
        for pair in record["pairs"]:
            verdict = "told apart" if pair["apart"] else "not told apart"
            print(f"{claim}: {pair['a']} vs {pair['b']}: p={pair['p']}, Holm {pair['p_holm']}: {verdict}")
    written = write_results("claims", records, args.out)
    plot(records, written.with_suffix(".png"))
    print(f"wrote {written} and {written.with_suffix('.png')}")


if __name__ == "__main__":
    main()
