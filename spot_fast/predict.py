"""Use a trained model: slots and masks for images, the frozen encoder run on the fly.

    from spot_fast.predict import Predictor
    predictor = Predictor.from_run("runs/spot")        # the run's encoder: its recorded weights id
    predictor = Predictor.from_reference("spot_coco.pth", preset("coco"))   # its own `encoder.*`
    p = predictor(["a.jpg", pil_image, tensor])                       # Prediction
    p.slots (B, K, S), p.slot_masks (B, K, h, w), p.decoder_masks (B, K, h, w), p.labels(320)

Inputs: image files and PIL images get the validation transform (resize shorter side, centre
crop, ImageNet normalisation); tensors are taken as already normalised (3, S, S) or (B, 3, S, S).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from spot_fast.checkpoint import CheckpointMismatch, load_reference
from spot_fast.config import SPOTConfig
from spot_fast.devices import resolve_device
from spot_fast.encoders import FrozenEncoder, build_vit, load_weights
from spot_fast.errors import UserError
from spot_fast.evaluate import run_model
from spot_fast.io import load_tensors
from spot_fast.metrics import masks_to_labels
from spot_fast.model import SPOT
from spot_fast.runs import checkpoint_weights, read_run_checkpoint


KINDS = ("decoder", "slot_attention")
RANDOM_INIT_ID = re.compile(r"random-init:(\d+)(?:\+sincos-position-([0-9.eE+-]+))?$")


class PredictError(UserError, ValueError):
    """An input the predictor cannot use (images, a run folder, weights); the message says which and why."""


@dataclass
class Prediction:
    slots: torch.Tensor          # (B, K, S)
    slot_masks: torch.Tensor     # (B, K, h, w) slot-attention masks (last iteration)
    decoder_masks: torch.Tensor  # (B, K, h, w) decoder masks, mean over the decoded orders

    def labels(self, size: int, kind: str = "decoder") -> torch.Tensor:
        """(B, size, size) label maps of the decoder ("decoder") or slot-attention ("slot_attention")
        masks: bilinear upsampling, argmax over the slots."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PredictError(f"labels(size={size!r}): size must be an int >= 1 (the label map's side in pixels)")
        if kind not in KINDS:
            raise PredictError(f"labels(kind={kind!r}): kind must be one of {', '.join(map(repr, KINDS))}")
        return masks_to_labels(self.decoder_masks if kind == "decoder" else self.slot_masks, size)


def to_inputs(images, image_size: int) -> torch.Tensor:
    """(B, 3, S, S) float32 normalised: from paths, PIL images, (3, S, S) / (B, 3, S, S) float
    tensors (any float dtype), or a non-empty list of them."""
    from PIL import Image

    from spot_fast.data.transforms import load_rgb, resize_center_crop, to_input
    want = f"(3, {image_size}, {image_size})"
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        if tuple(images.shape[1:]) != (3, image_size, image_size) or images.shape[0] == 0:
            raise PredictError(f"images: a (B, 3, {image_size}, {image_size}) batch with B >= 1 expected, got "
                               f"{tuple(images.shape)}: resize/crop to {image_size} px, RGB channels first")
        _check_float(images)
        return images.float()
    items = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise PredictError("images: an empty list; give at least one path, PIL image or tensor")
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = load_rgb(Path(item))
        if isinstance(item, Image.Image):
            item = to_input(resize_center_crop(item.convert("RGB"), image_size))
        if not isinstance(item, torch.Tensor) or tuple(item.shape) != (3, image_size, image_size):
            raise PredictError(f"an input image is neither a path, a PIL image nor a {want} tensor: got "
                               f"{type(item).__name__} {tuple(getattr(item, 'shape', ()))}")
        _check_float(item)
        out.append(item.float())
    return torch.stack(out)


def _check_float(t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise PredictError(f"images: a float tensor (ImageNet-normalised) expected, got {t.dtype}: convert with "
                           f"spot_fast.data.transforms.to_input, or pass paths / PIL images")


class Predictor:
    def __init__(self, model: SPOT, encoder: FrozenEncoder, orders="all", seed: int = 0):
        self.model, self.encoder, self.orders, self.seed = model.eval(), encoder.eval(), orders, seed
        self.device = next(model.parameters()).device
        self.encoder.to(self.device)

    @classmethod
    def from_run(cls, run: str | os.PathLike, weights: str | os.PathLike | None = None, device=None,
                 **kw) -> "Predictor":
        """A spot-fast run folder or checkpoint (verified). The encoder is the one the run trained on,
        rebuilt from what the run records: a random-init encoder from its seed, real weights from
        `weights` (a file) or the local HF / torch-hub cache, refused when they are other weights."""
        device = resolve_device(device)
        ckpt, _, config = read_run_checkpoint(run, "run")
        cfg = SPOTConfig.from_dict(ckpt["config"])
        model = SPOT(cfg)
        model.load_state_dict(ckpt["model"])
        recorded = checkpoint_weights(ckpt) or (config or {}).get("data", {}).get("weights")
        return cls(model.to(device), run_encoder(cfg, recorded, weights), **kw)

    @classmethod
    def from_reference(cls, checkpoint: str | os.PathLike | dict, cfg: SPOTConfig,
                       weights: str | os.PathLike | None = None, device=None, **kw) -> "Predictor":
        """A reference-format checkpoint (`cfg`: its config, e.g. preset("coco") or preset("coco", 2)).
        The frozen encoder comes from `weights`, else from the checkpoint itself (`encoder.*` for
        stage 1, `second_encoder.*` for stage 2)."""
        device = resolve_device(device)
        ckpt = checkpoint if isinstance(checkpoint, dict) else \
            load_tensors(checkpoint, "checkpoint", CheckpointMismatch, allow=(argparse.Namespace,))
        model = SPOT(cfg)
        load_reference(model, ckpt)
        if weights is not None:
            encoder = FrozenEncoder.create(cfg.encoder, weights=weights)
        else:
            state = ckpt.get("model", ckpt)
            prefix = "second_encoder." if cfg.stage == 2 else "encoder."
            frozen = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not frozen:
                raise PredictError(f"the checkpoint holds no `{prefix}*` weights: pass weights= (the encoder's file)")
            vit = build_vit(cfg.encoder)
            load_weights(vit, frozen)
            encoder = FrozenEncoder(cfg.encoder, vit, "reference-checkpoint")
        return cls(model.to(device), encoder, **kw)

    @torch.no_grad()
    def __call__(self, images) -> Prediction:
        cfg = self.model.cfg
        x = to_inputs(images, cfg.encoder.image_size).to(self.device)
        tokens = self.encoder(x, split_block=cfg.encoder.split_block if cfg.stage == 2 else None)
        g = torch.Generator(self.device).manual_seed(self.seed)
        out = run_model(self.model, {"features": tokens.final, "split_tokens": tokens.split}, self.orders, g,
                        masks_only=True)
        return Prediction(slots=out.slots, slot_masks=out.sa_masks, decoder_masks=out.dec_masks)


def run_encoder(cfg: SPOTConfig, recorded: str | None, weights: str | os.PathLike | None) -> FrozenEncoder:
    """The frozen encoder a run's features came from (`recorded`: its weights id)."""
    match = RANDOM_INIT_ID.match(recorded or "")
    if match or weights == "random-init":
        if recorded is not None and not match:
            raise PredictError(f"weights='random-init': the run trained on features of real encoder weights "
                               f"({recorded[:24]}); pass weights= (their file) or leave it out")
        enc = cfg.encoder
        if match and match.group(2) is not None:       # the demo's encoder: a fixed sin-cos position table
            enc = dataclasses.replace(enc, position="sincos", position_scale=float(match.group(2)))
        encoder = FrozenEncoder.create(enc, random_init=True, seed=int(match.group(1)) if match else 0)
        encoder.weights_id = recorded or encoder.weights_id
        return encoder
    encoder = FrozenEncoder.create(cfg.encoder, weights=weights)
    if recorded is not None and encoder.weights_id != recorded:
        where = f"weights={weights}" if weights is not None else "the local HF / torch-hub cache's weights"
        raise PredictError(f"{where} are not the encoder weights the run trained on ({recorded[:24]}): pass "
                           f"weights= with that file")
    return encoder
