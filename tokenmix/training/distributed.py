"""The process group a run takes part in: torchrun/DDP when launched by it, one process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device_type: str, sharded: bool = False) -> World:
        """Join the torchrun process group if this process was launched by torchrun. ``sharded`` (FSDP
        needs a process group): one process not launched by torchrun makes a group of its own."""
        backend = "nccl" if device_type == "cuda" else "gloo"
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            if not sharded:
                return cls()
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            return cls(owns_group=True)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def any(self, flag: bool, device: torch.device) -> bool:
        if self.size == 1:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def leave(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
