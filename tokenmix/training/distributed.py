"""The process group a run takes part in: torchrun/DDP when launched by it, one process otherwise; with
context parallelism, a 2-D layout of the ranks (data × context: consecutive ranks split one sequence)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..context.exchange import Split
from ..errors import InvalidValueError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group and must destroy it
    context: int = 1  # ranks each sequence is split over (docs/spec.md §14)
    context_group: Any = None  # this rank's context-parallel group (None: no split)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which data-parallel replica this rank belongs to: its rows of the global batch."""
        return self.rank // self.context

    @property
    def data_size(self) -> int:
        return self.size // self.context

    def split(self, seq_len: int, order: str = "contiguous") -> Split | None:
        """How this rank's context group splits a sequence of ``seq_len`` in ``order`` (None without a
        split)."""
        return None if self.context == 1 else Split.of(seq_len, self.context_group, order)

    def context_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over this rank's context group (a copy; no gradient)."""
        value = value.detach().clone()
        if self.context > 1:
            dist.all_reduce(value, group=self.context_group)
        return value

    def with_context(self, context: int) -> World:
        """This world with each sequence split over ``context`` consecutive ranks: one process group per
        data-parallel replica (every rank makes every group, as ``new_group`` asks)."""
        if context == 1:
            return self
        if self.size % context:
            raise InvalidValueError(
                f"context_parallel={context} must divide the number of processes, {self.size} (torchrun "
                f"--nproc-per-node)"
            )
        mine = None
        for replica in range(self.size // context):
            group = dist.new_group(list(range(replica * context, (replica + 1) * context)))
            if replica == self.rank // context:
                mine = group
        return dataclasses.replace(self, context=context, context_group=mine)

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

    def max(self, value: float, device: torch.device) -> float:
        """The largest ``value`` over the ranks (every rank gets the same)."""
        if self.size == 1:
            return value
        values = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values.item()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def leave(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
