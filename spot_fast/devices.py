"""The one check of a device name a user gives (train, eval, predict): a device torch knows and
this machine has, refused in one line otherwise (instead of an error from deep inside torch)."""
from __future__ import annotations

import torch

from spot_fast.errors import UserError


class DeviceError(UserError, ValueError):
    """A device name that is not a device, or a device this machine does not have."""


def resolve_device(name: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """`name` as a torch.device (None: cuda:LOCAL_RANK when CUDA is present, else cpu)."""
    if name is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name!r}: this machine has no CUDA device: use cpu")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type not in ("cpu", "mps"):
        raise DeviceError(f"device {name!r}: spot-fast runs on cpu or cuda")
    return dev
