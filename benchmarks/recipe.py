"""The shared model recipe against a standard one: tokenmix's softmax ``LanguageModel`` and
x-transformers' ``TransformerWrapper`` + ``Decoder`` at about the same parameter count, trained in one
loop on the same batches of the embedded corpus (byte-level, seq 256, batch 16, AdamW lr 2e-3 with
β = (0.9, 0.95), weight decay 0.1 on matrices, 50 warmup steps, cosine to 10 %, clip 1), validation bits
per byte on the whole validation split at the listed steps.

    python benchmarks/recipe.py [--steps 400] [--eval-at 200,400] [--seeds 0,1] [--out FILE]

Each seed is one loop over both models (same initialisation seed, same batches).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import write_results
from torch import nn

from tokenmix.data.text import VOCAB_SIZE, load_corpus, random_windows, split
from tokenmix.models import LanguageModel
from tokenmix.training import TrainConfig
from tokenmix.training.tasks import step_generator
from tokenmix.training.trainer import build_optimizer, lr_factor

DIM, DEPTH, HEADS, SEQ_LEN, BATCH = 128, 4, 4, 256, 16


def x_transformers_model() -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=VOCAB_SIZE,
        max_seq_len=SEQ_LEN,
        attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=HEADS, attn_dim_head=DIM // HEADS),
    )


def tokenmix_model() -> nn.Module:
    return LanguageModel(
        VOCAB_SIZE, DIM, depth=DEPTH, mixer="softmax", max_len=SEQ_LEN, mixer_options={"heads": HEADS}
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "tokenmix": tokenmix_model,
    "x-transformers": x_transformers_model,
}


@torch.no_grad()
def validation_bpc(model: nn.Module, data: torch.Tensor) -> float:
    model.eval()
    count = (len(data) - 1) // SEQ_LEN
    inputs = data[: count * SEQ_LEN].long().view(count, SEQ_LEN)
    targets = data[1 : count * SEQ_LEN + 1].long().view(count, SEQ_LEN)
    total = 0.0
    for start in range(0, count, BATCH):
        logits = model(inputs[start : start + BATCH])
        total += F.cross_entropy(
            logits.flatten(0, 1), targets[start : start + BATCH].flatten(), reduction="sum"
        )
    model.train()
    return total.item() / targets.numel() / math.log(2)


def train_side_by_side(splits: dict, config: TrainConfig, seed: int, eval_at: set[int]) -> dict[str, dict]:
    """Every model of MODELS trained in one loop, each step's batch given to each in turn."""
    runs = {}
    for name, build in MODELS.items():
        torch.manual_seed(seed)
        model = build()
        optimizer = build_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
        params = sum(p.numel() for p in model.parameters())
        runs[name] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "params": params}
        runs[name].update(curve=[], seconds=0.0)
    for step in range(config.steps):
        inputs, targets = random_windows(splits["train"], SEQ_LEN, BATCH, step_generator(seed, step))
        for name, run in runs.items():
            start = time.perf_counter()
            logits = run["model"](inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run["model"].parameters(), config.grad_clip)
            run["optimizer"].step()
            run["scheduler"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            run["seconds"] += time.perf_counter() - start
            if step + 1 in eval_at:
                bpc = validation_bpc(run["model"], splits["val"])
                run["curve"].append({"step": step + 1, "val_bpc": bpc, "train_loss": loss.item()})
                print(
                    f"seed {seed}  {name:16s} step {step + 1:5d} val bpc {bpc:.4f}  {run['params']:,} params",
                    flush=True,
                )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-at", default="200,400")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out")
    args = parser.parse_args()
    eval_at = {int(s) for s in args.eval_at.split(",")}
    splits = split(load_corpus())
    config = TrainConfig(steps=args.steps, lr=2e-3, warmup_steps=50, weight_decay=0.1, grad_clip=1.0)
    records = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs = train_side_by_side(splits, config, seed, eval_at)
        records += [
            {
                "model": name,
                "seed": seed,
                "params": run["params"],
                "curve": run["curve"],
                "train_seconds": run["seconds"],
            }
            for name, run in runs.items()
        ]
    print(f"wrote {write_results('recipe', records, args.out)}")


if __name__ == "__main__":
    main()
