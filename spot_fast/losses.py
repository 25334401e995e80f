"""Stage-2 self-training loss (spec section 4): Hungarian matching of the student's slots to the
teacher's decoder masks, cross-entropy on the reordered last-iteration logits, plus the MSE."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from spot_fast.model import SPOTOutput

EMPTY_TEACHER_COST = 1000.0


def one_hot_masks(masks: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) soft masks -> (B, K, h*w) float one-hot of the argmax over slots."""
    B, K = masks.shape[:2]
    return F.one_hot(masks.argmax(1).reshape(B, -1), K).to(torch.float32).transpose(1, 2)


def match_slots(student_masks: torch.Tensor, teacher_masks: torch.Tensor) -> torch.Tensor:
    """(B, K) long: entry [b, j] is the student slot matched to teacher slot j, by Hungarian
    matching on the IoU of the argmax masks (cost 1 - IoU; teacher slots owning no patch cost
    1000 for every student slot). Masks: (B, K, h, w)."""
    student, teacher = one_hot_masks(student_masks), one_hot_masks(teacher_masks)   # (B, K, P)
    inter = torch.einsum("bjp,bip->bji", teacher, student)                          # (B, Kt, Ks)
    union = teacher.sum(2, keepdim=True) + student.sum(2).unsqueeze(1) - inter
    cost = 1 - inter / union.clamp(min=1e-6)
    cost[(teacher == 0).all(-1)] = EMPTY_TEACHER_COST
    cost = cost.detach().cpu().numpy()
    return torch.from_numpy(np.stack([linear_sum_assignment(c)[1] for c in cost])).to(student_masks.device)


@dataclass
class Stage2Loss:
    total: torch.Tensor     # mse + ce_weight * ce
    mse: torch.Tensor
    ce: torch.Tensor
    matching: torch.Tensor  # (B, K) student slot per teacher slot


def stage2_loss(student: SPOTOutput, teacher_dec_masks: torch.Tensor, ce_weight: float) -> Stage2Loss:
    """Distil the teacher's decoder masks (B, K, h, w) into the student's slot-attention logits."""
    if student.sa_logits.dim() != 3:
        raise ValueError("stage 2 needs one slot-attention head (sa_logits of shape (B, N, K))")
    B, K, h, w = teacher_dec_masks.shape
    labels = teacher_dec_masks.argmax(1)                                      # (B, h, w)
    matching = match_slots(student.sa_masks, teacher_dec_masks)
    logits = student.sa_logits.transpose(-1, -2).reshape(B, K, h, w)
    logits = torch.gather(logits, 1, matching.view(B, K, 1, 1).expand(B, K, h, w))
    ce = F.cross_entropy(logits, labels)
    return Stage2Loss(total=student.loss + ce_weight * ce, mse=student.loss, ce=ce, matching=matching)
