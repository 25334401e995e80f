"""What `spot-fast demo` shows: its table, pictures and Markdown report (spot_fast/demo.py runs it).

    rows = table_rows({name: model_metrics(run) for name, run in runs.items()}, baselines)
    print(format_table(rows))
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from spot_fast.baselines import grid_labels
from spot_fast.config import preset

MODELS = ("stage1", "stage2", "dinosaur")
MODEL_TITLES = {"stage1": "SPOT stage 1", "stage2": "SPOT stage 2", "dinosaur": "DINOSAUR (MLP decoder)"}
METRIC_TITLES = {"fg_ari": "FG-ARI", "mbo_i": "mBO^i", "mbo_c": "mBO^c", "miou": "mIoU"}


# ----------------------------------------------------------------------------- 4. evaluate

def model_metrics(run: Path) -> dict[str, dict[str, float]]:
    """{"decoder": metrics, "slot_attention": metrics} of a finished run's final evaluation."""
    return json.loads((run / "eval" / "metrics.json").read_text())


def table_rows(metrics: dict[str, dict], baselines: dict[str, dict]) -> list[dict]:
    """One row per (model, mask kind), then the baselines: {"model", "masks", **metrics}."""
    rows = []
    for name in MODELS:
        for kind, label in (("decoder", "decoder"), ("slot_attention", "slot attention")):
            rows.append({"model": MODEL_TITLES[name], "masks": label, **metrics[name][kind]})
    for name, m in baselines.items():
        rows.append({"model": f"trivial: {name}", "masks": "-", **m})
    return rows


# ----------------------------------------------------------------------------- 5. report

def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a Markdown table."""
    head = ["model", "masks", *METRIC_TITLES.values()]
    body = [[r["model"], r["masks"], *(f"{r[k]:.1f}" for k in METRIC_TITLES)] for r in rows]
    if markdown:
        lines = [head, ["---"] * 2 + ["---:"] * len(METRIC_TITLES), *body]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [head, *body])


def beats_baselines(rows: list[dict]) -> dict[str, bool]:
    """Per model row: does it beat every trivial baseline on both FG-ARI and mBO^i?"""
    base = [r for r in rows if r["model"].startswith("trivial")]
    return {f"{r['model']} ({r['masks']})": all(r[k] > b[k] for b in base for k in ("fg_ari", "mbo_i"))
            for r in rows if not r["model"].startswith("trivial")}


def _resize(labels: np.ndarray, size: int) -> np.ndarray:
    """(M, M) small non-negative ints -> (size, size), nearest neighbour."""
    from PIL import Image
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size, size), Image.NEAREST))


def _overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8: the label map (M, M) in colour over the image."""
    from spot_fast.evaluate import PALETTE
    return (0.45 * rgb + 0.55 * PALETTE[_resize(labels % len(PALETTE), rgb.shape[0])]).astype(np.uint8)


def comparison_picture(val_cache, runs: dict[str, Path], num_slots: int, path: Path, n: int = 8) -> None:
    """One row per val image: image | ground truth | grid baseline | each model's decoder masks."""
    from PIL import Image

    from spot_fast.evaluate import BACKGROUND, IGNORED, PALETTE
    batch = next(iter(val_cache.eval_reader(n, split_tokens=False)))
    saved = {name: np.load(run / "eval" / "labels.npz") for name, run in runs.items()}
    rows = []
    for j, jpeg in enumerate(batch["jpeg"]):
        rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        truth, S = batch["instance_mask"][j].numpy(), rgb.shape[0]
        gt = PALETTE[_resize(truth % len(PALETTE), S)]
        gt[_resize(truth, S) == 0] = BACKGROUND
        gt[_resize(batch["ignore_mask"][j].numpy(), S) > 0] = IGNORED
        tiles = [rgb, gt, _overlay(rgb, grid_labels(num_slots, *truth.shape).numpy())]
        for name in runs:
            k = int(np.flatnonzero(saved[name]["index"] == int(batch["index"][j]))[0])
            tiles.append(_overlay(rgb, saved[name]["decoder"][k]))
        rows.append(np.concatenate([t.repeat(TILE_ZOOM, 0).repeat(TILE_ZOOM, 1) for t in tiles], axis=1))
    titles = ["image", "ground truth", f"grid of {num_slots}", *(MODEL_TITLES[m].split(" (")[0] for m in runs)]
    body = np.concatenate(rows, axis=0)
    Image.fromarray(np.concatenate([_header(titles, body.shape[1] // len(titles)), body], axis=0)).save(path)


TILE_ZOOM = 2        # picture tiles at twice the image size (64 px scenes -> 128 px), nearest neighbour


def _header(titles: list[str], width: int, height: int = 18) -> np.ndarray:
    """(height, width * len(titles), 3) uint8: white strip, each title centred over its column."""
    from PIL import Image, ImageDraw
    strip = Image.new("RGB", (width * len(titles), height), "white")
    draw = ImageDraw.Draw(strip)
    for i, title in enumerate(titles):
        w = draw.textlength(title)
        draw.text((i * width + max(0, (width - w) / 2), 3), title, fill="black")
    return np.asarray(strip)


def seconds(sec: float) -> str:
    """Wall time for the report: whole seconds, tenths below 10 s."""
    return f"{sec:.0f} s" if sec >= 10 else f"{sec:.1f} s"


def write_report(cfg, rows: list[dict], times: dict[str, float], reused: list[str], encoder: str,
                 path: Path) -> None:
    """OUT/report.md of DemoConfig `cfg`: what ran, the table, which models beat the baselines, the
    pictures, caveats, and the wall times of the runs that made the results (`reused`: the steps
    this invocation found done)."""
    beat, threads = beats_baselines(rows), torch.get_num_threads()
    k = next(r["model"] for r in rows if r["model"].startswith("trivial: grid"))
    lines = [
        "# spot-fast demo",
        "",
        f"Synthetic scenes ({cfg.level} level: {cfg.num_train} train, {cfg.num_val} val images, "
        f"{preset('demo').encoder.image_size} px), features of {encoder}, cached once; SPOT stage 1, "
        f"SPOT stage 2 (stage 1 as its teacher) and the DINOSAUR baseline trained from that cache with "
        f"`spot_fast.train`; masks of the val images scored in percent (decoder masks averaged over "
        f"all patch orders). The trivial baselines never look at the image.",
        "",
        format_table(rows, markdown=True),
        "",
        "Beats both trivial baselines on FG-ARI and mBO^i:",
        "",
        *(f"- {name}: {'yes' if ok else '**no**'}" for name, ok in beat.items()),
        "",
        "![masks](masks.png)",
        "",
        f"Columns: image | ground truth (white: ignored overlaps) | {k[len('trivial: '):]} | "
        + " | ".join(f"{MODEL_TITLES[m]} decoder masks" for m in MODELS) + ".",
        "Each model's own picture (image | ground truth | decoder | slot attention): "
        + ", ".join(f"[{m}]({m}/eval/masks.png)" for m in MODELS) + ".",
        "",
        "## What this shows, and what it does not",
        "",
        "It shows the whole pipeline (data -> feature cache -> both SPOT stages and DINOSAUR -> "
        "evaluation) at work, and, in the rows marked yes above, learning to group pixels into objects "
        "better than layouts that ignore the image. It is not COCO: flat-coloured shapes on plain "
        "backgrounds, "
        + ("a random-init ViT whose features carry only each patch's colour and position (no "
           "pretraining), " if cfg.weights is None else f"real {cfg.encoder} weights at a small resolution, ")
        + "a few minutes of training. Its figures say nothing about SPOT's quality on natural images "
        "(the paper's COCO mBO^i is 34.9 with DINO ViT-B/16 and 100 epochs).",
        "",
        "## Run",
        "",
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}; wall time "
        "of the runs that made these results: " + ", ".join(f"{name} {seconds(sec)}" for name, sec in times.items())
        + "." + (f" Reused by this invocation: {', '.join(reused)}." if reused else ""),
        "",
    ]
    path.write_text("\n".join(lines))
