"""The processes of a multi-rank cache build (torchrun's RANK / WORLD_SIZE), and how a failing one stops the rest."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from spot_fast.cache.manifest import CacheError
from spot_fast.ranks import Ranks


@dataclass
class BuildRanks(Ranks):
    """The ranks of a multi-rank build, and how a failing one stops the rest.

    A failing rank must stop the others, not leave them at a barrier: it writes its error to
    `.build-errors/rank-R.txt` (the others poll that folder between batches and stop) and every
    rank meets at `sync`, an all-reduce of an error flag, instead of a bare barrier."""

    def sync(self, out: Path, error: BaseException | None = None, share: bool = True) -> None:
        """Wait for every rank; raise `error`, or a CacheError when another rank failed. `share`
        writes the error where the other ranks read it (not before the folder is ours: prepare)."""
        if self.distributed:
            if error is not None and share:
                self.report(out, error)
            flag = torch.tensor([0 if error is None else 1], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if error is None and flag.item():
                raise CacheError(self.failure(out) or "another build process failed: see its error above; "
                                 "fix it and rerun the same command to resume")
        if error is not None:
            raise error

    def report(self, out: Path, error: BaseException) -> None:
        folder = out / ERRORS
        with contextlib.suppress(OSError):
            folder.mkdir(exist_ok=True)
            (folder / f"rank-{self.rank}.txt").write_text(f"{type(error).__name__}: {error}")

    def failure(self, out: Path) -> str | None:
        """The error another rank reported, or None."""
        folder = out / ERRORS
        if not self.distributed or not folder.is_dir():
            return None
        for file in sorted(folder.iterdir()):
            if file.name != f"rank-{self.rank}.txt":
                return (f"build process {file.stem} of {self.world_size} failed ({file.read_text().strip()}); "
                        f"stopped this one too: fix it and rerun the same command to resume")
        return None


ERRORS = ".build-errors"     # one file per failed rank of a multi-rank build; cleared when a build starts


def ranks_from_env(device: torch.device) -> BuildRanks:
    """Join the process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return BuildRanks()
    dist = torch.distributed
    if dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        return BuildRanks(dist.get_rank(), dist.get_world_size(), device=device if nccl else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Long timeout: ranks wait at the final barrier while the slowest rank finishes its shards.
    dist.init_process_group(backend, timeout=timedelta(hours=48))
    return BuildRanks(dist.get_rank(), dist.get_world_size(), owns_group=True,
                      device=device if backend == "nccl" else torch.device("cpu"))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
