"""What a training run is: one flat, JSON-serialisable configuration."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidTypeError, InvalidValueError, MissingFileError

TASKS = ("charlm", "image-cls", "image-ar", "image-seq", "text-cls", "mqar", "induction", "selective-copy",
         "listops")  # fmt: skip
# Those that read --data; the rest generate theirs.
DATA_TASKS = ("charlm", "image-cls", "image-ar", "image-seq", "text-cls")
# Fields that may change when a run is resumed: they do not change what the optimiser computes.
# Activation checkpointing recomputes the same values; a sharded run is resumed sharded (its checkpoints
# are distributed ones), at any number of processes.
RESUMABLE_CHANGES = frozenset(
    {"out", "device", "compile", "resume", "progress", "log", "activation_checkpointing", "context_parallel"}
)


# Real-valued fields: the test each must pass (finite first: inf and nan fail) and what it expects.
_REAL_FIELDS = {
    "lr": (lambda x: x > 0, "a finite number > 0"),
    "min_lr_ratio": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "weight_decay": (lambda x: x >= 0, "a finite number ≥ 0"),
    "grad_clip": (lambda x: x >= 0, "a finite number ≥ 0 (0: no clipping)"),
    "dropout": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
}


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
               type(None): "null (None)"}  # fmt: skip


def _kinds(hint: Any) -> tuple[type, ...]:
    """The classes a field's annotation admits: ``int | None`` → (int, NoneType); a float takes ints."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(kind) or kind for kind in kinds)  # dict[str, Any] → dict
    return (*kinds, int) if float in kinds else kinds


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is the global batch (split across DDP ranks and accumulation
    micro-batches); ``steps`` counts optimiser steps."""

    task: str = "charlm"
    data: str | None = None  # charlm: a file, a directory of files or a JSONL file; image-*: load_images
    pack: bool = False  # charlm: whole documents packed into each sequence, with cu_seqlens
    mixer: str = "softmax"
    mixer_options: dict[str, Any] = field(default_factory=dict)
    dim: int = 128
    depth: int = 2
    ffn: bool = True
    positions: str = "learned"
    dropout: float = 0.0
    seq_len: int = 128  # charlm, mqar, induction, selective-copy, listops (its longest expression)
    patch_size: int | None = None  # image-cls (default: 4 for 28×28 images, 2 for 8×8)
    vocab_size: int = 64  # mqar, induction, selective-copy
    num_pairs: int = 8  # mqar
    num_tokens: int = 8  # induction: the repeated segment's length; selective-copy: the tokens to copy
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 500  # with time_budget: the first plan, re-planned as the run trains
    time_budget: float | None = None  # seconds of training (evaluations excluded) the steps should fill
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int | None = 16  # None: the whole split
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimiser state across the ranks (FSDP2)
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    context_parallel: int = 1  # ranks each sequence is split over (docs/spec.md §14); the rest data-parallel
    progress: str = "auto"  # "bar", "log" or "auto" (a bar on a terminal)
    log: str = "jsonl"  # "tensorboard": also TensorBoard event files in out/tensorboard
    out: str = "runs/latest"
    resume: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if self.task not in TASKS:
            raise InvalidValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        positive = ("dim", "depth", "seq_len", "batch_size", "grad_accum", "steps", "eval_every",
                    "context_parallel", "vocab_size", "num_pairs", "num_tokens", "patch_size",
                    "eval_batches")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.seed >= 2**31:
            raise InvalidValueError(f"seed must be below 2**31, got {self.seed}")
        for name, (valid, expected) in _REAL_FIELDS.items():
            value = getattr(self, name)
            real = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (real and math.isfinite(value) and valid(value)):
                raise InvalidValueError(f"{name} must be {expected}, got {value!r}")
        budget = self.time_budget
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise InvalidValueError(f"time_budget must be a finite number of seconds > 0, got {budget!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.progress not in ("auto", "bar", "log"):
            raise InvalidValueError(f"progress must be auto, bar or log, got {self.progress!r}")
        if self.log not in ("jsonl", "tensorboard"):
            raise InvalidValueError(f"log must be jsonl or tensorboard, got {self.log!r}")
        if self.data is not None and self.task not in DATA_TASKS:
            raise InvalidValueError(
                f"data: the {self.task} task generates its data and reads none, got {self.data!r}"
            )
        if self.pack and self.task != "charlm":
            raise InvalidValueError(f"pack applies to the charlm task (documents of text), not {self.task!r}")

    def _check_types(self) -> None:
        """Each field holds a value of its annotated type (a config file's ``"false"`` is no bool, and
        ``true`` no int), before any value is read."""
        hints = typing.get_type_hints(type(self))
        for name in (f.name for f in dataclasses.fields(self)):
            value, kinds = getattr(self, name), _kinds(hints[name])
            if value is None and type(None) in kinds:
                continue
            fits = any(
                isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
                for kind in kinds
            )
            if not fits:
                expected = " or ".join(_KIND_NAMES.get(kind, kind.__name__) for kind in kinds)
                raise InvalidTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise MissingFileError(f"{str(run_dir)!r} holds no training run (no config.json)")
        return cls.from_dict(json.loads(path.read_text()))

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields (other than those a resume may change) whose values differ, as ``name: a != b``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{name}: {theirs[name]!r} != {mine[name]!r}"
            for name in mine
            if name not in RESUMABLE_CHANGES and json.dumps(mine[name]) != json.dumps(theirs[name])
        ]
