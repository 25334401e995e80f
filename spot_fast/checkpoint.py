"""Reference-format SPOT checkpoints, both ways.

`load_reference(model, ckpt)` maps a checkpoint of the reference implementation (a path, the
loaded `checkpoint` dict, `checkpoint['model']` or a bare state dict; older runs name the decoder
`tf_dec.`) onto a
spot-fast `SPOT`, stage 1 or stage 2. `export_reference(model)` writes the reference's names back,
so any result can be cross-checked with the reference code.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from spot_fast.errors import UserError
from spot_fast.io import load_tensors
from spot_fast.model import SPOT, block_name, tail_name

# (reference name, spot-fast name) templates; `{i}` is a block index. Tried in order.
NAME_MAP: list[tuple[str, str]] = [
    ("slot_attn.layer_norm.", "slot_attention.feature_norm."),
    ("slot_attn.mlp.", "slot_attention.feature_mlp."),
    ("slot_attn.slot_mu", "slot_attention.init_mu"),
    ("slot_attn.slot_log_sigma", "slot_attention.init_log_sigma"),
    ("slot_attn.slots_init.weight", "slot_attention.init_embedding"),
    ("slot_attn.slot_attention.project_q.", "slot_attention.to_q."),
    ("slot_attn.slot_attention.project_k.", "slot_attention.to_k."),
    ("slot_attn.slot_attention.project_v.", "slot_attention.to_v."),
    ("slot_attn.slot_attention.mlp.", "slot_attention.slot_mlp."),
    ("slot_attn.slot_attention.", "slot_attention."),
    ("input_proj.0.", "decoder.input_proj."),
    ("input_proj.1.", "decoder.input_norm."),
    ("slot_proj.0.", "decoder.slot_proj."),
    ("slot_proj.1.", "decoder.slot_norm."),
    ("bos_tokens", "decoder.bos"),
    ("dec.layer_norm.", "decoder.final_norm."),
    ("dec.blocks.{i}.self_attn_layer_norm.", "decoder.blocks.{i}.norm_self."),
    ("dec.blocks.{i}.encoder_decoder_attn_layer_norm.", "decoder.blocks.{i}.norm_cross."),
    ("dec.blocks.{i}.ffn_layer_norm.", "decoder.blocks.{i}.norm_ffn."),
    ("dec.blocks.{i}.self_attn.proj_", "decoder.blocks.{i}.self_attn."),
    ("dec.blocks.{i}.encoder_decoder_attn.proj_", "decoder.blocks.{i}.cross_attn."),
    ("dec.blocks.{i}.ffn.", "decoder.blocks.{i}.ffn."),
    ("dec.pos_embed", "decoder.pos_embed"),
    ("dec.decoder.", "decoder.mlp."),
]


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_FORWARD = [(_template_regex(a), b) for a, b in NAME_MAP]
_BACKWARD = [(_template_regex(b), a) for a, b in NAME_MAP]


def _rename(key: str, table) -> str | None:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.replace("{i}", m.groupdict().get("i") or "") + key[m.end():]
    return None


def reference_name(name: str, split_block: int) -> str | None:
    """The reference's name of spot-fast parameter `name` (None if it has none)."""
    if name.startswith("encoder_tail."):
        return "encoder." + block_name(name[len("encoder_tail."):], split_block)
    return _rename(name, _BACKWARD)


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)   # frozen encoder copies, causal masks, unused
    frozen_encoder: dict[str, torch.Tensor] = field(default_factory=dict)  # `second_encoder.*` (stage 2)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load of a checkpoint file (tensors and plain values only), refusals in one line."""
    return load_tensors(path, "reference checkpoint", CheckpointMismatch,
                        pickled_fix="if you trust it, pass torch.load(path, weights_only=False) instead of the path")


def _unwrap(ckpt) -> dict[str, torch.Tensor]:
    what = "a reference checkpoint"
    if isinstance(ckpt, (str, os.PathLike)):
        what, ckpt = f"reference checkpoint {ckpt}", read_checkpoint(ckpt)
    state = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{what} should be a state dict of tensors (or a dict holding one as 'model'), "
                                 f"got a {type(state).__name__}"
                                 + (" with non-tensor values" if isinstance(state, dict) else ""))
    return {("dec." + k[len("tf_dec."):] if k.startswith("tf_dec.") else k): v for k, v in state.items()}


def load_reference(model: SPOT, ckpt) -> LoadReport:
    """Load a reference SPOT checkpoint (a path or the loaded dict) into `model`. Missing or unexpected keys raise
    `CheckpointMismatch` listing them. Returns what was loaded and what was deliberately skipped."""
    state = _unwrap(ckpt)
    ours: dict[str, torch.Tensor] = {}
    report = LoadReport()
    unexpected = []
    split = model.cfg.encoder.split_block
    for key, value in state.items():
        if key.endswith("self_attn_mask"):
            _check_causal_mask(key, value)
            report.ignored.append(key)
            continue
        if key.startswith("second_encoder."):
            report.frozen_encoder[key[len("second_encoder."):]] = value
            report.ignored.append(key)
            continue
        if key.startswith("encoder."):
            tail = tail_name(key[len("encoder."):], split) if model.encoder_tail is not None else None
            if tail is not None:
                ours[f"encoder_tail.{tail}"] = value
            else:
                report.ignored.append(key)        # the frozen part of the encoder: lives in the cache
            continue
        name = _rename(key, _FORWARD)
        if name is None:
            unexpected.append(key)
            continue
        if model.cfg.decoder.kind == "mlp" and name.startswith(("decoder.input_", "decoder.bos")):
            report.ignored.append(key)            # the reference builds these for MLP models, unused
            continue
        if name == "decoder.bos":
            value = value.reshape(value.shape[0], -1)
        ours[name] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected += sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatch(
            "reference checkpoint does not fit this spot-fast model"
            + (f"\n  missing (model has, checkpoint lacks): {missing}" if missing else "")
            + (f"\n  unexpected (checkpoint has, model lacks): {sorted(unexpected)}" if unexpected else "")
            + "\n  check the config: stage, decoder kind, train_orders ('standard' has 1 BOS token),"
              " slot init, split_block")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in ours.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointMismatch("reference checkpoint shapes do not fit this model:\n  " + "\n  ".join(bad))
    model.load_state_dict(ours)
    report.loaded = sorted(ours)
    return report


def _check_causal_mask(key: str, mask: torch.Tensor) -> None:
    n = mask.shape[0]
    if not torch.equal(mask.bool(), torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)):
        raise CheckpointMismatch(f"{key} is not the causal mask this decoder applies")


def export_reference(model: SPOT, frozen_encoder: dict[str, torch.Tensor] | None = None,
                     wrap: bool = True) -> dict:
    """The model's weights under the reference's names (`{'model': state}` if `wrap`).

    Stage 1 needs nothing else: the reference SPOT also holds `encoder.*`, pass the frozen
    encoder's timm-named state as `frozen_encoder` to include it (the reference loads strictly).
    Stage 2 needs `frozen_encoder`: the student's `encoder.*` is the frozen encoder with our
    fine-tuned tail in blocks >= split_block, and `second_encoder.*` is the frozen copy.
    """
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.startswith("encoder_tail."):
            continue
        key = _rename(name, _BACKWARD)
        if key is None:
            raise CheckpointMismatch(f"no reference name for parameter {name}")
        if key == "bos_tokens":
            value = value.reshape(value.shape[0], 1, 1, -1)
        out[key] = value.detach().clone()
    N, D = cfg.grid_size ** 2, cfg.feature_dim
    if cfg.decoder.kind == "transformer":
        for i in range(cfg.decoder.num_blocks):
            out[f"dec.blocks.{i}.self_attn_mask"] = torch.triu(torch.ones(N, N, dtype=torch.bool), 1)
    else:   # the reference builds (and strictly loads) these for MLP models too; unused there
        g = torch.Generator().manual_seed(0)
        out["input_proj.0.weight"] = torch.randn(D, D, generator=g) * D ** -0.5
        out["input_proj.1.weight"], out["input_proj.1.bias"] = torch.ones(D), torch.zeros(D)
        out["bos_tokens"] = torch.randn(1, 1, 1, D, generator=g) * 0.02
    if cfg.stage == 2 and frozen_encoder is None:
        raise CheckpointMismatch("exporting a stage-2 model needs frozen_encoder= (the frozen encoder's"
                                 " timm-named state dict, e.g. FrozenEncoder.vit.state_dict())")
    if frozen_encoder is not None:
        student = dict(frozen_encoder)
        if model.encoder_tail is not None:
            for name, value in model.encoder_tail.state_dict().items():
                student[block_name(name, cfg.encoder.split_block)] = value.detach().clone()
        out.update({f"encoder.{k}": v for k, v in student.items()})
        if cfg.stage == 2:
            out.update({f"second_encoder.{k}": v.clone() for k, v in frozen_encoder.items()})
    return {"model": out} if wrap else out


def load_reference_slot_attention(module, state: dict[str, torch.Tensor]) -> None:
    """Load the reference's `SlotAttentionEncoder` state (SPOT's `slot_attn.*` without the prefix)
    into a spot-fast `SlotAttention`."""
    ours = {}
    for key, value in state.items():
        name = _rename("slot_attn." + key, _FORWARD)
        if name is None:
            raise CheckpointMismatch(f"unexpected slot-attention key {key}")
        ours[name[len("slot_attention."):]] = value
    missing, unexpected = module.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise CheckpointMismatch(f"slot-attention state does not fit: missing {missing}, unexpected {unexpected}")
