"""The training loop: AdamW, linear warmup + cosine decay, clipping, accumulation, bf16 autocast on
CUDA, optional torch.compile, DDP under torchrun, atomic checkpoints and bit-exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (
    append_json_line,
    latest_checkpoint,
    load_checkpoint,
    read_json_lines,
    save_checkpoint,
    save_weights,
    write_text_atomically,
)
from .config import TrainConfig
from .distributed import World
from .tasks import IGNORE, Task, create_task

METRICS, CONFIG = "metrics.jsonl", "config.json"
WEIGHTS, BEST_WEIGHTS = "model.safetensors", "model-best.safetensors"


def resolve_device(name: str, world: World | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available")
    if name == "cuda" and world is not None:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def _autocast(device: torch.device):
    # bf16 on CUDA; float32 on the CPU, where bf16 matmuls are slow and gain nothing.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy in nats, number of counted targets, number predicted right."""
    logits, targets = logits.float().flatten(0, -2), targets.flatten()
    counted = targets != IGNORE
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & counted).sum()
    return loss, counted.sum(), correct


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; biases, norms and the like are left alone.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    task: Task,
    split_name: str,
    max_batches: int | None,
    device: torch.device,
    world: World | None = None,
) -> dict[str, float]:
    """Loss (nats per counted target), accuracy and the task's metric over fixed batches of a split;
    under DDP each rank takes every size-th batch and the sums are all-reduced."""
    world = world or World()
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for index, (inputs, targets) in enumerate(task.eval_batches(split_name, max_batches)):
        if index % world.size != world.rank:
            continue
        with _autocast(device):
            logits = model(inputs.to(device))
        totals += torch.stack(_loss(logits, targets.to(device))).double()
    model.train(was_training)
    loss_sum, count, correct = world.sum(totals).tolist()
    loss, accuracy = loss_sum / max(count, 1), correct / max(count, 1)
    name = task.metric.removeprefix("val_")
    return {"loss": loss, "accuracy": accuracy, name: task.metric_value(loss, accuracy)}


class _StopOnSignal:
    """Ctrl-C / SIGTERM ask the loop to checkpoint and stop at the next step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint and stopping", file=sys.stderr)
        self.requested = True

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise; silent on ranks other than 0."""

    def __init__(self, config: TrainConfig, start: int, enabled: bool) -> None:
        use_bar = config.progress == "bar" or (config.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        self.enabled = enabled
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True)

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare_run_dir(run_dir: Path, config: TrainConfig) -> Path | None:
    """Check (before anything is written) that the run directory fits the request; return the
    checkpoint to resume from, if any."""
    if not config.resume:
        if (run_dir / CONFIG).exists():
            raise FileExistsError(
                f"{str(run_dir)!r} already holds a training run; pass --resume to continue it "
                "or choose another --out"
            )
        return None
    saved = TrainConfig.load(run_dir)
    differences = config.differences(saved)
    if differences:
        raise ValueError(
            f"--resume: {str(run_dir)!r} was trained with a different configuration ("
            + "; ".join(differences)
            + ")"
        )
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: {str(run_dir)!r} holds no complete checkpoint to resume from")
    return checkpoint


def train(
    config: TrainConfig | dict[str, Any], *, on_step: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Train as ``config`` says; returns the evaluation records (also in ``out/metrics.jsonl``).

    Under torchrun each process calls this; the global batch is split across ranks. ``on_step(step)``
    is called after every optimiser step.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    device = resolve_device(config.device)
    world = World.join(device.type)
    try:
        return _train(config, resolve_device(config.device, world), world, on_step)
    finally:
        world.leave()


def _train(
    config: TrainConfig, device: torch.device, world: World, on_step: Callable[[int], None] | None
) -> list[dict[str, Any]]:
    parts = world.size * config.grad_accum
    if config.batch_size % parts:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by processes × grad_accum = "
            f"{world.size} × {config.grad_accum}"
        )
    run_dir = Path(config.out)
    # Everything that can fail on bad input happens before the run directory is touched.
    task = create_task(config)
    torch.manual_seed(config.seed)
    model = task.build_model().to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    checkpoint = _prepare_run_dir(run_dir, config)
    world.barrier()  # every rank has checked the directory before rank 0 writes to it

    step, best_val_loss, window = 0, math.inf, [0.0, 0]
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, best_val_loss, window = state["step"], state["best_val_loss"], list(state["window"])
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            write_text_atomically(run_dir / CONFIG, _json(config.to_dict()))
            write_text_atomically(run_dir / METRICS, "")
        else:  # evaluations logged after the checkpoint are redone
            kept = [r for r in read_json_lines(run_dir / METRICS) if r["step"] <= step]
            write_text_atomically(run_dir / METRICS, "".join(_json(r, indent=None) + "\n" for r in kept))
    world.barrier()

    trained = DistributedDataParallel(model) if world.size > 1 else model
    forward = torch.compile(trained) if config.compile else trained
    rows = config.batch_size // world.size
    micro = rows // config.grad_accum
    progress = _Progress(config, step, world.is_main)
    if world.is_main:
        params = sum(p.numel() for p in model.parameters())
        progress.write(
            f"{config.task} | {config.mixer} | {params / 1e6:.2f}M parameters | {world.size} process(es) "
            f"on {device} | step {step}/{config.steps}"
        )

    def save(step: int) -> None:
        if world.is_main:
            trainer_state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {
                    "cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
                "best_val_loss": best_val_loss,
                "window": window,
            }
            save_checkpoint(run_dir, step, model, trainer_state)
            save_weights(model, run_dir / WEIGHTS, {"step": str(step)})
        world.barrier()

    model.train()
    window_start = time.perf_counter()
    with _StopOnSignal() as stop:
        while step < config.steps:
            inputs, targets = task.train_batch(step)
            inputs = inputs[world.rank * rows : (world.rank + 1) * rows].to(device)
            targets = targets[world.rank * rows : (world.rank + 1) * rows].to(device)
            step_loss = torch.zeros((), device=device)
            for index in range(config.grad_accum):
                last = index == config.grad_accum - 1
                sync = contextlib.nullcontext() if last or world.size == 1 else trained.no_sync()
                part = slice(index * micro, (index + 1) * micro)
                with sync:
                    with _autocast(device):
                        logits = forward(inputs[part])
                    loss_sum, count, _ = _loss(logits, targets[part])
                    loss = loss_sum / count.clamp_min(1)
                    (loss / config.grad_accum).backward()
                step_loss += loss.detach() / config.grad_accum
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_value = step_loss.item()
            if not math.isfinite(step_value):
                raise FloatingPointError(
                    f"training loss became {step_value} at step {step}; the last checkpoint is kept "
                    "(try a lower --lr or --grad-clip)"
                )
            window[0] += step_value
            window[1] += 1
            progress.step(step_value)
            if on_step is not None:
                on_step(step)
            stopping = world.any(stop.requested, device)
            if step % config.eval_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window_start
                train_loss = world.sum(torch.tensor([window[0] / window[1]], device=device)).item()
                scores = evaluate_model(model, task, "val", config.eval_batches, device, world)
                record = {
                    "step": step,
                    "train_loss": train_loss / world.size,
                    "val_loss": scores["loss"],
                    task.metric: scores[task.metric.removeprefix("val_")],
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": window[1] * config.batch_size * task.sequence_length / elapsed,
                }
                if scores["loss"] < best_val_loss:
                    best_val_loss = scores["loss"]
                    if world.is_main:
                        save_weights(model, run_dir / BEST_WEIGHTS, {"step": str(step)})
                window = [0.0, 0]
                if world.is_main:
                    append_json_line(run_dir / METRICS, record)
                progress.write(
                    f"step {step}/{config.steps}  train_loss {record['train_loss']:.4f}  "
                    f"val_loss {record['val_loss']:.4f}  {task.metric} {record[task.metric]:.4f}  "
                    f"{record['tokens_per_s']:.0f} tok/s"
                )
                save(step)
                window_start = time.perf_counter()
            elif stopping:
                save(step)
            if stopping:
                progress.write(f"stopped at step {step}; continue with --resume")
                break
    progress.close()
    world.barrier()
    return read_json_lines(run_dir / METRICS)


def _json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent)
