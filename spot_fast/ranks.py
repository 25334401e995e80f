"""This process's place among the ranks of a torchrun job (RANK / WORLD_SIZE), for training and cache builds alike."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0               # this process's global rank (torchrun's RANK)
    world_size: int = 1         # the number of processes (torchrun's WORLD_SIZE)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank's collectives run (nccl: cuda)
    owns_group: bool = False    # we initialised torch.distributed and must tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (t itself on one rank)."""
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """The maximum of `t` over the ranks (t itself on one rank)."""
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
