"""Build spot-fast configs from a golden file's own description, so the parity tests hold for
any golden case (sizes, heads, iterations, truncation), not only the public one.

Golden files: ../shared/spec/golden/*.pt, plus paths in $SPOT_FAST_GOLDEN (os.pathsep-separated).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from spot_fast.checkpoint import reference_name
from spot_fast.config import DecoderConfig, EncoderConfig, OptimConfig, SlotAttentionConfig, SPOTConfig

from conftest import GOLDEN_PATH

TRUNCATIONS = {"none": "none", "bilevel": "bi-level", "fixed": "fixed-point"}


def golden_files() -> list[str]:
    files = sorted(str(p) for p in GOLDEN_PATH.parent.glob("*.pt"))
    files += [p for p in os.environ.get("SPOT_FAST_GOLDEN", "").split(os.pathsep) if p]
    return files


def base_config(g: dict) -> SPOTConfig:
    c = json.loads(g["config"])
    enc = EncoderConfig(name="custom", image_size=c["img"], patch_size=c["patch"], embed_dim=c["embed"],
                        depth=c["depth"], num_heads=c["vit_heads"], mlp_ratio=c.get("mlp_ratio", 4.0),
                        split_block=int(g.get("split_block", c.get("finetune_after", 0))))
    sa = SlotAttentionConfig(num_slots=c["slots"], slot_size=c["slot_size"], mlp_hidden=c["mlp_hidden"],
                             num_iterations=c["iters"], num_heads=c.get("sa_heads", 1))
    dec = DecoderConfig(num_blocks=c["dec_blocks"], num_heads=c["dec_heads"],
                        num_cross_heads=c.get("cross_heads"), mlp_hidden=c["mlp_dec_hidden"])
    return SPOTConfig(encoder=enc, slot_attention=sa, decoder=dec, optim=OptimConfig())


def stage1_prefixes(g: dict) -> list[str]:
    return sorted(k[: -len("/state")] for k in g if k.endswith("/state")
                  and not k.startswith(("s2/", "sa_heads")))


def model_config(g: dict, prefix: str) -> SPOTConfig:
    """The config of model `prefix`: init and decoder from its weights, truncation from its name."""
    cfg = base_config(g)
    state = g[f"{prefix}/state"]
    init = "shared_gaussian" if "slot_attn.slot_mu" in state else "embedding"
    m = re.search(r"_(none|bilevel|fixed)$", prefix)
    truncate = TRUNCATIONS[m.group(1)] if m else "bi-level"
    sa = dataclasses.replace(cfg.slot_attention, init=init, truncate=truncate)
    if "dec.pos_embed" in state:
        dec = dataclasses.replace(cfg.decoder, kind="mlp", train_orders="standard")
    else:
        P = state["bos_tokens"].shape[0]
        dec = dataclasses.replace(cfg.decoder, train_orders="random" if P == 9 else "standard")
    return dataclasses.replace(cfg, slot_attention=sa, decoder=dec)


def reference_grads(model: torch.nn.Module, split_block: int) -> dict[str, torch.Tensor]:
    """The model's non-None gradients under the reference's parameter names."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        key = reference_name(name, split_block)
        grad = p.grad
        if key == "bos_tokens":
            grad = grad.reshape(grad.shape[0], 1, 1, -1)
        out[key] = grad
    return out
