"""Atomic checkpoints: a crash or a kill mid-write never replaces the previous good one.

Layout of a run directory::

    config.json, metrics.jsonl
    model.safetensors          latest weights (replaced atomically at every checkpoint)
    model-best.safetensors     weights of the best validation loss so far
    checkpoints/LATEST         name of the newest complete checkpoint
    checkpoints/step-00000100/ model.safetensors + trainer.pt (optimizer, scheduler, RNG, step, ...)

A checkpoint directory is written under a temporary name and renamed into place, then LATEST is
replaced by rename; only after that is the older checkpoint removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def replace_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, flush it to disk, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda temporary: temporary.write_text(text))


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The model's weights as safetensors (tied weights stored once), replacing ``path`` atomically."""
    replace_atomically(path, lambda temporary: save_model(model, str(temporary), metadata=metadata))


def load_weights(model: nn.Module, path: Path) -> None:
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {str(path)!r} do not fit the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, trainer_state: dict[str, Any]) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    previous = latest_checkpoint(run_dir)
    if previous == final:
        return final  # this step is already saved
    staging = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_model(model, str(staging / "model.safetensors"), metadata={"step": str(step)})
        torch.save(trainer_state, staging / "trainer.pt")
        for path in staging.iterdir():
            _fsync(path)
        shutil.rmtree(final, ignore_errors=True)  # a leftover that LATEST never pointed to
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_text_atomically(root / LATEST, name + "\n")
    for old in root.iterdir():
        if old.is_dir() and old.name != name and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model: nn.Module, map_location: torch.device) -> dict[str, Any]:
    """Load the weights into ``model``; return the trainer state."""
    load_weights(model, path / "model.safetensors")
    return torch.load(path / "trainer.pt", map_location=map_location, weights_only=True)


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
