"""What a training run is: one flat, JSON-serialisable configuration."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("charlm", "image-cls", "image-ar", "mqar")
# Fields that may change when a run is resumed: they do not change what the optimiser computes.
RESUMABLE_CHANGES = frozenset({"out", "device", "compile", "resume", "progress"})


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is the global batch (split across DDP ranks and accumulation
    micro-batches); ``steps`` counts optimiser steps."""

    task: str = "charlm"
    data: str | None = None  # charlm: a text/byte file (default: embedded corpus); image-*: see load_images
    mixer: str = "softmax"
    mixer_options: dict[str, Any] = field(default_factory=dict)
    dim: int = 128
    depth: int = 2
    ffn: bool = True
    positions: str = "learned"
    dropout: float = 0.0
    seq_len: int = 128  # charlm and mqar
    patch_size: int | None = None  # image-cls (default: 4 for 28×28 images, 2 for 8×8)
    vocab_size: int = 64  # mqar
    num_pairs: int = 8  # mqar
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 500
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
    progress: str = "auto"  # "bar", "log" or "auto" (a bar on a terminal)
    out: str = "runs/latest"
    resume: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        positive = ("dim", "depth", "seq_len", "batch_size", "grad_accum", "steps", "eval_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.seed >= 2**31:
            raise ValueError(f"seed must be below 2**31, got {self.seed}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be positive or None (whole split), got {self.eval_batches}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.progress not in ("auto", "bar", "log"):
            raise ValueError(f"progress must be auto, bar or log, got {self.progress!r}")
        if not isinstance(self.mixer_options, dict):
            raise TypeError(f"mixer_options must be a dict, got {type(self.mixer_options).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} holds no training run (no config.json)")
        return cls.from_dict(json.loads(path.read_text()))

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields (other than those a resume may change) whose values differ, as ``name: a != b``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{name}: {theirs[name]!r} != {mine[name]!r}"
            for name in mine
            if name not in RESUMABLE_CHANGES and json.dumps(mine[name]) != json.dumps(theirs[name])
        ]
