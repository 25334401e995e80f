"""The smallest real end-to-end run on a feature cache: train a SPOT stage-1 model on the cached
train split with the reference's optimiser (Adam, warm-up + cosine lr, inf-norm clipping), evaluate
it on the cached val split (FG-ARI, mBO, mIoU with all 9 orders) and draw its masks.

    python -m spot_fast.quickstart --cache runs/demo/cache --preset tiny --image-size 64 --out runs/demo

The full trainer (both stages, checkpoints, resume) is `spot-fast train`; this is the quick check.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from spot_fast.cache import open_cache
from spot_fast.config import preset
from spot_fast.metrics import MetricAccumulator, masks_to_labels
from spot_fast.model import SPOT
from spot_fast.schedules import cosine_schedule, warmup_epochs

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [67, 99, 216], [245, 130, 49],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [188, 246, 12], [250, 190, 190],
                    [0, 128, 128], [154, 99, 36]], dtype=np.uint8)


def train(model: SPOT, cache, epochs: int, batch_size: int, seed: int) -> list[float]:
    optim = model.cfg.optim
    reader = cache.train_reader(batch_size, seed=seed)
    steps = len(reader)
    lrs = cosine_schedule(optim.lr, optim.lr_min, epochs, steps,
                          warmup_epochs(optim.warmup_steps, cache.num_images, batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=optim.lr)
    losses, t0 = [], time.perf_counter()
    model.train()
    for epoch in range(epochs):
        reader.set_epoch(epoch)
        for i, batch in enumerate(reader):
            for group in opt.param_groups:
                group["lr"] = lrs[epoch * steps + i]
            loss = model(batch["features"]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip, norm_type="inf")
            opt.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{epochs}  mse {np.mean(losses[-steps:]):.4f}  "
              f"{(epoch + 1) * steps * batch_size / (time.perf_counter() - t0):.0f} img/s")
    return losses


@torch.no_grad()
def evaluate(model: SPOT, cache, batch_size: int, mask_size: int):
    model.eval()
    dec, sa, first = MetricAccumulator(), MetricAccumulator(), None
    for batch in cache.eval_reader(batch_size):
        out = model(batch["features"], orders="all")
        labels = masks_to_labels(out.dec_masks, mask_size)
        dec.update(labels, batch["instance_mask"], batch["class_mask"], batch["ignore_mask"])
        sa.update(masks_to_labels(out.sa_masks, mask_size), batch["instance_mask"], batch["class_mask"],
                  batch["ignore_mask"])
        if first is None:
            first = (batch["jpeg"], labels, batch["instance_mask"])
    return dec.compute(), sa.compute(), first


def draw(jpegs: list[bytes], labels: torch.Tensor, truth: torch.Tensor, path: Path, n: int = 8) -> None:
    """Rows: image | decoder masks over it | ground-truth instances."""
    from PIL import Image
    tiles = []
    for jpeg, lab, gt in list(zip(jpegs, labels, truth))[:n]:
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        size = img.size[0]
        lab = np.asarray(Image.fromarray(lab.numpy().astype(np.uint8)).resize((size, size), Image.NEAREST))
        gt = np.asarray(Image.fromarray(gt.numpy().astype(np.uint8)).resize((size, size), Image.NEAREST))
        rgb = np.asarray(img)
        over = (0.45 * rgb + 0.55 * PALETTE[lab % len(PALETTE)]).astype(np.uint8)
        tiles.append(np.concatenate([rgb, over, PALETTE[gt % len(PALETTE)]], axis=0))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="folder with train/ and val/ caches")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's resolution")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    if args.image_size:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, image_size=args.image_size))
    train_cache = open_cache(args.cache / "train", expect=cfg, allow_random_init=True)
    val_cache = open_cache(args.cache / "val", expect=cfg, allow_random_init=True)
    model = SPOT(cfg)
    losses = train(model, train_cache, args.epochs, args.batch_size, args.seed)
    dec, sa, (jpegs, labels, truth) = evaluate(model, val_cache, args.batch_size,
                                               val_cache.manifest["mask_size"])
    args.out.mkdir(parents=True, exist_ok=True)
    draw(jpegs, labels, truth, args.out / "masks.png")
    report = {"first_mse": losses[0], "last_mse": losses[-1], "decoder": dec, "slot_attention": sa}
    (args.out / "quickstart.json").write_text(json.dumps(report, indent=2))
    print(f"mse {losses[0]:.4f} -> {losses[-1]:.4f}")
    for name, m in (("decoder masks", dec), ("slot-attention masks", sa)):
        print(f"{name:>22}: " + "  ".join(f"{k} {v:5.1f}" for k, v in m.items()))
    print(f"masks drawn: {args.out / 'masks.png'}   report: {args.out / 'quickstart.json'}")


if __name__ == "__main__":
    main()
