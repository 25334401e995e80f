"""The reference evaluation's metrics as it computes them (its `ocl_metrics.py`, from OCLF),
written from reading it: one-hot masks at the mask resolution, FG-ARI from a per-batch einsum,
mBO / mIoU from a per-image loop over pairwise IoUs (Hungarian matching by scipy). The cost of
the reference's metrics; `spot_fast.metrics` computes the same numbers from one contingency
table (tests/test_bench_reference.py holds the two equal).
"""
from __future__ import annotations

import scipy.optimize
import torch
import torch.nn.functional as F


def _flatten(pred: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None):
    """(B, C, H, W) -> (B, C, H*W); ignore (B, 1, H, W) -> bool (B, 1, H*W)."""
    return pred.flatten(-2, -1), target.flatten(-2, -1), None if ignore is None else ignore.to(torch.bool).flatten(-2, -1)


def adjusted_rand_index(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """pred (B, P, C) scores, true (B, P, K) one-hot -> (B,) ARI over the points with a true label."""
    pred_oh = F.one_hot(torch.argmax(pred, dim=-1), pred.shape[-1]).to(torch.float64)
    n_ij = torch.einsum("bnc,bnk->bck", true.to(torch.float64), pred_oh)
    a, b = n_ij.sum(-1), n_ij.sum(-2)
    n = a.sum(1)
    rindex = (n_ij * (n_ij - 1)).sum((1, 2))
    aindex, bindex = (a * (a - 1)).sum(1), (b * (b - 1)).sum(1)
    expected = aindex * bindex / torch.clamp(n * (n - 1), min=1)
    denominator = (aindex + bindex) / 2 - expected
    ari = (rindex - expected) / denominator
    return torch.where(denominator > 0, ari, torch.ones_like(ari))


class ARI:
    """FG-ARI with overlapping pixels ignored (`ARIMetric(foreground=True, ignore_overlaps=True)`)."""

    def __init__(self):
        self.values, self.total = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0)

    def update(self, prediction: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None):
        prediction, target, ignore = _flatten(prediction, target, ignore)
        overlaps = (target > 0).sum(1, keepdim=True) > 1
        ignore = overlaps if ignore is None else ignore | overlaps
        prediction, target = prediction.clone(), target.clone()
        prediction[ignore.expand_as(prediction)] = 0
        target[ignore.expand_as(target)] = 0
        prediction, target = prediction.transpose(-2, -1), target.transpose(-2, -1)
        assert torch.all(target.sum(dim=-1) < 2), "mask non-exclusive"
        ari = adjusted_rand_index(prediction, target[..., 1:])          # foreground: drop class 0
        self.values = self.values.to(ari.device) + ari.sum()            # state on the metric's device
        self.total += len(ari)

    def compute(self) -> torch.Tensor:
        return self.values / self.total


def mask_iou(pred: torch.Tensor, true: torch.Tensor, matching: str) -> torch.Tensor:
    """pred (C, P), true (K, P) binary -> (K,) IoU of each true mask with its matched prediction."""
    pred, true = pred.unsqueeze(1).to(torch.bool), true.unsqueeze(0).to(torch.bool)
    union = torch.sum(pred | true, dim=-1).to(torch.float64)
    iou = torch.sum(pred & true, dim=-1).to(torch.float64) / union               # (C, K)
    iou[union == 0] = 0.0
    if matching == "hungarian":
        rows, cols = scipy.optimize.linear_sum_assignment(iou.cpu(), maximize=True)
        rows, cols = torch.as_tensor(rows, device=iou.device), torch.as_tensor(cols, device=iou.device)
    else:
        nonempty = torch.sum(true.squeeze(0), dim=1) > 0
        rows = torch.argmax(iou, dim=0)[nonempty]
        cols = torch.arange(iou.shape[1], device=iou.device)[nonempty]
    out = torch.zeros(true.shape[1], dtype=torch.float64, device=iou.device)
    out[cols] = iou[rows, cols]
    return out


class MaskIoU:
    """mBO ("best_overlap") or mIoU ("hungarian") with background and overlaps ignored
    (`UnsupervisedMaskIoUMetric(matching, ignore_background=True, ignore_overlaps=True)`)."""

    def __init__(self, matching: str):
        self.matching = matching
        self.values, self.total = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0)

    def update(self, prediction: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None):
        predictions, targets, ignore = _flatten(prediction, target, ignore)
        predictions = F.one_hot(torch.argmax(predictions, dim=1), predictions.shape[1]).transpose(1, 2)
        targets = targets[:, 1:] > 0
        overlaps = targets.sum(1, keepdim=True) > 1
        ignore = overlaps if ignore is None else ignore | overlaps
        predictions[ignore.expand_as(predictions)] = 0
        targets[ignore.expand_as(targets)] = 0
        for pred, true in zip(predictions, targets):
            true = true[torch.sum(true, dim=-1) > 0]
            if len(true) == 0:
                continue
            iou = mask_iou(pred, true, self.matching).mean()
            self.values = self.values.to(iou.device) + iou                # state on the metric's device
            self.total += 1

    def compute(self) -> torch.Tensor:
        return torch.zeros_like(self.values) if self.total == 0 else self.values / self.total
