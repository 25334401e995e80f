"""Object-discovery metrics of the SPOT evaluation: FG-ARI, mBO^i, mBO^c and mIoU (spec section 6).

Provenance: the definitions are those of the reference evaluation (gkakogeorgiou/spot,
`eval_spot.py` + `ocl_metrics.py`, itself from the OCLF library), which one-hot encodes label
maps and loops over images. Here every metric is read off one contingency table per batch,
`table[b, p, g]` = number of non-ignored pixels of image b with predicted label p and
ground-truth label g, built with a single `bincount`. Only the Hungarian matching runs per image,
on the CPU (scipy). Results agree with the reference to float64 rounding.

Conventions (as in the reference):
- label 0 of the ground truth is background: it is no mask for mBO/mIoU, and its pixels do not
  take part in FG-ARI; label 0 of the prediction is an ordinary slot;
- ignored pixels (COCO's overlapping instances) are removed from every mask and from FG-ARI;
- an image without any (non-ignored) ground-truth object scores 1.0 in FG-ARI and is left out of
  mBO and mIoU;
- mIoU divides the sum of the matched IoUs by the number of ground-truth masks (unmatched: 0).
- Per-image values are fractions; `MetricAccumulator.compute` reports percent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

METRIC_NAMES = ("mbo_i", "mbo_c", "miou", "fg_ari")


def masks_to_labels(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Soft masks (B, K, h, w) -> label map (B, size, size) int64: bilinear upsample, argmax over K."""
    if masks.ndim != 4:
        raise ValueError(f"masks must be (B, K, h, w), got shape {tuple(masks.shape)}")
    up = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)  # (B, K, size, size)
    return up.argmax(dim=1)


# ----------------------------------------------------------------------------- contingency table

def _valid_pixels(labels: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) bool: pixels that count. `ignore` is (B, 1, H, W) or (B, H, W), nonzero = ignored."""
    if ignore is None:
        return torch.ones_like(labels, dtype=torch.bool)
    if ignore.ndim == 4 and ignore.shape[1] == 1:
        ignore = ignore[:, 0]
    if ignore.shape != labels.shape:
        raise ValueError(f"ignore must be (B, 1, H, W) or (B, H, W) matching the label maps "
                         f"{tuple(labels.shape)}, got {tuple(ignore.shape)}")
    return ignore.to(device=labels.device) == 0


def _check_labels(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"label maps must both be (B, H, W), got {tuple(pred.shape)} and {tuple(gt.shape)}")
    for name, t in (("pred_labels", pred), ("gt_labels", gt)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer label map, got {t.dtype}")
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name} holds negative labels; labels must be >= 0")


def contingency(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, P, G) int64 pixel counts over valid pixels, P = max pred label + 1, G = max gt label + 1.

    The channel counts are those of the reference's batch-wide `F.one_hot`; labels absent from an
    image give empty rows/columns, which change no metric.
    """
    B = pred.shape[0]
    P = int(pred.max()) + 1 if pred.numel() else 1
    G = int(gt.max()) + 1 if gt.numel() else 1
    image = torch.arange(B, device=pred.device).view(B, 1, 1).expand_as(pred)
    index = ((image * P + pred) * G + gt)[valid]                   # (N_valid,)
    counts = torch.bincount(index, minlength=B * P * G)
    return counts.view(B, P, G)


# ----------------------------------------------------------------------------- metrics from a table

def fg_ari_from_table(table: torch.Tensor) -> torch.Tensor:
    """(B,) float64 FG-ARI from a (B, P, G) contingency table; ground-truth column 0 is background.

    The arithmetic follows the reference's order so that results agree to the last bit where the
    integer intermediates exceed 2**53.
    """
    n = table[:, :, 1:].to(torch.float64)                          # (B, P, G-1) foreground only
    a = n.sum(dim=1)                                                # (B, G-1) gt mask sizes
    b = n.sum(dim=2)                                                # (B, P) pred mask sizes
    n_fg = a.sum(dim=1)                                             # (B,)
    rindex = (n * (n - 1)).sum(dim=(1, 2))
    aindex = (a * (a - 1)).sum(dim=1)
    bindex = (b * (b - 1)).sum(dim=1)
    expected = aindex * bindex / torch.clamp(n_fg * (n_fg - 1), min=1)
    max_rindex = (aindex + bindex) / 2
    denominator = max_rindex - expected
    ari = (rindex - expected) / denominator
    # denominator 0: all foreground in one cluster in both, or <= 1 pixel per cluster: ARI := 1.
    return torch.where(denominator > 0, ari, torch.ones_like(ari))


def iou_from_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU (B, P, G-1) float64 of predicted vs foreground ground-truth masks, and
    (B, G-1) bool marking the ground-truth masks present (non-empty) in each image.
    IoU is 0 where the union is empty."""
    inter = table[:, :, 1:]                                         # (B, P, G-1)
    pred_area = table.sum(dim=2, keepdim=True)                      # (B, P, 1) incl. background
    gt_area = inter.sum(dim=1, keepdim=True)                        # (B, 1, G-1)
    union = pred_area + gt_area - inter
    iou = inter.to(torch.float64) / union.clamp(min=1).to(torch.float64)
    return iou, gt_area[:, 0] > 0


def best_overlap_from_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: mean over present gt masks of the best IoU with any predicted mask.
    Returns ((B,) float64, (B,) bool valid = image has a gt mask); invalid images hold 0."""
    iou, present = iou_from_table(table)
    best = iou.max(dim=1).values if iou.shape[1] else torch.zeros_like(present, dtype=torch.float64)
    count = present.sum(dim=1)                                      # (B,)
    total = (best * present).sum(dim=1)
    return total / count.clamp(min=1), count > 0


def hungarian_from_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: one-to-one matching of predicted to present gt masks maximising total IoU;
    the matched IoUs summed over gt masks / number of gt masks. Returns like `best_overlap_from_table`."""
    iou, present = iou_from_table(table)
    iou_cpu, present_cpu = iou.cpu().numpy(), present.cpu().numpy()
    values = np.zeros(iou_cpu.shape[0], dtype=np.float64)
    for i, (m, keep) in enumerate(zip(iou_cpu, present_cpu)):
        if not keep.any():
            continue
        m = m[:, keep]                                              # (P, K) present gt only
        rows, cols = scipy.optimize.linear_sum_assignment(m, maximize=True)
        values[i] = m[rows, cols].sum() / m.shape[1]
    return torch.from_numpy(values).to(iou.device), present.any(dim=1)


# ----------------------------------------------------------------------------- label-map API

def _table(pred_labels, gt_labels, ignore) -> torch.Tensor:
    _check_labels(pred_labels, gt_labels)
    return contingency(pred_labels, gt_labels, _valid_pixels(gt_labels, ignore))


def fg_ari(pred_labels: torch.Tensor, gt_labels: torch.Tensor,
           ignore: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float64 foreground ARI (fraction) of label maps (B, H, W); gt label 0 = background."""
    return fg_ari_from_table(_table(pred_labels, gt_labels, ignore))


def best_overlap(pred_labels: torch.Tensor, gt_labels: torch.Tensor,
                 ignore: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean best overlap (B,) float64 and (B,) bool valid (image has a gt object)."""
    return best_overlap_from_table(_table(pred_labels, gt_labels, ignore))


def hungarian_miou(pred_labels: torch.Tensor, gt_labels: torch.Tensor,
                   ignore: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Hungarian-matched mIoU (B,) float64 and (B,) bool valid (image has a gt object)."""
    return hungarian_from_table(_table(pred_labels, gt_labels, ignore))


def segmentation_metrics(pred_labels: torch.Tensor, instance_labels: torch.Tensor,
                         class_labels: torch.Tensor,
                         ignore: torch.Tensor | None = None) -> dict[str, tuple[float, int]]:
    """Batch totals {name: (sum of per-image values as fractions, number of images counted)} for
    mbo_i, mbo_c, miou (images with a gt object) and fg_ari (all images)."""
    inst = _table(pred_labels, instance_labels, ignore)
    cls = _table(pred_labels, class_labels, ignore)
    out = {}
    for name, (values, valid) in (("mbo_i", best_overlap_from_table(inst)),
                                  ("mbo_c", best_overlap_from_table(cls)),
                                  ("miou", hungarian_from_table(inst))):
        out[name] = (float(values[valid].sum()), int(valid.sum()))
    ari = fg_ari_from_table(inst)
    out["fg_ari"] = (float(ari.sum()), ari.numel())
    return out


@dataclass
class MetricAccumulator:
    """Sums per-image metrics over batches; `compute()` gives percent, averaged as the reference:
    FG-ARI over all images, mBO/mIoU over images with a gt object (0.0 if there were none;
    FG-ARI is nan before any image)."""
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRIC_NAMES, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METRIC_NAMES, 0))

    def update(self, pred_labels: torch.Tensor, instance_labels: torch.Tensor,
               class_labels: torch.Tensor, ignore: torch.Tensor | None = None) -> None:
        for name, (s, n) in segmentation_metrics(pred_labels, instance_labels, class_labels,
                                                 ignore).items():
            self.sums[name] += s
            self.counts[name] += n

    def compute(self) -> dict[str, float]:
        out = {}
        for name in METRIC_NAMES:
            n = self.counts[name]
            if n == 0:
                out[name] = float("nan") if name == "fg_ari" else 0.0
            else:
                out[name] = 100 * (self.sums[name] / n)
        return out
