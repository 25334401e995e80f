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
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from spot_fast.baselines import score_baselines
from spot_fast.config import ENCODERS, EncoderConfig, preset
from spot_fast.demo_report import (MODEL_TITLES, MODELS, TILE_ZOOM, beats_baselines, comparison_picture,  # noqa: F401
                                   format_table, model_metrics, table_rows, write_report)
from spot_fast.errors import UserError, arg
from spot_fast.fields import ConfigError, check_fields, setting
from spot_fast.train_config import MAX_SEED, TrainError, check_device

# Stage 1 and DINOSAUR start each slot from its own learned value (stage 2's init) instead of the
# reference's shared Gaussian, which at this length left them far behind (the presets keep it).
SLOT_INIT = {"slot_attention.init": "embedding"}
# The DINOSAUR baseline: SPOT's stage 1 with the MLP decoder (raster order only), 30 epochs unless
# --epochs says otherwise, an MLP 4x the feature width, and an lr warm-up of 5 epochs (SPOT's: 1).
DINOSAUR = {"decoder.kind": "mlp", "decoder.train_orders": "standard", "decoder.eval_orders": "standard",
            "optim.epochs": "30", "decoder.mlp_hidden": "256"}
DINOSAUR_WARMUP_EPOCHS = 5
DATA_RECORD = "demo_data.json"      # the SyntheticConfig the data folder was written with
TEACHER_RECORD = "demo_teacher.json"  # in the stage-2 run: the teacher folder and its checkpoint's sha256
TIMES_RECORD = "demo_times.json"    # in OUT: wall seconds of the run that made each step's result


class DemoError(UserError):
    """A problem the user can fix (a folder holding something else, a bad option)."""


def _levels() -> tuple[str, ...]:
    from spot_fast.data.synthetic import LEVELS
    return tuple(LEVELS)


@dataclass
class DemoConfig:
    out: str = "runs/demo"              # everything goes here: data/, cache/, stage1/, stage2/, dinosaur/, report.md
    weights: str | None = None          # real encoder weights file (None: the random-init demo encoder)
    encoder: str = setting("dino_vits8", choices=tuple(ENCODERS))  # with `weights`: which ViT they are
    num_train: int = setting(1000, min=1)   # synthetic training images (at least one batch)
    num_val: int = setting(200, min=1)  # synthetic val images (the table's figures)
    level: str = setting("spaced", choices=_levels())  # scene difficulty (spot_fast.data.synthetic.LEVELS)
    epochs: int | None = setting(None, min=1)   # stage 1 and DINOSAUR epochs (None: the demo preset's; DINOSAUR 30)
    stage2_epochs: int | None = setting(None, min=1)    # stage 2 epochs (None: the demo preset's stage-2 value)
    seed: int = setting(0, min=0, max=MAX_SEED)     # data, encoder init and training are functions of it
    device: str | None = None           # cpu | cuda | cuda:N (None: cuda if available, else cpu)
    progress: bool = True               # progress bars while caching and training
    threads: int | None = setting(None, min=1)  # intra-op CPU threads (None: spot_fast.threads policy)
    extra: dict[str, str] = field(default_factory=dict)  # --set overrides for all three models (tests)

    def validate(self) -> None:
        """Every field, then the rest: a DemoError naming the argument (its flag on the command line)."""
        try:
            check_fields(self)
            check_device(self.device)
        except ConfigError as e:
            raise DemoError(f"{arg(e.key)} {e.problem}") from None
        except TrainError as e:
            raise DemoError(str(e)) from None
        batch = int(self.extra.get("optim.batch_size", preset("demo").optim.batch_size))
        if self.num_train < batch:
            raise DemoError(f"{arg('num_train')} must be at least the batch size {batch}, got {self.num_train}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise DemoError(f"{arg('weights', self.weights)}: no such file (give a DINO .pth/.safetensors, or "
                            f"leave it out for the random-init demo encoder)")


# ----------------------------------------------------------------------------- 1. data

def synthetic_config(cfg: DemoConfig):
    from spot_fast.data.synthetic import SyntheticConfig
    image_size = preset("demo").encoder.image_size
    return SyntheticConfig.at_level(cfg.level, num_train=cfg.num_train, num_val=cfg.num_val,
                                    image_size=image_size, seed=cfg.seed)


def make_data(cfg: DemoConfig, say=print) -> tuple[Path, bool]:
    """Write the synthetic dataset to OUT/data, or reuse it when it was written with the same
    settings; (the folder, whether it was reused)."""
    from spot_fast.data.synthetic import write_synthetic
    root = Path(cfg.out) / "data"
    record = root / DATA_RECORD
    want = dataclasses.asdict(synthetic_config(cfg))
    want = json.loads(json.dumps(want))                      # tuples -> lists, as read back
    if record.is_file():                    # written only once the dataset is complete
        if json.loads(record.read_text())["config"] != want:
            raise DemoError(f"{root} holds a synthetic dataset written with other settings: pass another "
                            f"{arg('out')}, or delete {root} (and {Path(cfg.out) / 'cache'}) to start again")
        say(f"already generated: {root}")
        return root, True
    if root.exists() and any(root.iterdir()):
        raise DemoError(f"{root} exists and is not a demo dataset: pass another {arg('out')} or delete it")
    counts = write_synthetic(root, synthetic_config(cfg))   # atomic: an interrupted write leaves nothing
    record.write_text(json.dumps({"config": want}))
    say(f"generated {counts['train']} train + {counts['val']} val images ({cfg.level} level) in {root}")
    return root, False


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


def make_caches(cfg: DemoConfig, data: Path, say=print) -> tuple[Path, bool]:
    """OUT/cache/{train,val}: the features of the dataset, with the split-layer tokens stage 2
    needs, built by `spot_fast.cache.build_splits`; an existing cache of the same content is
    reused. (The folder, whether both were reused.)"""
    from spot_fast.cache import CacheBuildConfig, CustomEncoder, build_splits
    enc = cache_encoder(cfg)
    folder = Path(cfg.out) / "cache"
    encoder = None                  # real weights: build_splits resolves and loads `cfg.weights`
    if cfg.weights is None:
        encoder = CustomEncoder(demo_encoder_id(enc, cfg.seed), lambda: demo_encoder(enc, cfg.seed))
    build = CacheBuildConfig("synthetic", data, split="both", out=folder, encoder=enc, weights=cfg.weights,
                             split_block=enc.split_block, mask_size=enc.image_size, batch_size=64,
                             num_workers=0, device=cfg.device, progress=cfg.progress)
    results = build_splits(build, encoder=encoder, say=say, warn=say)
    for split, done in results.items():
        if done.result is not None:
            say(f"cached {split}: {done.result.manifest['counts']['images']} images in "
                f"{done.result.seconds:.1f}s -> {done.path}")
    return folder, all(done.result is None for done in results.values())


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
                       log_every=10, threads=cfg.threads)


def teacher_id(teacher: Path) -> str:
    """sha256 of a teacher run's newest step checkpoint (a finished run's final weights, the ones
    stage 2 distils): the run's config names only the teacher's folder, whose content can change."""
    from spot_fast.encoders import file_sha256
    from spot_fast.train.state import checkpoint_file
    return file_sha256(checkpoint_file(teacher))


def train_model(tcfg, say=print) -> tuple[Path, bool]:
    """Train one model to the end and evaluate it (the trainer's last step). A finished run with
    the same settings (and, for stage 2, the same teacher weights) is reused; an interrupted one
    is resumed. (The run folder, whether it was reused.)"""
    from spot_fast.train import train
    from spot_fast.train_config import RESUME_FREE, config_diff
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
                            f"{arg('out')}, or delete {run} to train it again")
        if teacher is not None and (not record.is_file() or json.loads(record.read_text()) != teacher):
            raise DemoError(f"{run} was distilled from other stage-1 weights than those now in {tcfg.teacher} "
                            f"(retrained since): delete {run} to train stage 2 again from them")
        if (run / "eval" / "metrics.json").is_file():
            say(f"already trained: {run}")
            return run, True
        return train(dataclasses.replace(tcfg, resume=True)), False
    if teacher is not None:
        run.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(teacher))
    return train(tcfg), False


@dataclass
class DemoResult:
    rows: list[dict]            # the table: {"model", "masks", fg_ari, mbo_i, mbo_c, miou}
    beats: dict[str, bool]      # per model row: beats both trivial baselines on FG-ARI and mBO^i
    times: dict[str, float]     # wall seconds per step, of the run that made its result
    reused: list[str]           # the steps this invocation found done
    report: Path                # OUT/report.md


def run_demo(cfg: DemoConfig, say=print) -> DemoResult:
    """The whole demo (see the module docstring); returns the table and where the report is."""
    from spot_fast.cache import open_cache
    from spot_fast.threads import configure_threads, step_work
    cfg.validate()
    out = Path(cfg.out)
    enc, batch = preset("demo").encoder, preset("demo").optim.batch_size
    configure_threads(cfg.threads, work=step_work(enc, batch))
    record = out / TIMES_RECORD
    times: dict[str, float] = json.loads(record.read_text()) if record.is_file() else {}
    reused: list[str] = []

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        value, done_before = fn(*args)
        if done_before and name in times:
            reused.append(name)
        else:                               # made now (a resumed run: this invocation's part)
            times[name] = time.perf_counter() - t0
            out.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(times))
        return value

    def train_step(name):
        say(f"== {MODEL_TITLES[name]} -> {Path(cfg.out) / name}")
        return train_model(train_config(cfg, name, cache), say)

    data = timed("data", make_data, cfg, say)
    cache = timed("cache", make_caches, cfg, data, say)
    runs = {name: timed(name, train_step, name) for name in MODELS}
    val = open_cache(cache / "val", allow_random_init=cfg.weights is None)
    num_slots = json.loads((runs["stage1"] / "config.json").read_text())["model"]["slot_attention"]["num_slots"]
    baselines = timed("baselines", lambda: (score_baselines(val, num_slots), False))
    rows = table_rows({name: model_metrics(run) for name, run in runs.items()}, baselines)
    comparison_picture(val, runs, num_slots, out / "masks.png")
    encoder = val.manifest["weights"] if cfg.weights is None else f"{cfg.encoder} ({cfg.weights})"
    times = {name: times[name] for name in ("data", "cache", *MODELS, "baselines")}
    write_report(cfg, rows, times, reused, encoder, out / "report.md")
    beats = beats_baselines(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "beats": beats, "times": times, "reused": reused,
                                                  "encoder": encoder, "config": dataclasses.asdict(cfg)}, indent=1))
    say(format_table(rows))
    say(f"report: {out / 'report.md'}  pictures: {out / 'masks.png'}")
    return DemoResult(rows, beats, times, reused, out / "report.md")
