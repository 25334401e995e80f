"""The same three steps run by a checkout of the reference repository itself: its `SPOT`, its
`COCO2017` dataset, its `att_matching` and its metrics (`ocl_metrics`, which needs torchmetrics),
driven by the loop bodies of its `train_spot.py`, `train_spot_2.py` and `eval_spot.py` (those
scripts are whole programs -- tensorboard, checkpoints, argparse -- so their few step lines are
restated here, calling the checkout's objects). The encoder is the checkout's own timm ViT
(`models_vit.vit_base_patch16` shape), which its `forward_encoder` runs through `prepare_tokens`
as it runs DINO's hub model; `TIMM_FUSED_ATTN=0` (set by the worker before timm loads) makes
its attention the explicit product DINO's is.

Import this module only in a process whose `sys.path` starts with the checkout (`worker.py`):
the checkout's modules have generic names (`spot`, `datasets`, `utils_spot`).
"""
from __future__ import annotations

import copy
from argparse import Namespace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from spot_fast.bench.reference.data import Batches
from spot_fast.config import SPOTConfig


def args_for(cfg: SPOTConfig, stage: int) -> Namespace:
    """The reference's argparse defaults of the stage's script, with the preset's shapes."""
    sa, dec, enc = cfg.slot_attention, cfg.decoder, cfg.encoder
    return Namespace(
        which_encoder="dino_vitb16", encoder_final_norm=False, img_channels=3, image_size=enc.image_size,
        val_image_size=enc.image_size, max_tokens=enc.num_patches, d_model=cfg.feature_dim,
        num_iterations=sa.num_iterations, num_slots=sa.num_slots, slot_size=sa.slot_size,
        mlp_hidden_size=sa.mlp_hidden, pos_channels=4, num_dec_blocks=dec.num_blocks, num_heads=dec.num_heads,
        num_cross_heads=dec.cross_heads, dropout=0.0, dec_type="transformer", cappa=-1, mlp_dec_hidden=2048,
        use_slot_proj=True, train_permutations="random" if dec.num_orders > 1 else "standard",
        eval_permutations="standard", finetune_blocks_after=enc.split_block if stage == 2 else 100,
        truncate="bi-level" if stage == 2 else "none", init_method="embedding" if stage == 2 else "shared_gaussian",
        clip=cfg.optim.clip, lr_main=cfg.optim.lr, ce_weight=cfg.optim.ce_weight)


def encoder(cfg: SPOTConfig, vit_state: dict) -> nn.Module:
    import models_vit
    spec = cfg.encoder.spec
    vit = models_vit.VisionTransformer(img_size=cfg.encoder.image_size, patch_size=spec.patch_size,
                                       embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                                       mlp_ratio=spec.mlp_ratio, qkv_bias=True, num_classes=0, global_pool=False,
                                       drop_path_rate=0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    missing, _ = vit.load_state_dict(vit_state, strict=False)
    if missing:
        raise ValueError(f"the checkout's ViT lacks weights for {missing[:3]}")
    return vit.eval()


def loader(root, split: str, cfg: SPOTConfig, batch: int, workers: int, mask_size: int) -> DataLoader:
    from datasets import COCO2017
    size = cfg.encoder.image_size
    data = COCO2017(root=str(root), split=split, image_size=size, mask_size=size if split == "train" else mask_size)
    train = split == "train"
    return DataLoader(data, shuffle=train, drop_last=train, batch_size=batch, num_workers=workers, pin_memory=True)


class Stage1:
    def __init__(self, cfg, vit_state, root, batch, device, workers=4, mask_size=320):
        from spot import SPOT
        self.args, self.device = args_for(cfg, 1), torch.device(device)
        self.model = SPOT(encoder(cfg, vit_state), self.args, None).to(self.device).train()
        self.optimizer = torch.optim.Adam([{"params": (p for p in self.model.parameters() if p.requires_grad),
                                            "lr": self.args.lr_main}])
        self.batches = Batches(loader(root, "train", cfg, batch, workers, mask_size))

    def __call__(self):
        image = self.batches.next().to(self.device)                          # train_spot.py's loop body
        self.optimizer.param_groups[0]["lr"] = self.args.lr_main
        self.optimizer.zero_grad()
        mse, _, _, _, _, _ = self.model(image)
        mse.backward()
        total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip, "inf")
        total_norm = total_norm.item()
        self.optimizer.step()
        return total_norm


class Stage2:
    def __init__(self, cfg, vit_state, root, batch, device, workers=4, mask_size=320):
        from spot import SPOT
        self.args, self.device = args_for(cfg, 2), torch.device(device)
        frozen = encoder(cfg, vit_state)
        fine_tuned = copy.deepcopy(frozen).train()
        self.student = SPOT(fine_tuned, self.args, frozen).to(self.device).train()
        t_args = copy.deepcopy(self.args)
        t_args.truncate, t_args.init_method, t_args.finetune_blocks_after = "none", "shared_gaussian", 100
        t_args.eval_permutations = "random"
        self.teacher = SPOT(frozen, t_args).to(self.device).eval()
        self.teacher.requires_grad_(False)
        self.optimizer = torch.optim.Adam([{"params": (p for p in self.student.parameters() if p.requires_grad),
                                            "lr": self.args.lr_main}])
        self.batches = Batches(loader(root, "train", cfg, batch, workers, mask_size))

    def __call__(self):
        from utils_spot import att_matching
        K = self.args.num_slots
        image = self.batches.next().to(self.device)                          # train_spot_2.py's loop body
        self.optimizer.param_groups[0]["lr"] = self.args.lr_main
        self.optimizer.zero_grad()
        with torch.no_grad():
            _, _, dec_slots_attns, _, _, _ = self.teacher(image)
            dec_masks = dec_slots_attns.argmax(1)
            dec_masks_onehot = F.one_hot(dec_masks, num_classes=K).permute(0, 3, 1, 2)
            B, H, W = dec_masks.size()
        mse, slots_attns, _, _, _, logits = self.student(image)
        logits = logits.transpose(-1, -2).reshape(B, K, H, W)
        attn_onehot = F.one_hot(slots_attns.argmax(1), num_classes=K).permute(0, 3, 1, 2)
        permutation_indices, _ = att_matching(attn_onehot, dec_masks_onehot)
        logits = torch.stack([x[permutation_indices[n]] for n, x in enumerate(logits)], dim=0)
        ce_loss = torch.nn.CrossEntropyLoss(ignore_index=-100)(logits, dec_masks)
        total_loss = mse + self.args.ce_weight * ce_loss
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.args.clip, "inf")
        self.optimizer.step()
        return 0.0


class Evaluation:
    def __init__(self, cfg, vit_state, root, batch, device, workers=4, mask_size=320):
        from ocl_metrics import ARIMetric, UnsupervisedMaskIoUMetric
        from spot import SPOT
        self.args, self.device, self.mask_size = args_for(cfg, 2), torch.device(device), mask_size
        self.args.eval_permutations = "all"
        enc = encoder(cfg, vit_state)
        self.model = SPOT(enc, self.args, copy.deepcopy(enc).eval()).to(self.device).eval()
        iou = partial(UnsupervisedMaskIoUMetric, ignore_background=True, ignore_overlaps=True)
        ari = partial(ARIMetric, foreground=True, ignore_overlaps=True)
        self.metrics = [m.to(self.device) for m in (iou(matching="best_overlap"), iou(matching="best_overlap"),
                                                     iou(matching="hungarian"), ari()) * 2]
        self.batches = Batches(loader(root, "val", cfg, batch, workers, mask_size))
        self.val_mse = 0.0

    @torch.no_grad()
    def __call__(self):
        image, true_mask_i, true_mask_c, mask_ignore = (t.to(self.device) for t in self.batches.next())
        mse, default_slots_attns, dec_slots_attns, _, _, _ = self.model(image)   # eval_spot.py's loop body
        default_attns = F.interpolate(default_slots_attns, size=self.mask_size, mode="bilinear").unsqueeze(2)
        dec_attns = F.interpolate(dec_slots_attns, size=self.mask_size, mode="bilinear").unsqueeze(2)
        pred_default_mask = default_attns.argmax(1).squeeze(1)
        pred_dec_mask = dec_attns.argmax(1).squeeze(1)
        self.val_mse += mse.item()
        onehot = lambda t: F.one_hot(t).to(torch.float32).permute(0, 3, 1, 2)   # noqa: E731
        true_i, true_c = onehot(true_mask_i), onehot(true_mask_c)
        for j, pred in enumerate((onehot(pred_dec_mask), onehot(pred_default_mask))):
            mbo_i, mbo_c, miou, ari = self.metrics[4 * j: 4 * j + 4]
            mbo_i.update(pred, true_i, mask_ignore)
            mbo_c.update(pred, true_c, mask_ignore)
            miou.update(pred, true_i, mask_ignore)
            ari.update(pred, true_i, mask_ignore)
        return self.val_mse


SECTIONS = {"stage1": Stage1, "stage2": Stage2, "eval": Evaluation}
