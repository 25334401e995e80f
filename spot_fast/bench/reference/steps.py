"""One step of each reference section, as the reference's scripts run it (transcribed from
reading `train_spot.py`, `train_spot_2.py` and `eval_spot.py`):

- stage 1: next batch from the loader -> set lr -> zero_grad -> SPOT(image) (the ViT inside) ->
  backward -> `clip_grad_norm_(params, clip, 'inf')` + `.item()` -> Adam step;
- stage 2: the teacher SPOT (no grad, one random order, full decode) -> its argmax masks; the
  student SPOT (fine-tuned encoder copy + the frozen encoder as its target encoder: with the
  teacher's, three encoder forwards) -> Hungarian matching of the one-hot masks (`att_matching`)
  -> cross-entropy on the matched logits + MSE -> backward -> clip -> Adam;
- evaluation: SPOT with a second encoder (`use_second_encoder`, two encoder forwards), every
  order, the masks resized to the mask size, one-hot ground truth and predictions, the eight
  metric updates (mBO^i, mBO^c, mIoU, FG-ARI for decoder and slot masks) and `mse.item()`.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from spot_fast.bench.reference.data import Batches, ReferenceCOCO, reference_loader
from spot_fast.bench.reference.metrics import ARI, MaskIoU
from spot_fast.bench.reference.model import ReferenceSPOT
from spot_fast.bench.reference.vit import VisionTransformer
from spot_fast.config import SPOTConfig, stage2, teacher


def vit(cfg: SPOTConfig, state: dict[str, torch.Tensor]) -> VisionTransformer:
    model = VisionTransformer(cfg.encoder)
    model.load_timm(state)
    return model.eval()


def att_matching(student: torch.Tensor, teacher_masks: torch.Tensor):
    """The reference's Hungarian matching of two (B, K, h, w) one-hot masks: (indices (B, K), scores)."""
    B, K = student.shape[:2]
    m1 = F.one_hot(student.argmax(1).reshape(B, -1), num_classes=K).to(torch.float32).permute(0, 2, 1)
    m2 = F.one_hot(teacher_masks.argmax(1).reshape(B, -1), num_classes=K).to(torch.float32).permute(0, 2, 1)
    is_padding = (m2 == 0).all(-1)
    m1 = F.one_hot(torch.argmax(m1, -2), m1.size(1)).to(torch.float32).transpose(1, 2)   # (B, K, P)
    inter = torch.einsum("bkj,bij->bki", m2, m1)
    union = m2.sum(dim=2).unsqueeze(2) + m1.sum(dim=2).unsqueeze(1) - inter
    iou = inter / torch.clamp(union, min=1e-6)
    cost = 1 - iou
    cost[is_padding] = 1e3
    indices = np.array([linear_sum_assignment(c)[1] for c in cost.detach().cpu().numpy()])
    iou = iou.detach().cpu().numpy()
    scores = np.array([[iou[b][i, j] for i, j in enumerate(indices[b])] for b in range(B)])
    return indices, scores


class TrainingStep:
    """The loop body both training scripts share: next batch -> set lr -> zero_grad -> the
    section's loss -> backward -> inf-norm clip -> Adam step."""
    read_norm = False                   # stage 1 reads the clip's norm back (`.item()`), stage 2 does not

    def start(self, cfg: SPOTConfig, model: torch.nn.Module, root, batch: int, workers: int) -> None:
        self.optim, self.trained = cfg.optim, model
        params = (p for p in model.parameters() if p.requires_grad)
        self.opt = torch.optim.Adam([{"params": params, "lr": cfg.optim.lr}])
        size = cfg.encoder.image_size
        self.batches = Batches(reference_loader(ReferenceCOCO(root, "train", size, size), batch, True, workers))

    def __call__(self) -> float:
        image = self.batches.next().to(self.device)
        self.opt.param_groups[0]["lr"] = self.optim.lr
        self.opt.zero_grad()
        self.loss(image)[0].backward()
        norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.optim.clip, "inf")
        self.opt.step()
        return norm.item() if self.read_norm else 0.0


class Stage1(TrainingStep):
    read_norm = True

    def __init__(self, cfg: SPOTConfig, vit_state: dict, root, batch: int, device, workers: int = 4,
                 mask_size: int = 320):
        self.device = torch.device(device)
        self.model = ReferenceSPOT(cfg, vit(cfg, vit_state)).to(self.device).train()
        self.start(cfg, self.model, root, batch, workers)

    def loss(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(image)[:1]


class Stage2(TrainingStep):
    def __init__(self, cfg: SPOTConfig, vit_state: dict, root, batch: int, device, workers: int = 4,
                 mask_size: int = 320):
        self.device, self.K = torch.device(device), cfg.slot_attention.num_slots
        frozen = vit(cfg, vit_state)
        fine_tuned = copy.deepcopy(frozen).train()
        self.student = ReferenceSPOT(stage2(cfg), fine_tuned, frozen, cfg.encoder.split_block).to(self.device).train()
        self.teacher = ReferenceSPOT(teacher(cfg), frozen).to(self.device).eval().requires_grad_(False)
        self.start(cfg, self.student, root, batch, workers)

    def loss(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(total, mse, ce) of the batch; `noise`: the teacher's slot draw (tests)."""
        with torch.no_grad():
            dec = self.teacher(image, noise)[2]
            labels = dec.argmax(1)                                             # (B, h, w)
            onehot = F.one_hot(labels, num_classes=self.K).permute(0, 3, 1, 2)
            B, H, W = labels.size()
        mse, slot_masks, _, _, _, logits = self.student(image)
        logits = logits.transpose(-1, -2).reshape(B, self.K, H, W)
        student = F.one_hot(slot_masks.argmax(1), num_classes=self.K).permute(0, 3, 1, 2)
        indices, _ = att_matching(student, onehot)
        logits = torch.stack([x[indices[n]] for n, x in enumerate(logits)], dim=0)
        ce = F.cross_entropy(logits, labels, ignore_index=-100)
        return mse + self.optim.ce_weight * ce, mse, ce


class Evaluation:
    """`eval_spot.py`'s loop body over one batch (the stage-2 model's config, every order)."""

    def __init__(self, cfg: SPOTConfig, vit_state: dict, root, batch: int, device, workers: int = 4,
                 mask_size: int = 320):
        self.device, self.mask_size = torch.device(device), mask_size
        encoder = vit(cfg, vit_state)
        self.model = ReferenceSPOT(stage2(cfg), encoder, copy.deepcopy(encoder), eval_orders="all")
        self.model.to(self.device).eval()
        size = cfg.encoder.image_size
        data = ReferenceCOCO(root, "val", size, mask_size)
        self.batches = Batches(reference_loader(data, batch, False, workers))
        self.metrics = {name: ARI() if name.startswith("ari") else MaskIoU("hungarian" if "miou" in name else "best_overlap")
                        for name in ("mbo_i", "mbo_c", "miou", "ari", "mbo_i_slot", "mbo_c_slot", "miou_slot", "ari_slot")}
        self.val_mse = 0.0

    @torch.no_grad()
    def __call__(self) -> float:
        image, true_i, true_c, ignore = (t.to(self.device) for t in self.batches.next())
        self.update(self.model(image), true_i, true_c, ignore)
        return self.val_mse

    def update(self, out, true_i, true_c, ignore) -> None:
        """The metric updates of one batch given the model's outputs."""
        mse, slot_masks, dec_masks = out[:3]
        slot_up = F.interpolate(slot_masks, size=self.mask_size, mode="bilinear").unsqueeze(2)
        dec_up = F.interpolate(dec_masks, size=self.mask_size, mode="bilinear").unsqueeze(2)
        pred_slot, pred_dec = slot_up.argmax(1).squeeze(1), dec_up.argmax(1).squeeze(1)
        self.val_mse += mse.item()
        onehot = lambda t: F.one_hot(t).to(torch.float32).permute(0, 3, 1, 2)   # noqa: E731
        oh_i, oh_c, oh_dec, oh_slot = onehot(true_i), onehot(true_c), onehot(pred_dec), onehot(pred_slot)
        for suffix, pred in (("", oh_dec), ("_slot", oh_slot)):
            self.metrics["mbo_i" + suffix].update(pred, oh_i, ignore)
            self.metrics["mbo_c" + suffix].update(pred, oh_c, ignore)
            self.metrics["miou" + suffix].update(pred, oh_i, ignore)
            self.metrics["ari" + suffix].update(pred, oh_i, ignore)

    def compute(self) -> dict[str, float]:
        """Percent, as the reference reports."""
        return {name: 100 * float(m.compute()) for name, m in self.metrics.items()}


SECTIONS = {"stage1": Stage1, "stage2": Stage2, "eval": Evaluation}
