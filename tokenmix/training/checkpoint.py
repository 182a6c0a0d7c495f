"""Atomic checkpoints: a crash or a kill mid-write never replaces the previous good one.

Layout of a run directory::

    config.json, metrics.jsonl
    model.safetensors          latest weights (replaced atomically at every checkpoint)
    model-best.safetensors     weights of the best validation loss so far
    checkpoints/LATEST         name of the newest complete checkpoint
    checkpoints/step-00000100/ model.safetensors + trainer.pt (optimizer, scheduler, RNG, step, ...)
                               or, with --fsdp, each rank's shard of weights and optimizer state as
                               torch.distributed.checkpoint writes them (.metadata, *.distcp) + trainer.pt

A checkpoint directory is written under a temporary name and renamed into place, then LATEST is
replaced by rename; only after that is the older checkpoint removed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import zipfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import InvalidValueError, RunDirectoryError

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
LOCK = ".tokenmix.lock"
_CHECKPOINT_NAME = re.compile(r"step-\d{8}")
_TRAINER_KEYS = frozenset({"step", "optimizer", "scheduler", "rng", "best_val_loss", "window"})


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
    """Load ``path`` into ``model``; a file that is not complete safetensors, or whose tensors do not
    fit the model (names or shapes), raises ``InvalidValueError`` naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidValueError(f"{str(path)!r} is not a complete safetensors file ({error})") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [
        f"{n}: {shapes[n]} != {expected[n]}"
        for n in shapes.keys() & expected.keys()
        if shapes[n] != expected[n]
    ]
    if wrong:
        raise InvalidValueError(
            f"weights in {str(path)!r} do not fit the model: shapes {'; '.join(sorted(wrong))}"
        )
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise InvalidValueError(
            f"weights in {str(path)!r} do not fit the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def staging_path(final: Path) -> Path:
    """Where the checkpoint ``final`` is written before it is renamed into place (one name for every
    rank of a sharded save; a leftover of a killed save is ours to remove)."""
    return final.with_name(f".{final.name}.tmp")


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, trainer_state: dict[str, Any]) -> Path:
    final = checkpoint_path(run_dir, step)
    if latest_checkpoint(run_dir) == final:
        return final  # this step is already saved
    staging = start_staging(final)
    try:
        save_model(model, str(staging / "model.safetensors"), metadata={"step": str(step)})
        torch.save(trainer_state, staging / "trainer.pt")
        finish_checkpoint(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def start_staging(final: Path) -> Path:
    """An empty staging directory for the checkpoint ``final``."""
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def finish_checkpoint(staging: Path, final: Path) -> None:
    """Flush a complete staging directory to disk, rename it to ``final``, point LATEST at it and remove
    the older checkpoints."""
    for path in staging.iterdir():
        _fsync(path)
    shutil.rmtree(final, ignore_errors=True)  # a leftover that LATEST never pointed to
    os.replace(staging, final)
    root = final.parent
    write_text_atomically(root / LATEST, final.name + "\n")
    for old in root.iterdir():  # only our own checkpoints: anything else there is left alone
        if old.is_dir() and old.name != final.name and _CHECKPOINT_NAME.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)


def check_directory_path(out: Path) -> None:
    """``out`` can be a directory: it, or its nearest existing ancestor, is not a file."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise RunDirectoryError(f"--out {str(out)!r}: {str(path)!r} is a file, not a directory")
            return


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model: nn.Module, map_location: torch.device) -> dict[str, Any]:
    """Load the weights into ``model``; return the trainer state."""
    load_weights(model, path / "model.safetensors")
    return load_trainer_state(path, map_location)


def load_trainer_state(path: Path, map_location: torch.device) -> dict[str, Any]:
    """The step, optimiser (None in a sharded checkpoint, which holds it beside), schedule, RNG and
    counters a checkpoint holds."""
    file = path / "trainer.pt"
    try:
        if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; pickle would read garbage
            raise OSError("not a zip archive")
        state = torch.load(file, map_location=map_location, weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        raise InvalidValueError(f"{str(file)!r} is not a complete checkpoint ({error})") from None
    if not isinstance(state, dict) or not state.keys() >= _TRAINER_KEYS:
        raise InvalidValueError(f"{str(path / 'trainer.pt')!r} is not a tokenmix trainer checkpoint")
    return state


class RunLock:
    """One writer per run directory, held for the run's life: an advisory lock on ``.tokenmix.lock``
    (``filelock``; released by the OS if the process dies), with the holder's pid and host beside it so
    that a second writer can name it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.owner = run_dir / (LOCK + ".owner")
        self._lock = FileLock(run_dir / LOCK)

    def __enter__(self) -> RunLock:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = self.owner.read_text().strip() if self.owner.is_file() else "another process"
            raise RunDirectoryError(
                f"{str(self.run_dir)!r} is being written by {holder}; one writer per run "
                "(wait for it to finish, or choose another --out)"
            ) from None
        write_text_atomically(self.owner, f"pid {os.getpid()} on {socket.gethostname()}\n")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.owner.unlink(missing_ok=True)
        self._lock.release()


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
