"""Object discovery on a val cache (spec section 6): metrics of the decoder masks and of the
slot-attention masks, the predicted label maps, and a picture grid.

    result = evaluate(model, val_cache, orders="all", out="runs/spot/eval")
    result["decoder"]["mbo_i"], result["slot_attention"]["fg_ari"]          # percent

`out` receives `metrics.json`, `labels.npz` (index, decoder, slot_attention: (n, M, M) label maps
at the ground-truth resolution M, the exact maps the metrics were computed from) and `masks.png`
(one row per image: image | ground-truth instances, background black, ignored pixels white |
decoder masks | slot-attention masks).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from spot_fast.cache.device import device_batches
from spot_fast.config import SPOTConfig
from spot_fast.devices import resolve_device
from spot_fast.errors import UserError, arg, on_cli
from spot_fast.io import write_atomic
from spot_fast.metrics import MetricAccumulator, masks_to_labels
from spot_fast.model import SPOT, SPOTOutput
from spot_fast.runs import check_weights, checkpoint_weights, read_run_checkpoint

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [67, 99, 216], [245, 130, 49],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [188, 246, 12], [250, 190, 190],
                    [0, 128, 128], [154, 99, 36]], dtype=np.uint8)
IGNORED = np.array([255, 255, 255], dtype=np.uint8)       # ground-truth pixels left out of every metric
BACKGROUND = np.array([0, 0, 0], dtype=np.uint8)
MASK_KINDS = ("decoder", "slot_attention")


class EvaluationError(UserError, ValueError):
    """A cache that cannot be evaluated on (no ground-truth masks)."""


def run_model(model: SPOT, batch: dict, orders, generator: torch.Generator | None = None,
              masks_only: bool = False) -> SPOTOutput:
    """The model on a device batch of either stage: stage 2 reads the split tokens and
    reconstructs the final ones. Shared-Gaussian slot noise comes from `generator`."""
    features = batch["features"]
    sa = model.cfg.slot_attention
    noise = None
    if sa.init == "shared_gaussian" and generator is not None:
        noise = torch.randn(features.shape[0], sa.num_slots, sa.slot_size, generator=generator,
                            device=features.device, dtype=features.dtype)        # (B, K, S)
    if model.cfg.stage == 2:
        return model(batch["split_tokens"], target=features, orders=orders, noise=noise, masks_only=masks_only)
    return model(features, orders=orders, noise=noise, masks_only=masks_only)


def _val_batches(cache, batch_size: int, stage2: bool, device):
    """The val cache's batches on `device`: tokens travel as stored (8-bit with their scales) and are
    cast, or dequantised, to float32 there (`device_batches`)."""
    return device_batches(cache.eval_reader(batch_size, split_tokens=stage2, dtype=None), device)


@torch.no_grad()
def reconstruction_loss(model: SPOT, cache, batch_size: int = 64, seed: int = 0, orders="standard") -> float:
    """Mean reconstruction MSE over the cache's images (view 0), as a validation loss."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for batch in _val_batches(cache, batch_size, model.cfg.stage == 2, device):
        b = batch["features"].shape[0]
        total += run_model(model, batch, orders, g).loss.double() * b
        count += b
    model.train(was_training)
    return float(total / max(count, 1))


@torch.no_grad()
def evaluate(model: SPOT, cache, *, orders="all", batch_size: int = 64, out: str | os.PathLike | None = None,
             num_pictures: int = 8, seed: int = 0) -> dict:
    """Metrics of the model's masks on every image of a val cache: {"decoder": metrics,
    "slot_attention": metrics, "orders", "images"}, metrics as `MetricAccumulator.compute()`."""
    if not cache.has_masks:
        raise EvaluationError(f"cache {cache.path} holds no ground-truth masks (a train cache?): evaluate on a val "
                              f"cache (`spot-fast cache ... --split val`)")
    model.eval()
    device = next(model.parameters()).device
    size = cache.manifest["mask_size"]
    g = torch.Generator(device).manual_seed(seed)
    accs = {k: MetricAccumulator() for k in MASK_KINDS}
    labels: dict[str, list] = {k: [] for k in MASK_KINDS}
    index, pictures = [], []
    label_dtype = torch.uint8 if model.cfg.slot_attention.num_slots <= 256 else torch.int16
    for batch in _val_batches(cache, batch_size, model.cfg.stage == 2, device):
        o = run_model(model, batch, orders, g, masks_only=True)       # metrics need no reconstruction
        maps = {"decoder": masks_to_labels(o.dec_masks.float(), size),
                "slot_attention": masks_to_labels(o.sa_masks.float(), size)}       # (B, M, M)
        for k in MASK_KINDS:
            accs[k].update(maps[k], batch["instance_mask"], batch["class_mask"], batch["ignore_mask"])
            labels[k].append(maps[k].to(label_dtype).cpu())
        index.append(batch["index"].cpu())
        if len(pictures) < num_pictures:
            pictures += _picture_rows(batch, maps, num_pictures - len(pictures))
    result = {k: accs[k].compute() for k in MASK_KINDS}
    result.update(orders=orders if isinstance(orders, str) else str(orders), images=int(sum(len(i) for i in index)))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1) + "\n"
        write_atomic(out / "metrics.json", lambda f: f.write(text), mode="w")
        arrays = {"index": torch.cat(index).numpy(), **{k: torch.cat(v).numpy() for k, v in labels.items()}}
        write_atomic(out / "labels.npz", lambda f: np.savez_compressed(f, **arrays))
        if pictures:
            from PIL import Image
            grid = Image.fromarray(np.concatenate(pictures, axis=0))
            write_atomic(out / "masks.png", lambda f: grid.save(f, format="PNG"))
    return result


# ----------------------------------------------------------------------------- pictures

def _resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size, size), Image.NEAREST))


def _picture_rows(batch: dict, maps: dict[str, torch.Tensor], n: int) -> list[np.ndarray]:
    """Up to `n` rows (S, 4 S, 3) uint8: image | ground truth | decoder masks | slot-attention masks."""
    from PIL import Image
    rows = []
    for j, jpeg in enumerate(batch["jpeg"][:n]):
        rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        S = rgb.shape[0]
        ids = _resize_labels(batch["instance_mask"][j].cpu().numpy(), S)
        gt = PALETTE[(ids.astype(np.int64) - 1) % len(PALETTE)]
        gt[ids == 0] = BACKGROUND
        gt[_resize_labels(batch["ignore_mask"][j].cpu().numpy(), S) > 0] = IGNORED
        tiles = [rgb, gt]
        for k in MASK_KINDS:
            lab = _resize_labels(maps[k][j].cpu().numpy() % len(PALETTE), S)
            tiles.append((0.45 * rgb + 0.55 * PALETTE[lab]).astype(np.uint8))
        rows.append(np.concatenate(tiles, axis=1))
    return rows


def val_cache_path(cache: str | os.PathLike) -> Path:
    """The val cache `cache` names: itself, or the val/ of a --split both folder. A cache of the
    train split is refused (no ground-truth masks) with the command that builds its val cache."""
    from spot_fast.cache import read_manifest, resolve_cache
    from spot_fast.commands import cache_command
    path = Path(cache)
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        if manifest.get("split") != "val":
            out = path.parent / "val" if path.name == "train" else path.with_name(path.name + "-val")
            command = cache_command(manifest, out, split="val")
            how = f"`{command}`" if command else "this cache's options and --split val"
            raise EvaluationError(f"{arg('cache', str(path))} is a {manifest.get('split')} cache, which holds no "
                                  f"ground-truth masks: evaluate on a val cache; build one with {how}")
    return resolve_cache(path, "val", cli=on_cli())


def evaluate_run(run: str | os.PathLike, cache: str | os.PathLike, *, orders="all", batch_size: int = 64,
                 out: str | os.PathLike | None = None, num_pictures: int = 8, device=None,
                 allow_random_init: bool = False) -> dict:
    """Load a run (folder or checkpoint, verified), open the val cache for its config (features of
    the encoder weights the run trained on), evaluate. A run trained on a random-init cache says so
    in its config.json and is accepted without `allow_random_init`. `cache`: a val cache or a
    --split both folder (`resolve_cache`'s rule)."""
    from spot_fast.cache import open_cache
    cache = val_cache_path(cache)
    device = resolve_device(device)
    ckpt, _, config = read_run_checkpoint(run)
    recorded = (config or {}).get("data", {})
    cfg = SPOTConfig.from_dict(ckpt["config"])
    model = SPOT(cfg)
    model.load_state_dict(ckpt["model"])
    val = open_cache(cache, expect=cfg, allow_random_init=allow_random_init or bool(recorded.get("random_init")))
    check_weights(checkpoint_weights(ckpt) or recorded.get("weights"), val.manifest["weights"], f"run {run}",
                  f"evaluate it on a cache of the encoder it trained on (cache {cache} holds other features)")
    return evaluate(model.to(device).eval(), val, orders=orders, batch_size=batch_size, out=out,
                    num_pictures=num_pictures)
