"""The seed papers' own claims, tested at this project's CPU scale on the byte-level LM (the embedded
corpus), each variant trained for the same steps at every seed (the same batches), validation bits per
byte on the whole validation split:

- ``alpha``: pointwise (ReLU) attention scaled by L^(−α) at α ∈ {0, 0.5, 1, 1.5} against softmax
  (Wortsman et al. 2023: α ≈ 1 matches softmax; no scaling degrades).
- ``flash``: FLASH against a softmax Transformer at equal parameters (Hua et al. 2022: "Transformer
  quality in linear time"); FLASH's expansion is chosen so that its parameter count is the nearest to
  the Transformer's.
- ``aft``: the AFT paper's ordering on character LM (Zhai et al. 2021, Table 5: Transformer ≤ AFT-local
  < AFT-simple in bits per character), at a longer budget than ``compare --quick``.

    python benchmarks/claims.py [--claims alpha,flash,aft] [--steps 600] [--seeds 0,1] [--out FILE]

Every variant is one ``tokenmix train`` configuration (d=64, 2 Transformer layers, N=256, batch 16; GAU
and FLASH as their registration stacks them); the JSON keeps each seed's result and the verdicts use the
rule of ``tokenmix compare`` (difference of means ≥ twice its standard error).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from harness import write_results

from tokenmix.bench.report import separated
from tokenmix.mixers import mixer_info, model_options
from tokenmix.training import train
from tokenmix.training.trainer import measure_steps

DIM, LAYERS, SEQ_LEN, BATCH = 64, 2, 256, 16


def _config(mixer: str, **mixer_options: Any) -> dict[str, Any]:
    if "chunk_size" in mixer_info(mixer).options:  # as compare sets it: at most half the sequence
        mixer_options.setdefault("chunk_size", SEQ_LEN // 2)
    options = model_options(mixer, DIM, LAYERS, **mixer_options)
    return {**options, "seq_len": SEQ_LEN, "batch_size": BATCH, "eval_batches": None, "progress": "log"}


def _params(config: dict[str, Any]) -> int:
    return measure_steps({**config, "steps": 1, "eval_every": 1, "warmup_steps": 1}).params


def _flash_at_equal_params(softmax: dict[str, Any]) -> dict[str, Any]:
    target = _params(softmax)
    candidates = [_config("flash", expansion=e) for e in (1.0, 1.25, 1.5, 1.75, 2.0)]
    return min(candidates, key=lambda config: abs(_params(config) - target))


def variants(claim: str) -> dict[str, dict[str, Any]]:
    if claim == "alpha":
        pointwise = {f"pointwise α={a:g}": _config("pointwise", alpha=a) for a in (0.0, 0.5, 1.0, 1.5)}
        return {"softmax": _config("softmax"), **pointwise}
    if claim == "flash":
        softmax = _config("softmax")
        return {"softmax": softmax, "flash": _flash_at_equal_params(softmax)}
    return {name: _config(name) for name in ("softmax", "aft_local", "aft_simple")}


def run_claim(claim: str, steps: int, seeds: list[int]) -> dict[str, Any]:
    record: dict[str, Any] = {"claim": claim, "steps": steps, "seeds": seeds, "variants": {}}
    for name, config in variants(claim).items():
        runs = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as out:
                logged = train({**config, "steps": steps, "eval_every": steps, "warmup_steps": steps // 20,
                                "seed": seed, "out": out})  # fmt: skip
            runs.append({"seed": seed, "val_bpc": logged[-1]["val_bpc"]})
            print(f"{claim}: {name}, seed {seed}: {runs[-1]['val_bpc']:.4f} bpc", flush=True)
        values = [run["val_bpc"] for run in runs]
        record["variants"][name] = {
            "config": config,
            "params": _params(config),
            "runs": runs,
            "val_bpc": statistics.fmean(values),
            "spread": statistics.stdev(values) if len(values) > 1 else None,
        }
    return record


def separated_pair(record: dict[str, Any], a: str, b: str) -> bool:
    result = {"metric": "val_bpc", "mixers": record["variants"]}
    return separated(result, a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", default="alpha,flash,aft")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    records = [run_claim(claim, args.steps, seeds) for claim in args.claims.split(",")]
    for record in records:
        names = list(record["variants"])
        for a in names:
            v = record["variants"][a]
            spread = "" if v["spread"] is None else f" ± {v['spread']:.3f}"
            print(f"{record['claim']}: {a} ({v['params'] / 1e6:.3f}M): {v['val_bpc']:.3f}{spread}")
        pairs = [(a, b, separated_pair(record, a, b)) for i, a in enumerate(names) for b in names[i + 1 :]]
        record["told_apart"] = [{"a": a, "b": b, "told_apart": apart} for a, b, apart in pairs]
    print(f"wrote {write_results('claims', records, args.out)}")


if __name__ == "__main__":
    main()
