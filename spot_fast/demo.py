"""`spot-fast demo`: SPOT learning to find objects, visibly, on a CPU in minutes.

    result = run_demo(DemoConfig(out="runs/demo"))      # CLI: spot-fast demo [--out DIR] [--weights FILE]

1. data      the synthetic multi-object dataset at its "spaced" level -> OUT/data
2. cache     its frozen-encoder features, train and val -> OUT/cache (reused: "already cached")
3. train     SPOT stage 1, SPOT stage 2 (self-training, stage 1 as teacher) and the DINOSAUR
             baseline (MLP decoder), all with `spot_fast.train` from the one cache -> OUT/<model>
4. evaluate  each model's decoder and slot-attention masks on the val split (the trainer's final
             evaluation, all patch orders), and two trivial baselines that never look at the
             image: everything in one slot, a fixed grid of K blocks
5. report    one table on stdout; OUT/report.md (table + pictures), OUT/masks.png, OUT/results.json

The encoder: without `weights`, a small random-init ViT (`demo_encoder`): it knows nothing about
objects; its features carry each patch's colour and, through a fixed sin-cos position table
(`EncoderConfig.position="sincos"`), its place. With `weights`, a real DINO ViT (`encoder`, e.g.
dino_vits8) on the same scenes.
This is not COCO: the scenes are flat-coloured shapes on plain backgrounds, chosen so that
learning shows in minutes; the figures say that the pipeline learns to group, not how well SPOT
does on natural images.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spot_fast.baselines import grid_labels, score_baselines
from spot_fast.config import ENCODERS, EncoderConfig, preset
from spot_fast.errors import UserError

MODELS = ("stage1", "stage2", "dinosaur")
MODEL_TITLES = {"stage1": "SPOT stage 1", "stage2": "SPOT stage 2", "dinosaur": "DINOSAUR (MLP decoder)"}
# Stage 1 and DINOSAUR start each slot from its own learned value (stage 2's init) instead of the
# reference's shared Gaussian: at this length the shared Gaussian left stage 1 ~10 mBO^i lower and
# collapsed DINOSAUR's alpha masks to one slot at every lr, slot size and MLP width tried. (The
# presets keep the reference's stage-1 init; this is the demo's setting.)
SLOT_INIT = {"slot_attention.init": "embedding"}
# The DINOSAUR baseline: SPOT's stage 1 with the MLP decoder, which only has the raster order; 30
# epochs unless --epochs says otherwise (50, stage 1's, left it ~5 FG-ARI lower: it over-splits).
# Hidden width 256 = 4x the feature width (the paper's MLP is ~2.7x ViT-S's): the demo preset's 64
# trained unstably, decoder-mask FG-ARI 40.9 / 12.9 / 25.7 over training seeds 1-3 against
# 54.6 / 42.9 / 48.2 at 256 (mBO^i 31.8 -> 47.7 on average), for ~100 s more on 2 cores. Its lr
# warms up over 5 epochs (DINOSAUR_WARMUP_EPOCHS; SPOT's over 1): with 1, demo seeds 0 and 2 ended
# at FG-ARI 46.7 and 43.8, about the grid's 44; with 5, 48.2 and 51.0 (slot attention 52.4, 52.5).
DINOSAUR = {"decoder.kind": "mlp", "decoder.train_orders": "standard", "decoder.eval_orders": "standard",
            "optim.epochs": "30", "decoder.mlp_hidden": "256"}
DINOSAUR_WARMUP_EPOCHS = 5
METRIC_TITLES = {"fg_ari": "FG-ARI", "mbo_i": "mBO^i", "mbo_c": "mBO^c", "miou": "mIoU"}
DATA_RECORD = "demo_data.json"      # the SyntheticConfig the data folder was written with
TEACHER_RECORD = "demo_teacher.json"  # in the stage-2 run: the teacher folder and its checkpoint's sha256


class DemoError(UserError):
    """A problem the user can fix (a folder holding something else, a bad option)."""


@dataclass
class DemoConfig:
    out: str = "runs/demo"              # everything goes here: data/, cache/, stage1/, stage2/, dinosaur/, report.md
    weights: str | None = None          # real encoder weights file (None: the random-init demo encoder)
    encoder: str = "dino_vits8"         # with `weights`: which ViT they are (a key of config.ENCODERS)
    num_train: int = 1000               # synthetic training images
    num_val: int = 200                  # synthetic val images (the table's figures)
    level: str = "spaced"               # scene difficulty (spot_fast.data.synthetic.LEVELS)
    epochs: int | None = None           # stage 1 and DINOSAUR epochs (None: the demo preset's; DINOSAUR 30)
    stage2_epochs: int | None = None    # stage 2 epochs (None: the demo preset's stage-2 value)
    seed: int = 0                       # data, encoder init and training are functions of it
    device: str | None = None           # None: cuda if available, else cpu
    progress: bool = True               # progress bars while caching and training
    extra: dict[str, str] = field(default_factory=dict)  # --set overrides for all three models (tests)

    def validate(self) -> None:
        from spot_fast.data.synthetic import LEVELS
        batch = preset("demo").optim.batch_size
        checks = [
            (self.num_train >= batch, f"--num-train must be at least the batch size {batch}, got {self.num_train}"),
            (self.num_val >= 1, f"--num-val must be >= 1, got {self.num_val}"),
            (self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.stage2_epochs is None or self.stage2_epochs >= 1,
             f"--stage2-epochs must be >= 1, got {self.stage2_epochs}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.level in LEVELS, f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}"),
            (self.encoder in ENCODERS, f"--encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}"),
            (self.weights is None or Path(self.weights).is_file(),
             f"--weights {self.weights}: no such file (give a DINO .pth/.safetensors, or leave it out "
             f"for the random-init demo encoder)"),
        ]
        for ok, message in checks:
            if not ok:
                raise DemoError(message)


# ----------------------------------------------------------------------------- 1. data

def synthetic_config(cfg: DemoConfig):
    from spot_fast.data.synthetic import SyntheticConfig
    image_size = preset("demo").encoder.image_size
    return SyntheticConfig.at_level(cfg.level, num_train=cfg.num_train, num_val=cfg.num_val,
                                    image_size=image_size, seed=cfg.seed)


def make_data(cfg: DemoConfig, say=print) -> Path:
    """Write the synthetic dataset to OUT/data, or reuse it when it was written with the same settings."""
    from spot_fast.data.synthetic import write_synthetic
    root = Path(cfg.out) / "data"
    record = root / DATA_RECORD
    want = dataclasses.asdict(synthetic_config(cfg))
    want = json.loads(json.dumps(want))                      # tuples -> lists, as read back
    if record.is_file():                    # written only once the dataset is complete
        if json.loads(record.read_text())["config"] != want:
            raise DemoError(f"{root} holds a synthetic dataset written with other settings: pass another "
                            f"--out, or delete {root} (and {Path(cfg.out) / 'cache'}) to start again")
        say(f"already generated: {root}")
        return root
    if root.exists() and any(root.iterdir()):
        raise DemoError(f"{root} exists and is not a demo dataset: pass another --out or delete it")
    counts = write_synthetic(root, synthetic_config(cfg))   # atomic: an interrupted write leaves nothing
    record.write_text(json.dumps({"config": want}))
    say(f"generated {counts['train']} train + {counts['val']} val images ({cfg.level} level) in {root}")
    return root


# ----------------------------------------------------------------------------- 2. cache

def demo_encoder(cfg: EncoderConfig, seed: int):
    """The random-init ViT of the demo. An untrained ViT's learned position table starts near zero
    (std 0.02), so its features would say nothing about where a patch is; a pretrained ViT's do.
    The demo preset's encoder has a fixed 2-D sin-cos table instead (`EncoderConfig.position`):
    the features carry colour and position, and nothing about objects. Its weights id says so
    (and marks the cache random-init, as FrozenEncoder.create(random_init=True) does)."""
    from spot_fast.encoders import FrozenEncoder
    encoder = FrozenEncoder.create(cfg, random_init=True, seed=seed)
    encoder.weights_id = demo_encoder_id(cfg, seed)
    return encoder


def demo_encoder_id(cfg: EncoderConfig, seed: int) -> str:
    """The weights id of `demo_encoder(cfg, seed)` in cache keys and manifests."""
    table = f"+sincos-position-{cfg.position_scale}" if cfg.position == "sincos" else ""
    return f"random-init:{seed}{table}"


def cache_encoder(cfg: DemoConfig) -> EncoderConfig:
    """The encoder the cache is built with: the demo preset's, or `cfg.encoder` for real weights
    (its last two blocks are stage 2's fine-tuned tail)."""
    enc = preset("demo").encoder
    if cfg.weights is None:
        return enc
    depth = ENCODERS[cfg.encoder].depth
    return dataclasses.replace(enc, name=cfg.encoder, split_block=depth - 2, position="learned")


def make_caches(cfg: DemoConfig, data: Path, say=print) -> Path:
    """OUT/cache/{train,val}: the features of the dataset, with the split-layer tokens stage 2
    needs; an existing cache of the same content is reused."""
    from spot_fast.cache import CacheSpec, build_cache, find_cached
    from spot_fast.data.sources import open_source
    from spot_fast.encoders import FrozenEncoder, resolve_weights
    enc = cache_encoder(cfg)
    folder = Path(cfg.out) / "cache"
    encoder = None
    resolved = None if cfg.weights is None else resolve_weights(enc, cfg.weights)
    weights_id = demo_encoder_id(enc, cfg.seed) if resolved is None else resolved[1]
    for split in ("train", "val"):
        spec = CacheSpec("synthetic", str(data), split, enc, weights_id, split_block=enc.split_block,
                         mask_size=enc.image_size)
        if find_cached(spec, folder / split) is not None:
            say(f"already cached: {folder / split}")
            continue
        if encoder is None:
            encoder = demo_encoder(enc, cfg.seed) if resolved is None else FrozenEncoder.create(enc, resolved=resolved)
        source = open_source("synthetic", data, split, image_size=enc.image_size, mask_size=enc.image_size)
        result = build_cache(source, encoder, spec, folder / split, batch_size=64, num_workers=0,
                             device=cfg.device, progress=cfg.progress)
        say(f"cached {split}: {result.manifest['counts']['images']} images in {result.seconds:.1f}s -> {folder / split}")
    return folder



# ----------------------------------------------------------------------------- 3. train

def train_config(cfg: DemoConfig, name: str, cache: Path):
    """The TrainConfig of one of MODELS on the demo cache (the `demo` preset, one warm-up epoch)."""
    from spot_fast.train import TrainConfig
    out = Path(cfg.out)
    batch = int(cfg.extra.get("optim.batch_size", preset("demo").optim.batch_size))
    # one epoch of lr warm-up (DINOSAUR: five) whatever the dataset size (the trainer counts it in whole epochs)
    dinosaur_epochs = cfg.epochs or int(DINOSAUR["optim.epochs"])
    epochs = min(DINOSAUR_WARMUP_EPOCHS, dinosaur_epochs) if name == "dinosaur" else 1
    warmup = {"optim.warmup_steps": str(epochs * math.ceil(cfg.num_train / batch))}
    stage2 = name == "stage2"
    overrides = {**warmup, **({} if stage2 else SLOT_INIT), **cfg.extra, **(DINOSAUR if name == "dinosaur" else {})}
    return TrainConfig(stage=2 if stage2 else 1, cache=str(cache), out=str(out / name), preset="demo",
                       overrides=overrides, teacher=str(out / "stage1") if stage2 else None,
                       epochs=cfg.stage2_epochs if stage2 else cfg.epochs, seed=cfg.seed,
                       allow_random_init=cfg.weights is None, device=cfg.device, progress=cfg.progress,
                       log_every=10)


def teacher_id(teacher: Path) -> str:
    """sha256 of a teacher run's newest step checkpoint (a finished run's final weights, the ones
    stage 2 distils): the run's config names only the teacher's folder, whose content can change."""
    from spot_fast.encoders import file_sha256
    from spot_fast.train.state import checkpoint_file
    return file_sha256(checkpoint_file(teacher))


def train_model(tcfg, say=print) -> Path:
    """Train one model to the end and evaluate it (the trainer's last step). A finished run with
    the same settings (and, for stage 2, the same teacher weights) is reused; an interrupted one
    is resumed."""
    from spot_fast.train import train
    from spot_fast.train.config import RESUME_FREE, config_diff
    from spot_fast.train.state import step_checkpoints
    run = Path(tcfg.out)
    config_file, record = run / "config.json", run / TEACHER_RECORD
    teacher = None if tcfg.teacher is None else {"teacher": tcfg.teacher, "sha256": teacher_id(Path(tcfg.teacher))}
    if config_file.is_file() and step_checkpoints(run):
        have = json.loads(config_file.read_text())["train"]
        want = json.loads(json.dumps(tcfg.to_dict()))
        diff = config_diff(*({k: v for k, v in d.items() if k not in RESUME_FREE} for d in (have, want)))
        if diff:
            raise DemoError(f"{run} holds a run with other settings ({', '.join(diff)} differ): pass another "
                            f"--out, or delete {run} to train it again")
        if teacher is not None and (not record.is_file() or json.loads(record.read_text()) != teacher):
            raise DemoError(f"{run} was distilled from other stage-1 weights than those now in {tcfg.teacher} "
                            f"(retrained since): delete {run} to train stage 2 again from them")
        if (run / "eval" / "metrics.json").is_file():
            say(f"already trained: {run}")
            return run
        return train(dataclasses.replace(tcfg, resume=True))
    if teacher is not None:
        run.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(teacher))
    return train(tcfg)


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


def write_report(cfg: DemoConfig, rows: list[dict], times: dict[str, float], encoder: str, path: Path) -> None:
    """OUT/report.md: what ran, the table, which models beat the baselines, the pictures, caveats."""
    beat = beats_baselines(rows)
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
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; wall time "
        + ", ".join(f"{name} {sec:.0f} s" for name, sec in times.items()) + " (0 s: reused).",
        "",
    ]
    path.write_text("\n".join(lines))


@dataclass
class DemoResult:
    rows: list[dict]            # the table: {"model", "masks", fg_ari, mbo_i, mbo_c, miou}
    beats: dict[str, bool]      # per model row: beats both trivial baselines on FG-ARI and mBO^i
    times: dict[str, float]     # wall seconds per step of this run (0: reused)
    report: Path                # OUT/report.md


def run_demo(cfg: DemoConfig, say=print) -> DemoResult:
    """The whole demo (see the module docstring); returns the table and where the report is."""
    from spot_fast.cache import open_cache
    cfg.validate()
    out = Path(cfg.out)
    times: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        times[name] = time.perf_counter() - t0
        return value

    data = timed("data", make_data, cfg, say)
    cache = timed("cache", make_caches, cfg, data, say)
    runs = {name: timed(name, train_model, train_config(cfg, name, cache), say) for name in MODELS}
    val = open_cache(cache / "val", allow_random_init=cfg.weights is None)
    num_slots = json.loads((runs["stage1"] / "config.json").read_text())["model"]["slot_attention"]["num_slots"]
    baselines = timed("baselines", score_baselines, val, num_slots)
    rows = table_rows({name: model_metrics(run) for name, run in runs.items()}, baselines)
    comparison_picture(val, runs, num_slots, out / "masks.png")
    encoder = val.manifest["weights"] if cfg.weights is None else f"{cfg.encoder} ({cfg.weights})"
    write_report(cfg, rows, times, encoder, out / "report.md")
    beats = beats_baselines(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "beats": beats, "times": times,
                                                  "encoder": encoder, "config": dataclasses.asdict(cfg)}, indent=1))
    say(format_table(rows))
    say(f"report: {out / 'report.md'}  pictures: {out / 'masks.png'}")
    return DemoResult(rows, beats, times, out / "report.md")
