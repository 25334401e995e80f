"""The loss sums of a running training loop, kept on the device (no host sync per step), and the
host-side timing of the current log window (img/s, ms/step, share of time waiting for data)."""
from __future__ import annotations

import time

import torch

from spot_fast.train.state import TrainState


class Meter:
    """Window sums for the log lines, the epoch's loss sum and the first non-finite step."""

    def __init__(self, device, state: TrainState):
        self.device = device
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.epoch_sum = torch.tensor(state.epoch_loss_sum, device=device)   # a resumed epoch's steps so far
        self.epoch_count = state.epoch_loss_count
        self.new_window()

    def new_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.images, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()

    def new_epoch(self) -> None:
        self.epoch_sum, self.epoch_count = torch.zeros((), device=self.device), 0

    def add(self, out: dict[str, torch.Tensor], images: int, step: int) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        bad = ~torch.isfinite(out["loss"]) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, torch.full_like(self.bad_step, step), self.bad_step)
        self.epoch_sum = self.epoch_sum + out["loss"].float()
        self.count, self.images, self.epoch_count = self.count + 1, self.images + images, self.epoch_count + 1

    def window_means(self) -> dict[str, torch.Tensor]:
        return {k: v / self.count for k, v in self.sums.items()}

    def epoch_totals(self) -> tuple[float, int]:
        return float(self.epoch_sum), self.epoch_count

    def epoch_mean(self) -> torch.Tensor:
        return self.epoch_sum / max(self.epoch_count, 1)

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"img_s": self.images / dt, "ms_step": 1000 * dt / max(self.count, 1), "data_wait": self.wait / dt}
