"""The frozen ViT that spot-fast caches: a timm model, its weights, and one forward that returns
both the final tokens and the split-layer tokens (no hooks).

- final tokens: after the last block, WITHOUT the final norm, CLS and registers dropped -> (B, N, D)
- split tokens: the input of block `split_block`, CLS and registers kept -> (B, 1+R+N, D)

A weights file that cannot be read, holds no tensors, or is another architecture (width, depth,
patch size) raises `WeightsError` naming the file, what was expected and what the file holds,
before anything is loaded (timm would otherwise resample a wrong patch size silently).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from spot_fast.config import EncoderConfig
from spot_fast.errors import UserError
from spot_fast.io import load_failure, load_tensors


class WeightsNotFound(UserError, FileNotFoundError):
    """No weights file given and none in the local caches, or the given path is not a file."""


class WeightsError(UserError, ValueError):
    """A weights file that cannot be read or does not fit the configured encoder."""


def sincos_table(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sin-cos position table in raster order: the first half of the
    channels encode the row, the second half the column, at dim // 4 frequencies each."""
    q = dim // 4
    omega = 1.0 / 100.0 ** (torch.arange(q, dtype=torch.float64) / q)        # (q,)
    angle = torch.arange(grid, dtype=torch.float64)[:, None] * omega          # (grid, q)
    one = torch.cat([angle.sin(), angle.cos()], dim=1)                        # (grid, 2q)
    rows = one[:, None].expand(grid, grid, 2 * q)
    cols = one[None, :].expand(grid, grid, 2 * q)
    table = torch.zeros(grid, grid, dim, dtype=torch.float64)
    table[..., :4 * q] = torch.cat([rows, cols], dim=-1)
    return table.reshape(grid * grid, dim).float()


def build_vit(cfg: EncoderConfig) -> nn.Module:
    """A randomly initialised timm VisionTransformer of the configured architecture; a custom one
    with `position="sincos"` gets the fixed sin-cos position table (weights loaded later replace it)."""
    from timm.models import create_model
    from timm.models.vision_transformer import VisionTransformer

    spec = cfg.spec
    if spec.timm_name is None:
        model = VisionTransformer(img_size=cfg.image_size, patch_size=spec.patch_size,
                                  embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                                  mlp_ratio=spec.mlp_ratio, qkv_bias=True, num_classes=0,
                                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
        if cfg.position == "sincos":
            with torch.no_grad():
                pos = model.pos_embed                                     # (1, prefix + N, D)
                pos.zero_()
                pos[0, model.num_prefix_tokens:] = cfg.position_scale * sincos_table(cfg.grid_size, spec.embed_dim)
    else:
        model = create_model(spec.timm_name, pretrained=False, img_size=cfg.image_size, num_classes=0)
    return model.eval()


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the usual wrappers (DINO's 'teacher', MAE's 'model', ...)."""
    for key in ("teacher", "model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"--weights {path} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if isinstance(k, str) and k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        raise WeightsError(f"--weights {path} holds {len(others)} entries that are not tensors (e.g. "
                           f"{others[:3]}): pass the encoder's state dict (.pth or .safetensors)")
    return state


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .pth / .safetensors file; `WeightsError` when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"--weights {path}: no such file")
    fix = "pass the encoder's .pth or .safetensors release"
    if path.suffix != ".safetensors":
        return _unwrap_state_dict(load_tensors(path, "--weights", WeightsError, fix), path)
    try:
        from safetensors.torch import load_file
        return load_file(str(path))
    except Exception as err:    # safetensors raises its own types
        raise WeightsError(f"--weights {path} is not a readable .safetensors weights file "
                           f"({load_failure(err)}): {fix}") from None


def describe_vit(state: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """{"embed_dim", "depth", "patch_size"} of a ViT state dict (DINO / timm / MAE naming), or None."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return {"embed_dim": proj.shape[0], "depth": max(blocks, default=-1) + 1, "patch_size": proj.shape[-1]}


def check_weights_fit(state: dict[str, torch.Tensor], cfg: EncoderConfig, path: str | os.PathLike) -> None:
    """`WeightsError` unless `state` is a ViT of the configured width, depth and patch size."""
    spec = cfg.spec
    expected = {"embed_dim": spec.embed_dim, "depth": spec.depth, "patch_size": spec.patch_size}
    want = f"encoder {cfg.name} (width {spec.embed_dim}, {spec.depth} blocks, patch {spec.patch_size})"
    found = describe_vit(state)
    if found is None:
        names = sorted(state)[:3]
        raise WeightsError(f"--weights {path} is not a ViT ({len(state)} tensors, e.g. {names}, no "
                           f"patch_embed.proj.weight); expected {want}")
    if found != expected:
        raise WeightsError(f"--weights {path} holds a ViT of width {found['embed_dim']}, {found['depth']} blocks, "
                           f"patch {found['patch_size']}; expected {want}: pass that encoder's weights or "
                           f"choose the matching --encoder")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def find_local_weights(cfg: EncoderConfig) -> Path | None:
    """Weights already on this machine: the Hugging Face cache (timm's files), then torch hub's."""
    spec = cfg.spec
    if spec.hf_repo:
        try:
            from huggingface_hub import try_to_load_from_cache
            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(spec.hf_repo, fname)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
        except ImportError:
            pass
    if spec.torch_hub_file:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / spec.torch_hub_file
        if hub.is_file():
            return hub
    return None


def missing_weights_message(cfg: EncoderConfig) -> str:
    spec = cfg.spec
    where = ["pass --weights FILE (a .pth/.safetensors in DINO's original or timm's naming)"]
    if spec.hf_repo:
        where.append(f"put timm's file in the Hugging Face cache as repo {spec.hf_repo} "
                     f"(e.g. `huggingface-cli download {spec.hf_repo}` on a machine with internet)")
    if spec.torch_hub_file:
        where.append(f"or copy the original release to {Path(torch.hub.get_dir()) / 'checkpoints' / spec.torch_hub_file}")
    where.append("or use --random-init for tests (the cache is then marked random-init)")
    return f"no weights found for encoder {cfg.name!r}: " + "; ".join(where)


def resolve_weights(cfg: EncoderConfig, weights: str | os.PathLike | None = None, random_init: bool = False,
                    seed: int = 0) -> tuple[Path | None, str]:
    """(weights file or None for random init, weights id) without building the model: the id
    (sha256 of the file, or "random-init:<seed>") names the weights in cache keys and manifests."""
    if random_init:
        return None, f"random-init:{seed}"
    path = Path(weights) if weights is not None else find_local_weights(cfg)
    if path is None:
        raise WeightsNotFound(missing_weights_message(cfg))
    if not path.is_file():
        raise WeightsNotFound(f"--weights {path}: no such file")
    return path, file_sha256(path)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load DINO/DINOv2/MAE/timm-named weights, resampling the position embedding if needed."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "decoder", "mask_token"))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:     # shape mismatches
        raise WeightsError(f"encoder weights do not fit {type(model).__name__}: "
                           f"{str(err).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise WeightsError(f"encoder weights do not fit {type(model).__name__}: {len(missing)} tensors "
                           f"missing (e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
                           f"(e.g. {sorted(unexpected)[:3]})")


@dataclass
class EncoderTokens:
    final: torch.Tensor                 # (B, N, D): last block, no final norm, prefix tokens dropped
    split: torch.Tensor | None = None   # (B, P+N, D): input of block `split_block`, prefix kept


class FrozenEncoder(nn.Module):
    """A frozen timm ViT returning final and split-layer tokens in one forward."""

    def __init__(self, cfg: EncoderConfig, vit: nn.Module, weights_id: str):
        super().__init__()
        self.cfg = cfg
        self.vit = vit.eval().requires_grad_(False)
        self.weights_id = weights_id    # sha256 of the weights file, or "random-init:<seed>"

    @classmethod
    def create(cls, cfg: EncoderConfig, weights: str | os.PathLike | None = None,
               random_init: bool = False, seed: int = 0,
               resolved: tuple[Path | None, str] | None = None) -> "FrozenEncoder":
        """Build from `weights`, else the local HF/torch-hub cache; `random_init` for tests only.
        `resolved`: a `resolve_weights` result already at hand (saves hashing the file again)."""
        path, weights_id = resolved or resolve_weights(cfg, weights, random_init, seed)
        if path is None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return cls(cfg, build_vit(cfg), weights_id)
        state = read_weights_file(path)
        check_weights_fit(state, cfg, path)
        vit = build_vit(cfg)
        try:
            load_weights(vit, state)
        except WeightsError as err:
            raise WeightsError(f"--weights {path}: {err}") from None
        return cls(cfg, vit, weights_id)

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @torch.no_grad()
    def forward(self, images: torch.Tensor, split_block: int | None = None) -> EncoderTokens:
        """images: (B, 3, H, W), ImageNet-normalised."""
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)          # prepend CLS/registers, add position embedding
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        split = None
        for i, block in enumerate(vit.blocks):
            if i == split_block:
                split = x
            x = block(x)
        return EncoderTokens(final=x[:, self.num_prefix_tokens:], split=split)

    def tail_state(self, split_block: int) -> dict[str, torch.Tensor]:
        """Weights of blocks >= split_block and the final norm, named as in the timm model."""
        return {k: v for k, v in self.vit.state_dict().items()
                if k.startswith("norm.") or (k.startswith("blocks.") and int(k.split(".")[1]) >= split_block)}


def build_tail(cfg: EncoderConfig) -> nn.ModuleList:
    """Fresh copies of the encoder's blocks >= split_block (the stage-2 student's fine-tuned part)."""
    vit = build_vit(cfg)
    return nn.ModuleList(vit.blocks[cfg.split_block:])
