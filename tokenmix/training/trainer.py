"""The training loop: AdamW, linear warmup + cosine decay, clipping, accumulation, bf16 autocast on
CUDA, optional torch.compile, DDP or FSDP2 under torchrun, activation checkpointing, atomic checkpoints
and bit-exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..context.exchange import Split
from ..data.documents import cu_seqlens_of
from ..errors import DivergedError, InvalidValueError, RunDirectoryError, UnavailableError
from ..models.backbone import set_activation_checkpointing
from .checkpoint import (
    LOCK,
    RunLock,
    append_json_line,
    check_directory_path,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    read_json_lines,
    save_checkpoint,
    save_weights,
    write_text_atomically,
)
from .config import TrainConfig
from .distributed import World
from .sharding import (
    build_sharded,
    is_distributed_checkpoint,
    is_sharded,
    load_sharded,
    save_full_weights,
    save_sharded_checkpoint,
)
from .tasks import IGNORE, Task, create_task

METRICS, CONFIG, TENSORBOARD = "metrics.jsonl", "config.json", "tensorboard"
WEIGHTS, BEST_WEIGHTS = "model.safetensors", "model-best.safetensors"


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device this machine has."""
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name)):
        raise InvalidValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UnavailableError(f"device {name!r} was asked for but CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UnavailableError(
            f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} GPU(s)"
        )
    if name == "cuda" and world is not None:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def _autocast(device: torch.device):
    # bf16 on CUDA; float32 on the CPU, where bf16 matmuls are slow and gain nothing.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy in nats, number of counted targets, number predicted right."""
    logits, targets = logits.float().flatten(0, -2), targets.flatten()
    counted = targets != IGNORE
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & counted).sum()
    return loss, counted.sum(), correct


def forward_rows(
    forward: Callable[..., torch.Tensor],
    inputs: torch.Tensor,
    segments: torch.Tensor | None,
    split: Split | None = None,
) -> torch.Tensor:
    """Logits (B, N, V) of rows (B, N); rows of packed documents (``segments`` (B, N): each position's
    document within its row) run as one packed row with cu_seqlens, so no document sees another. With
    ``split``: this rank's share of the rows' positions, (B, n, V)."""
    if split is not None:
        return forward(_share(inputs, split), context=split)
    if segments is None:
        return forward(inputs)
    rows, length = inputs.shape
    logits = forward(inputs.reshape(1, rows * length), cu_seqlens=cu_seqlens_of(segments))
    return logits.view(rows, length, -1)


def split_order(model: nn.Module) -> str:
    """The order a context-parallel run splits sequences in (docs/spec.md §14): zig-zag when every mixer
    is causal and takes it (the all-pairs mixers: each rank then does about the same work), contiguous
    otherwise (windows and states pass from rank to rank in the sequence's order)."""
    mixers = [m for m in model.modules() if hasattr(m, "split_orders")]
    balanced = mixers and all(m.causal and "zigzag" in m.split_orders for m in mixers)
    return "zigzag" if balanced else "contiguous"


def _share(rows: torch.Tensor, split: Split | None) -> torch.Tensor:
    """This rank's positions of (B, N) rows (all of them without a split)."""
    return rows if split is None else split.local(rows, 1)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def undecayed_names(model: nn.Module) -> set[str]:
    """The parameters weight decay leaves alone, by what they are: every one of fewer than two dimensions
    (biases, norms' gains and offsets), and those a module marks where it makes them, in its
    ``no_weight_decay`` (names relative to it: gains and offsets kept as matrices, position tables,
    learned inputs). The marks are module attributes, so they hold after FSDP2 swaps the parameters."""
    names = {name for name, p in model.named_parameters() if p.dim() < 2}
    for prefix, module in model.named_modules():
        for name in getattr(module, "no_weight_decay", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    undecayed = undecayed_names(model)
    decay = [p for name, p in model.named_parameters() if name not in undecayed]
    rest = [p for name, p in model.named_parameters() if name in undecayed]
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
    under DDP or FSDP each rank takes every size-th batch and the sums are all-reduced."""
    world = world or World()
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    batches = list(task.eval_batches(split_name, max_batches))
    split = world.split(task.sequence_length, split_order(model))
    # A sharded model gathers its weights in every forward, with every rank: all run the same number.
    rounds = math.ceil(len(batches) / world.data_size) if is_sharded(model) else None
    for index in _my_batches(len(batches), world, rounds):
        inputs, targets, *segments = batches[index % len(batches)]
        segments = segments[0].to(device) if segments else None
        with _autocast(device):
            logits = forward_rows(model, inputs.to(device), segments, split)
        if index < len(batches):  # (beyond: a sharded rank's forward that only keeps the others company)
            targets = _share(targets.to(device), split)  # a split sequence's sums add up over its ranks
            totals += torch.stack((*token_loss(logits, targets), task.target_bytes(targets))).double()
    model.train(was_training)
    loss_sum, count, correct, text_bytes = world.sum(totals).tolist()
    loss, accuracy = loss_sum / max(count, 1), correct / max(count, 1)
    metric = task.metric_value(loss, accuracy, loss_sum / max(text_bytes, 1))
    return {"loss": loss, "accuracy": accuracy, task.metric.removeprefix("val_"): metric}


def _my_batches(count: int, world: World, rounds: int | None) -> range:
    """The indices of the batches this rank's replica evaluates: every size-th; with ``rounds``, exactly
    that many (indices past ``count`` are forwards whose result is dropped)."""
    end = count if rounds is None else rounds * world.data_size
    return range(world.data_rank, end, world.data_size)


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

    def plan(self, steps: int) -> None:
        if self.bar is not None and self.bar.total != steps:
            self.bar.total = steps
            self.bar.refresh()

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


def _is_ours(path: Path) -> bool:
    return path.name in (LOCK, LOCK + ".owner")


def _check_run_dir(run_dir: Path, config: TrainConfig) -> Path | None:
    """Check, before anything is written, that ``run_dir`` may take this run: a new or empty directory,
    or (with ``resume``) a run of the same configuration. Returns the checkpoint to resume from, or None
    to start at step 0 (also for a run that stopped before its first checkpoint)."""
    check_directory_path(run_dir)
    is_run = (run_dir / CONFIG).is_file()
    if not config.resume:
        if is_run:
            raise RunDirectoryError(
                f"{str(run_dir)!r} already holds a training run; pass --resume to continue it "
                "or choose another --out"
            )
        if run_dir.is_dir() and any(not _is_ours(p) for p in run_dir.iterdir()):
            raise RunDirectoryError(
                f"--out {str(run_dir)!r} is a non-empty directory that is not a tokenmix run; "
                "tokenmix writes only into a new or empty directory (its files are left alone)"
            )
        return None
    saved = TrainConfig.load(run_dir)
    differences = config.differences(saved)
    if differences:
        raise InvalidValueError(
            f"--resume: {str(run_dir)!r} was trained with a different configuration ("
            + "; ".join(differences)
            + ")"
        )
    return latest_checkpoint(run_dir)


def train(
    config: TrainConfig | dict[str, Any], *, on_step: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Train as ``config`` says; returns the evaluation records (also in ``out/metrics.jsonl``).

    Under torchrun each process calls this; the global batch is split across ranks. ``on_step(step)``
    is called after every optimiser step. Nothing is written until the whole configuration has been
    checked (the model built and run on one batch), and the run directory is locked while it trains.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    device = resolve_device(config.device)
    world = World.join(device.type, sharded=config.fsdp)
    try:
        world = _with_context(world, config)
        return _train(config, resolve_device(config.device, world), world, on_step)
    finally:
        world.leave()


def _with_context(world: World, config: TrainConfig) -> World:
    """The world with ``--context-parallel``'s groups, after the checks that need no group."""
    if config.context_parallel == 1:
        return world
    for flag, given in (("--pack", config.pack), ("--compile", config.compile)):
        if given:
            raise InvalidValueError(f"{flag} with --context-parallel: not supported yet")
    if config.task not in ("charlm", "mqar", "induction", "selective-copy"):
        raise InvalidValueError(
            f"--context-parallel splits a language model's sequences; task {config.task!r} is not one"
        )
    return world.with_context(config.context_parallel)


class Measured(NamedTuple):
    """What ``measure_steps`` found: parameters, positions per optimiser step, seconds per step."""

    params: int
    tokens_per_step: int
    seconds_per_step: float | None  # None when no step was timed: the median of the timed steps
    first_step_seconds: float | None = None  # the untimed warm-up step (with --compile: compiling)
    step_seconds: tuple[float, ...] = ()  # each timed step (their spread: how noisy the timing was)


def measure_steps(config: TrainConfig | dict[str, Any], steps: int = 0) -> Measured:
    """Check ``config`` as ``train`` does before writing (task, data, model on one example) and, with
    ``steps`` > 0, time that many optimiser steps after one warm-up step (``config.compile``: through
    ``torch.compile``, as ``train`` runs it). Writes nothing."""
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    run = _Run(config, resolve_device(config.device), World())
    run.dry_run()
    params = sum(p.numel() for p in run.model.parameters())
    tokens = config.batch_size * run.task.sequence_length
    if steps == 0:
        return Measured(params, tokens, None)
    run.model.train()
    forward = torch.compile(run.model) if config.compile else run.model
    start = time.perf_counter()
    run.train_step(forward, run.model)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):  # each step timed alone: the median resists one step slowed by the machine
        start = time.perf_counter()
        run.train_step(forward, run.model)
        times.append(time.perf_counter() - start)
    return Measured(params, tokens, statistics.median(times), first, tuple(times))


class _Run:
    """Everything one training run holds: task, model, optimiser, schedule and counters."""

    def __init__(self, config: TrainConfig, device: torch.device, world: World) -> None:
        parts = world.data_size * config.grad_accum
        if config.batch_size % parts:
            raise InvalidValueError(
                f"batch_size={config.batch_size} must be divisible by data-parallel processes × grad_accum "
                f"= {world.data_size} × {config.grad_accum}"
            )
        # A copy: a time budget re-plans its steps (the caller's configuration is left as given).
        config = dataclasses.replace(config)
        self.config, self.device, self.world = config, device, world
        self.run_dir = Path(config.out)
        self.task = create_task(config)
        torch.manual_seed(config.seed)
        if config.fsdp:
            self.model = build_sharded(self.task.build_model, device, config.seed)
        else:
            self.model = self.task.build_model().to(device)
        set_activation_checkpointing(self.model, config.activation_checkpointing)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config)
        )
        self.step, self.best_val_loss, self.window = 0, math.inf, [0.0, 0]
        self.trained_seconds = 0.0  # optimiser steps' time, evaluations and checkpoints excluded
        self.rows = config.batch_size // world.data_size
        # Each sequence's share on this rank.
        self.split = world.split(self.task.sequence_length, split_order(self.model))
        self.saved = False
        self.events: Any = None  # TensorBoard's SummaryWriter with --log tensorboard
        if config.log == "tensorboard":
            try:
                import tensorboard  # noqa: F401  (checked before anything is written)
            except ImportError:
                raise UnavailableError(
                    "--log tensorboard needs the tensorboard package: pip install 'tokenmix[tensorboard]'"
                ) from None

    @torch.no_grad()
    def dry_run(self) -> None:
        """One example of the first batch through the model (eval mode, so no randomness is drawn):
        a configuration the model rejects fails here, before anything is written."""
        was_training = self.model.training
        self.model.eval()
        inputs, _, *segments = self.task.train_batch(0)
        with _autocast(self.device):
            forward_rows(
                self.model, inputs[:1].to(self.device), segments[0][:1] if segments else None, self.split
            )
        self.model.train(was_training)

    def restore(self, checkpoint: Path) -> None:
        if is_sharded(self.model) != is_distributed_checkpoint(checkpoint):
            raise InvalidValueError(
                f"--resume: {str(checkpoint)!r} is not a checkpoint of a"
                + (" sharded (--fsdp) run" if is_sharded(self.model) else " run without --fsdp")
            )
        if is_sharded(self.model):
            load_sharded(checkpoint, self.model, self.optimizer)
            state = load_trainer_state(checkpoint, self.device)
        else:
            state = load_checkpoint(checkpoint, self.model, self.device)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.best_val_loss, self.window = (
            state["step"],
            state["best_val_loss"],
            list(state["window"]),
        )
        self.trained_seconds = state.get("trained_seconds", 0.0)
        if self.config.time_budget is not None:
            self.config.steps = state.get("steps", self.config.steps)
        self.saved = True

    def start_files(self, resumed: bool) -> None:
        """config.json and metrics.jsonl: new, or (resuming) the evaluations logged after the checkpoint
        dropped, since they are redone."""
        if not self.world.is_main:
            return
        if not resumed:
            self.task.save_files(self.run_dir)
            write_text_atomically(self.run_dir / CONFIG, _json(self.config.to_dict()))
            write_text_atomically(self.run_dir / METRICS, "")
            return
        kept = [r for r in read_json_lines(self.run_dir / METRICS) if r["step"] <= self.step]
        write_text_atomically(self.run_dir / METRICS, "".join(_json(r, indent=None) + "\n" for r in kept))

    def trainer_state(self, window: list[float]) -> dict[str, Any]:
        sharded = is_sharded(self.model)  # its optimiser state is saved by every rank, beside
        return {
            "step": self.step,
            "optimizer": None if sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
            "best_val_loss": self.best_val_loss,
            "window": window,
            "trained_seconds": self.trained_seconds,
            "steps": self.config.steps,  # the plan, which a time budget moves
        }

    def save(self) -> None:
        # The ranks' mean of their running loss sums, so that any number of ranks resumes the window.
        total = self.world.sum(torch.tensor([self.window[0]], dtype=torch.float64, device=self.device))
        window = [total.item() / self.world.size, self.window[1]]
        if is_sharded(self.model):  # every rank writes its shard
            state = self.trainer_state(window)
            save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state)
        elif self.world.is_main:
            save_checkpoint(self.run_dir, self.step, self.model, self.trainer_state(window))
        self.save_weights(WEIGHTS)
        self.saved = True
        self.world.barrier()

    def save_weights(self, name: str) -> None:
        """The whole model's weights as ``name`` in the run directory (sharded: gathered by every rank,
        written by rank 0)."""
        path, metadata = self.run_dir / name, {"step": str(self.step)}
        if is_sharded(self.model):
            save_full_weights(self.model, path, metadata)
        elif self.world.is_main:
            save_weights(self.model, path, metadata)

    def train_step(self, forward: Callable[[torch.Tensor], torch.Tensor], trained: nn.Module) -> float:
        """One optimiser step over the global batch of ``self.step`` (this rank's rows, in micro-batches)."""
        config, world = self.config, self.world
        mine = slice(world.data_rank * self.rows, (world.data_rank + 1) * self.rows)
        inputs, targets, *segments = (t[mine].to(self.device) for t in self.task.train_batch(self.step))
        segments = segments[0] if segments else None
        micro = self.rows // config.grad_accum
        step_loss = torch.zeros((), device=self.device)
        for index in range(config.grad_accum):
            last = index == config.grad_accum - 1
            sync = _gradient_sync(trained, last or world.size == 1)
            part = slice(index * micro, (index + 1) * micro)
            with sync:
                with _autocast(self.device):
                    logits = forward_rows(
                        forward, inputs[part], None if segments is None else segments[part], self.split
                    )
                loss_sum, count, _ = token_loss(logits, _share(targets[part], self.split))
                # A split sequence's loss is its ranks' sums over the count of all of them; the gradients
                # are averaged over every rank, so each rank's part counts ``context`` times.
                count = world.context_sum(count)
                loss = loss_sum / count.clamp_min(1)
                (loss * world.context / config.grad_accum).backward()
            step_loss += world.context_sum(loss) / config.grad_accum
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value = step_loss.item()
        if not math.isfinite(value):
            kept = (
                "the last checkpoint is kept (continue with --resume)"
                if self.saved
                else "no checkpoint was written yet"
            )
            raise DivergedError(
                f"training loss became {value} at step {self.step}; {kept}; try a lower --lr or --grad-clip"
            )
        self.window[0] += value
        self.window[1] += 1
        return value

    def replan(self) -> None:
        """With a time budget: the steps that fill it at the pace of the steps trained so far (the
        slowest rank's, so that every rank plans the same). The schedule follows the plan."""
        spent = self.world.max(self.trained_seconds, self.device)
        self.config.steps = max(self.step, round(self.step * self.config.time_budget / spent))

    def evaluate(self, elapsed: float) -> dict[str, Any]:
        """Validation scores, logged to metrics.jsonl; the best weights kept."""
        world, task = self.world, self.task
        train_loss = world.sum(torch.tensor([self.window[0] / self.window[1]], device=self.device)).item()
        scores = evaluate_model(self.model, task, "val", self.config.eval_batches, self.device, world)
        record = {
            "step": self.step,
            "train_loss": train_loss / world.size,
            "val_loss": scores["loss"],
            task.metric: scores[task.metric.removeprefix("val_")],
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": self.window[1] * self.config.batch_size * task.sequence_length / elapsed,
        }
        if self.config.time_budget is not None:  # the run is finished when it reaches the last plan
            record |= {"planned_steps": self.config.steps, "trained_seconds": self.trained_seconds}
        if scores["loss"] < self.best_val_loss:
            self.best_val_loss = scores["loss"]
            self.save_weights(BEST_WEIGHTS)
        self.window = [0.0, 0]
        if world.is_main:
            append_json_line(self.run_dir / METRICS, record)
            if self.events is not None:
                for name, value in record.items():
                    if name != "step":
                        self.events.add_scalar(name, value, self.step)
                self.events.flush()
        return record

    def open_events(self) -> None:
        """TensorBoard's writer for ``--log tensorboard`` (rank 0), once the run directory is ours."""
        if self.config.log == "tensorboard" and self.world.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.events = SummaryWriter(str(self.run_dir / TENSORBOARD))


def _gradient_sync(trained: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Where gradients are reduced across ranks (the last micro-batch) and where they accumulate locally."""
    if is_sharded(trained):
        trained.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else trained.no_sync()


def _train(
    config: TrainConfig, device: torch.device, world: World, on_step: Callable[[int], None] | None
) -> list[dict[str, Any]]:
    run = _Run(config, device, world)
    run.dry_run()
    checkpoint = _check_run_dir(run.run_dir, config)  # every rank, before rank 0 writes
    world.barrier()
    with contextlib.ExitStack() as held:
        if world.is_main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(run.run_dir))
            checkpoint = _check_run_dir(run.run_dir, config)  # again, now that no one else can write
        if checkpoint is not None:
            run.restore(checkpoint)
        run.start_files(resumed=checkpoint is not None)
        run.open_events()
        if run.events is not None:
            held.callback(run.events.close)
        world.barrier()
        _loop(run, on_step)
        world.barrier()
    return read_json_lines(run.run_dir / METRICS)


def _loop(run: _Run, on_step: Callable[[int], None] | None) -> None:
    config, world = run.config, run.world
    replicated = world.size > 1 and not is_sharded(run.model)
    trained = DistributedDataParallel(run.model) if replicated else run.model
    forward = torch.compile(trained) if config.compile else trained
    progress = _Progress(config, run.step, world.is_main)
    params = sum(p.numel() for p in run.model.parameters())
    progress.write(
        f"{config.task} | {config.mixer} | {params / 1e6:.2f}M parameters | {world.size} process(es)"
        f"{' sharded' if is_sharded(run.model) else ''} on {run.device} | step {run.step}/{config.steps}"
    )
    run.model.train()
    window_start = time.perf_counter()
    with _StopOnSignal() as stop:
        while run.step < config.steps:
            started = time.perf_counter()
            progress.step(run.train_step(forward, trained))
            run.trained_seconds += time.perf_counter() - started
            if config.time_budget is not None:
                run.replan()
                progress.plan(config.steps)
            if on_step is not None:
                on_step(run.step)
            stopping = world.any(stop.requested, run.device)
            if run.step % config.eval_every == 0 or run.step == config.steps:
                record = run.evaluate(time.perf_counter() - window_start)
                progress.write(
                    f"step {run.step}/{config.steps}  train_loss {record['train_loss']:.4f}  "
                    f"val_loss {record['val_loss']:.4f}  {run.task.metric} {record[run.task.metric]:.4f}  "
                    f"{record['tokens_per_s']:.0f} tok/s"
                )
                run.save()
                window_start = time.perf_counter()
            elif stopping:
                run.save()
            if stopping:
                progress.write(f"stopped at step {run.step}; continue with --resume")
                break
    progress.close()


def _json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent)
