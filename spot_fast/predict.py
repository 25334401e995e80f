"""Use a trained model: slots and masks for images, the frozen encoder run on the fly.

    from spot_fast.predict import Predictor
    predictor = Predictor.from_run("runs/spot")                       # encoder weights: local cache
    predictor = Predictor.from_reference("spot_coco.pth", preset("coco"))   # its own `encoder.*`
    p = predictor(["a.jpg", pil_image, tensor])                       # Prediction
    p.slots (B, K, S), p.slot_masks (B, K, h, w), p.decoder_masks (B, K, h, w), p.labels(320)

Inputs: image files and PIL images get the validation transform (resize shorter side, centre
crop, ImageNet normalisation); tensors are taken as already normalised (3, S, S) or (B, 3, S, S).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spot_fast.checkpoint import load_reference
from spot_fast.config import SPOTConfig
from spot_fast.encoders import FrozenEncoder, build_vit, load_weights
from spot_fast.evaluate import run_model
from spot_fast.metrics import masks_to_labels
from spot_fast.model import SPOT


@dataclass
class Prediction:
    slots: torch.Tensor          # (B, K, S)
    slot_masks: torch.Tensor     # (B, K, h, w) slot-attention masks (last iteration)
    decoder_masks: torch.Tensor  # (B, K, h, w) decoder masks, mean over the decoded orders

    def labels(self, size: int, kind: str = "decoder") -> torch.Tensor:
        """(B, size, size) label maps: bilinear upsampling, argmax over the slots."""
        return masks_to_labels(self.decoder_masks if kind == "decoder" else self.slot_masks, size)


def to_inputs(images, image_size: int) -> torch.Tensor:
    """(B, 3, S, S) normalised: from paths, PIL images, (3, S, S) / (B, 3, S, S) tensors, or a list of them."""
    from PIL import Image

    from spot_fast.data.transforms import load_rgb, resize_center_crop, to_input
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return images
    items = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = load_rgb(Path(item))
        if isinstance(item, Image.Image):
            item = to_input(resize_center_crop(item.convert("RGB"), image_size))
        if not isinstance(item, torch.Tensor) or item.shape != (3, image_size, image_size):
            raise ValueError(f"an input image is neither a path, a PIL image nor a (3, {image_size}, {image_size}) "
                             f"tensor: got {type(item).__name__} {tuple(getattr(item, 'shape', ()))}")
        out.append(item)
    return torch.stack(out)


class Predictor:
    def __init__(self, model: SPOT, encoder: FrozenEncoder, orders="all", seed: int = 0):
        self.model, self.encoder, self.orders, self.seed = model.eval(), encoder.eval(), orders, seed
        self.device = next(model.parameters()).device
        self.encoder.to(self.device)

    @classmethod
    def from_run(cls, run: str | os.PathLike, weights: str | os.PathLike | None = None, device=None,
                 **kw) -> "Predictor":
        """A spot-fast run folder or checkpoint. `weights`: the encoder's file (None: the local
        HF / torch-hub cache; "random-init" rebuilds the random encoder of a test cache)."""
        from spot_fast.train.state import checkpoint_file, read_checkpoint
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = read_checkpoint(checkpoint_file(run))
        cfg = SPOTConfig.from_dict(ckpt["config"])
        model = SPOT(cfg)
        model.load_state_dict(ckpt["model"])
        recorded = _recorded_weights(Path(run))
        if weights == "random-init":
            seed = int(recorded.split(":")[1]) if recorded and recorded.startswith("random-init:") else 0
            encoder = FrozenEncoder.create(cfg.encoder, random_init=True, seed=seed)
        else:
            encoder = FrozenEncoder.create(cfg.encoder, weights=weights)
        return cls(model.to(device), encoder, **kw)

    @classmethod
    def from_reference(cls, checkpoint: str | os.PathLike | dict, cfg: SPOTConfig,
                       weights: str | os.PathLike | None = None, device=None, **kw) -> "Predictor":
        """A reference-format checkpoint (`cfg`: its config, e.g. preset("coco") or preset("coco", 2)).
        The frozen encoder comes from `weights`, else from the checkpoint itself (`encoder.*` for
        stage 1, `second_encoder.*` for stage 2)."""
        from spot_fast.train.teacher import read_checkpoint_file
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = checkpoint if isinstance(checkpoint, dict) else read_checkpoint_file(Path(checkpoint))
        model = SPOT(cfg)
        load_reference(model, ckpt)
        if weights is not None:
            encoder = FrozenEncoder.create(cfg.encoder, weights=weights)
        else:
            state = ckpt.get("model", ckpt)
            prefix = "second_encoder." if cfg.stage == 2 else "encoder."
            frozen = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not frozen:
                raise ValueError(f"the checkpoint holds no `{prefix}*` weights: pass weights= (the encoder's file)")
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


def _recorded_weights(run: Path) -> str | None:
    """The encoder weights id a run was trained with (its config.json), if known."""
    import json
    file = (run if run.is_dir() else run.parent.parent) / "config.json"
    return json.loads(file.read_text())["data"].get("weights") if file.is_file() else None

