"""Ranks under torchrun: one process per device, gloo on CPU, nccl on CUDA.

    torchrun --nproc-per-node 8 spot-fast train ...                      # one node
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 spot-fast train ...
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from spot_fast.devices import resolve_device
from spot_fast.ranks import Ranks

__all__ = ["Ranks", "setup", "teardown", "wrap"]


def setup(device: str | None) -> Ranks:
    """Join the process group when WORLD_SIZE > 1 and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Ranks(rank, world, dev, owns_group=owns)


def wrap(model: torch.nn.Module, ranks: Ranks, compile: bool = False) -> torch.nn.Module:
    """The module the steps call: DDP across ranks, torch.compile if asked."""
    wrapped = model
    if ranks.distributed:
        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(wrapped) if compile else wrapped


def teardown(ranks: Ranks) -> None:
    """Leave the process group if `setup` joined it."""
    ranks.close()
