"""``train --fsdp``: PyTorch's FSDP2 over the process group, and its distributed checkpoints.

The model is built on the meta device, ``fully_shard`` splits each block and then the rest (embeddings,
head, final norm) across the ranks, each rank allocates its shard, and rank 0's eagerly built weights
(tokenmix/init.py: the same as a plain run's for the seed) are scattered; the optimiser holds only this
rank's shard of every moment. Checkpoints are ``torch.distributed.checkpoint`` directories: each rank
writes its own shard, and any number of ranks reads them back (a run may resume at another world size).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..errors import InvalidValueError
from ..init import own_initialiser
from ..models.backbone import Block
from .checkpoint import (
    checkpoint_path,
    finish_checkpoint,
    latest_checkpoint,
    replace_atomically,
    staging_path,
    start_staging,
)

METADATA = ".metadata"  # what torch.distributed.checkpoint writes beside the shards


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every block, then the root, over all ranks of the default group; on CUDA with bf16
    parameters in compute and float32 gradient reductions. The module is changed in place and returned."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, Block):  # one all-gather per block: only a block's weights are whole at once
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def build_sharded(build: Callable[[], nn.Module], device: torch.device, seed: int) -> nn.Module:
    """The model ``build()`` makes for ``seed`` (as eager construction draws it), sharded across the
    ranks, with no rank ever holding it whole on ``device``: built on the meta device and sharded, each
    rank's shard allocated on ``device``, the weights built on rank 0's CPU and scattered from there. Every
    rank's random state ends as eager construction leaves it (dropout draws as in one process)."""
    with torch.device("meta"):
        model = build()
    shard(model, device)
    model.to_empty(device=device)
    for module in model.modules():  # buffers no state dict holds (RoPE's frequencies)
        if module._non_persistent_buffers_set:
            own_initialiser(module)()
    weights, random_state = {}, [None]
    if dist.get_rank() == 0:
        torch.manual_seed(seed)
        weights = build().state_dict()
        random_state = [torch.get_rng_state()]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    dist.broadcast_object_list(random_state, src=0)
    torch.set_rng_state(random_state[0])
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def is_distributed_checkpoint(path: Path) -> bool:
    return (path / METADATA).is_file()


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> None:
    """Every rank writes its shard of the weights and of the optimiser's state; rank 0 the rest of the
    trainer's state (``trainer_state``, its optimizer None) and renames the whole into place."""
    final = checkpoint_path(run_dir, step)
    if latest_checkpoint(run_dir) == final:
        return  # this step is already saved
    rank = dist.get_rank()
    staging = start_staging(final) if rank == 0 else staging_path(final)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staging))
    if rank == 0:
        torch.save(trainer_state, staging / "trainer.pt")
        finish_checkpoint(staging, final)
    dist.barrier()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a checkpoint ``save_sharded_checkpoint`` wrote, by any number of ranks, into this rank's
    shards."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    unfit = _unfit(path, model_state)
    if unfit:
        raise InvalidValueError(f"checkpoint {str(path)!r} does not fit this model and optimiser ({unfit})")
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (dcp.api.CheckpointException, RuntimeError, ValueError) as error:
        # Its metadata fits the model, so a shard that cannot be read is damaged, not another model's.
        raise InvalidValueError(
            f"checkpoint {str(path)!r} is damaged: its .distcp shards could not be read "
            f"({_first_line(error)}); resume from another checkpoint or start again"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _unfit(path: Path, model_state: dict[str, Any]) -> str | None:
    """What in the checkpoint's metadata does not match ``model_state`` (names and whole shapes); None
    when it fits. Unreadable metadata is a damaged checkpoint, said as such."""
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as error:  # the reader raises what its unpickling raises
        raise InvalidValueError(
            f"checkpoint {str(path)!r} is damaged: its .metadata could not be read ({_first_line(error)})"
        ) from None
    for name, tensor in model_state.items():
        entry = saved.get(f"model.{name}")
        if entry is None:
            return f"it has no {name}"
        size = getattr(entry, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            return f"{name}: {tuple(size)} saved, {tuple(tensor.shape)} here"
    return None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (gathered one tensor at a time), tied weights once;
    an empty dict on the other ranks. Every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    kept = dict(model.named_parameters()).keys() | dict(model.named_buffers()).keys()  # a tied one once
    return {name: tensor.contiguous() for name, tensor in state.items() if name in kept}


def save_full_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``full_weights`` as one safetensors file at ``path`` (written by rank 0, atomically)."""
    weights = full_weights(model)
    if dist.get_rank() == 0:
        replace_atomically(path, lambda temporary: save_file(weights, str(temporary), metadata=metadata))
