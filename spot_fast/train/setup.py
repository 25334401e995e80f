"""Everything a run is resolved to before its first step, as one typed `RunSetup`:

    setup = resolve_run(tcfg, ranks)
    setup.cfg, setup.data, setup.val_cache, setup.teacher, setup.autocast_dtype, setup.notes

The data source (a local cache, `cache` taken by `resolve_cache`'s one rule and each manifest
read once; streamed shards; or images through the frozen encoder, those that cannot be decoded
skipped and listed), the model config (preset -> cache geometry -> --set -> short options; a
batch and lr warm-up that fit a small dataset when the user left them to the preset), the
stage-2 teacher and encoder tail, the precision (and with it TF32) and the thread count.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spot_fast.cache import Cache, CacheError, resolve_cache
from spot_fast.cache.cache import check_fits
from spot_fast.commands import cache_command
from spot_fast.config import SPOTConfig
from spot_fast.encoders import file_sha256
from spot_fast.errors import arg, on_cli
from spot_fast.model import SPOT
from spot_fast.schedules import cosine_schedule, warmup_epochs
from spot_fast.precision import resolve_precision
from spot_fast.threads import configure_threads, step_work, tunes
from spot_fast.train.config import TrainConfig, TrainError, model_config
from spot_fast.train.data import CacheBatches, ImageBatches, StreamBatches, stage2_targets
from spot_fast.train.ddp import Ranks
from spot_fast.train.teacher import load_teacher


@dataclass
class RunSetup:
    cfg: SPOTConfig                      # the resolved model config (what config.json records as "model")
    data: object                         # the batch source: CacheBatches | StreamBatches | ImageBatches
    data_info: dict                      # config.json's "data": paths, manifest hashes, weights id, images
    tail: dict | None = None             # stage 2: the frozen encoder's tail weights the student starts from
    val_cache: Cache | None = None       # the validation cache (None: none given or found)
    teacher: SPOT | None = None          # stage 2: the frozen teacher, eval mode
    teacher_id: str | None = None        # stage 2: its checkpoint's checksum (resume compares it, not its path)
    precision: str = "fp32"              # what --precision resolved to: bf16 | fp32
    autocast_dtype: torch.dtype | None = None   # bf16 autocast, or None (fp32)
    threads: int = 1                     # torch intra-op threads set for this run (at its start)
    threads_tuned: bool = False          # the loop's step times may change them (threads.ThreadTuner)
    notes: list[str] = field(default_factory=list)   # what was fitted to the data, for the intro line
    skipped: str = ""                    # images that cannot be decoded, left out (`ReadableSource.summary`)


def no_split_tokens(tcfg: TrainConfig, manifest: dict, path: Path, split_block: int) -> TrainError:
    """Stage 2 on a cache without split tokens: the command that builds one, and how to train on it."""
    if tcfg.cache and path.parent == Path(tcfg.cache):       # a --split both folder: rebuild both splits
        out, split = Path(f"{Path(tcfg.cache)}.split{split_block}"), "both"
        use = arg("cache", str(out))
    else:
        out, split = Path(f"{path}.split{split_block}"), manifest["split"]
        use = arg("train_cache", str(out))
    command = cache_command(manifest, out, preset=tcfg.preset, split=split, split_block=split_block)
    how = (f"`{command}`" if command else f"the cache command that built it (its encoder weights are not recorded "
           f"by path), adding --split {split} --split-block {split_block} --out {out}")
    return TrainError(f"cache {path} holds no split-layer tokens, which stage 2 trains from: rebuild it with "
                      f"{how} and train with {use}")


def encoder_as_cached(cfg: SPOTConfig, manifest: dict) -> SPOTConfig:
    """The config with the encoder's position table as the cache's manifest records it
    ("position": "sincos:<scale>"; no key: learned), so the run records the encoder that made its features."""
    position = manifest["encoder"].get("position")
    kind, scale = ("learned", cfg.encoder.position_scale) if position is None else position.split(":")
    enc = dataclasses.replace(cfg.encoder, position=kind, position_scale=float(scale))
    return dataclasses.replace(cfg, encoder=enc)


def set_precision(device: torch.device, precision: str, work: int | None = None) -> str:
    """What `precision` computes in on `device` for steps of `work` elements ("bf16" | "fp32",
    spot_fast.precision); on CUDA also TF32 on (off for fp32). The one place the trainer sets
    torch's global flags."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    return resolve_precision(precision, device, work)


def fit_small_data(tcfg: TrainConfig, cfg: SPOTConfig, samples: int, world_size: int) -> tuple[SPOTConfig, list]:
    """A batch and lr warm-up that fit `samples` training images where the preset's would leave no
    batch or a warm-up longer than training (and the user did not choose them); the notes say
    what changed. Where the preset's fit, nothing changes."""
    o, notes, chosen = cfg.optim, [], set(tcfg.overrides)
    if tcfg.batch_size is None and "optim.batch_size" not in chosen and o.batch_size * world_size > samples:
        batch = max(1, samples // world_size)
        notes.append(f"batch {batch} (the preset's {o.batch_size} is more than the {samples} images)")
        o = dataclasses.replace(o, batch_size=batch)
    if "optim.warmup_steps" not in chosen and warmup_epochs(o.warmup_steps, samples, o.batch_size * world_size) > \
            o.epochs:
        steps = o.epochs * max(1, samples // (o.batch_size * world_size)) // 10
        notes.append(f"lr warm-up {steps} steps (the preset's {o.warmup_steps} is longer than training on "
                     f"{samples} images; a tenth of it)")
        o = dataclasses.replace(o, warmup_steps=steps)
    return dataclasses.replace(cfg, optim=o), notes


def cache_paths(tcfg: TrainConfig) -> tuple[Path, Path | None]:
    """The train cache and the val cache (None: none given) of a cache run. `cache` follows
    `resolve_cache`'s one rule: a --split both folder; a cache of one split is named by its own option."""
    if tcfg.cache is None:
        return Path(tcfg.train_cache), Path(tcfg.val_cache) if tcfg.val_cache else None
    need_both = tcfg.val_cache is None
    train = resolve_cache(tcfg.cache, "train", need_both=need_both, cli=on_cli())
    return train, resolve_cache(tcfg.cache, "val", cli=on_cli()) if need_both else Path(tcfg.val_cache)


def open_cache_data(tcfg: TrainConfig, ranks: Ranks) -> RunSetup:
    """Model config, batches and val cache of a cache (or streamed) run; the manifest read once."""
    try:
        path, val_path = cache_paths(tcfg)
        cache = Cache(path)
        cfg = encoder_as_cached(model_config(tcfg, cache.manifest), cache.manifest)
        if cfg.stage == 2 and not cache.has_split_tokens:
            raise no_split_tokens(tcfg, cache.manifest, path, cfg.encoder.split_block)
        cfg, notes = fit_small_data(tcfg, cfg, cache.num_images, ranks.world_size)
        check_fits(cache, cfg, allow_random_init=tcfg.allow_random_init)
        val = None
        if val_path is not None:
            val = check_fits(Cache(val_path), cfg, allow_random_init=tcfg.allow_random_init)
            if not val.has_masks:
                raise TrainError(f"val cache {val_path} holds no ground-truth masks (a train cache?), which the "
                                 f"evaluation after training needs: give a cache built with --split val")
        if tcfg.stream is not None:
            data = open_stream(tcfg, cache, cfg, ranks)
        else:
            data = CacheBatches(cache, cfg.optim.batch_size, seed=tcfg.seed, rank=ranks.rank,
                                world_size=ranks.world_size, drop_last=tcfg.drop_last, split_tokens=cfg.stage == 2)
    except CacheError as e:
        raise TrainError(str(e)) from None
    info = {"train_cache": str(path), "train_manifest_sha256": file_sha256(path / "manifest.json"),
            "weights": cache.manifest["weights"], "random_init": bool(cache.manifest["random_init"]),
            "encoder": cache.manifest["encoder"], "train_samples": cache.num_images}
    if val is not None:
        info.update(val_cache=str(val.path), val_manifest_sha256=file_sha256(val.path / "manifest.json"))
    return RunSetup(cfg, data, info, tail=cache.tail_state() if cfg.stage == 2 else None, val_cache=val,
                    notes=notes)


def open_stream(tcfg: TrainConfig, cache: Cache, cfg: SPOTConfig, ranks: Ranks) -> StreamBatches:
    """Batches streamed from --stream's shard URLs, described by the local cache folder's manifest
    (and, for stage 2 on an 8-bit cache, its frozen tail: the targets come from the split tokens)."""
    from webdataset.shardlists import expand_urls
    manifest = cache.manifest
    urls = expand_urls(tcfg.stream)
    if manifest["format"] != "wds" or len(urls) != len(manifest["shards"]):
        raise TrainError(f"--stream gives {len(urls)} shard URLs for a {manifest['format']} cache of "
                         f"{len(manifest['shards'])} shards: stream the shards of a --format wds cache, all of "
                         f"them, in index order (shard-00000.tar, ...)")
    return StreamBatches(urls, manifest, cfg.optim.batch_size, seed=tcfg.seed, rank=ranks.rank,
                         world_size=ranks.world_size, split_tokens=cfg.stage == 2,
                         targets=stage2_targets(cache, cfg.stage == 2))


def open_image_data(tcfg: TrainConfig, ranks: Ranks) -> RunSetup:
    """Model config and batches of a run on images through the frozen encoder."""
    from spot_fast.cache.paths import encoder_description
    from spot_fast.data.base import DatasetError
    from spot_fast.data.sources import ReadableSource, open_source
    from spot_fast.encoders import FrozenEncoder, WeightsNotFound
    cfg = model_config(tcfg)
    random_init = tcfg.weights == "random-init"
    if random_init and not tcfg.allow_random_init:
        raise TrainError("--weights random-init trains on the features of an untrained ViT (tests only): "
                         "pass --allow-random-init to mean it")
    try:
        source = ReadableSource(open_source(tcfg.dataset, tcfg.images, "train", image_size=cfg.encoder.image_size))
        encoder = FrozenEncoder.create(cfg.encoder, weights=None if random_init else tcfg.weights,
                                       random_init=random_init)
    except (DatasetError, WeightsNotFound) as e:
        raise TrainError(str(e)) from None
    cfg, notes = fit_small_data(tcfg, cfg, len(source), ranks.world_size)
    split = cfg.encoder.split_block if cfg.stage == 2 else None
    data = ImageBatches(source, encoder, cfg.optim.batch_size, seed=tcfg.seed, rank=ranks.rank,
                        world_size=ranks.world_size, drop_last=tcfg.drop_last, split_block=split, device=ranks.device)
    info = {"images": str(Path(tcfg.images).resolve()), "dataset": tcfg.dataset, "weights": encoder.weights_id,
            "random_init": random_init, "encoder": encoder_description(cfg.encoder), "train_samples": len(source),
            "skipped_images": [{"path": str(s["path"]), "reason": s["reason"]} for s in source.skipped]}
    return RunSetup(cfg, data, info, tail=encoder.tail_state(split) if split is not None else None, notes=notes,
                    skipped=source.summary())


def resolve_run(tcfg: TrainConfig, ranks: Ranks) -> RunSetup:
    """The whole run before its first step (TrainError naming the input when something does not fit)."""
    tcfg.validate()
    setup = open_image_data(tcfg, ranks) if tcfg.images is not None else open_cache_data(tcfg, ranks)
    if tcfg.teacher is not None and setup.cfg.stage == 1:
        raise TrainError("--teacher is for stage 2 (self-training); stage 1 trains without one: drop --teacher "
                         "or pass --stage 2")
    if setup.cfg.stage == 2:
        setup.teacher, setup.teacher_id = load_teacher(tcfg.teacher, setup.cfg, ranks.device,
                                                       weights=setup.data_info["weights"])
    work = step_work(setup.cfg.encoder, setup.cfg.optim.batch_size)
    setup.precision = set_precision(ranks.device, tcfg.precision, work)
    setup.autocast_dtype = torch.bfloat16 if setup.precision == "bf16" else None
    setup.threads = configure_threads(getattr(tcfg, "threads", None), work=work)
    setup.threads_tuned = ranks.world_size == 1 and tunes(getattr(tcfg, "threads", None), work, ranks.device)
    return setup



def schedules(o, steps_per_epoch: int, samples: int, world_size: int) -> tuple[list[float], list[float]]:
    """The per-step lr and stage-2 CE weight of the run (`o`: its OptimConfig)."""
    warm = warmup_epochs(o.warmup_steps, samples, o.batch_size * world_size)
    if warm > o.epochs:
        raise TrainError(f"the lr warm-up ({warm} epochs = optim.warmup_steps {o.warmup_steps} / ({samples} "
                         f"images / batch)) is longer than training ({o.epochs} epochs): raise --epochs or "
                         f"--set optim.warmup_steps=...")
    final = o.ce_weight if o.final_ce_weight is None else o.final_ce_weight
    n = steps_per_epoch
    return cosine_schedule(o.lr, o.lr_min, o.epochs, n, warm), cosine_schedule(o.ce_weight, final, o.epochs, n)


def nan_cause(o, step: int) -> str:
    """What to change when the loss went NaN/inf (`o`: the OptimConfig): a value that cannot
    train, else the lr or the data."""
    if not (math.isfinite(o.clip) and o.clip > 0):
        return f"optim.clip = {o.clip} is not a positive number: --set optim.clip=0.3 (the presets' value)"
    for name in ("ce_weight", "final_ce_weight"):
        v = getattr(o, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            return f"optim.{name} = {v} is not a finite number >= 0: --set optim.{name}=0.005 (the presets' value)"
    return f"lower --lr (now {o.lr:g}), or check the data the run reads around step {step}"


def intro(setup: RunSetup, steps_per_epoch: int, world_size: int, device) -> str:
    """The line a run starts with: data, schedule, batch, device, what was fitted or left out."""
    dropped, o = getattr(setup.data, "dropped", 0), setup.cfg.optim
    what = "DINOSAUR (the MLP-decoder baseline)" if setup.cfg.decoder.kind == "mlp" else f"SPOT stage {setup.cfg.stage}"
    return (f"training {what}: {setup.data_info['train_samples']} images, {steps_per_epoch} "
            f"steps/epoch x {o.epochs} epochs, batch {o.batch_size} x {world_size} rank(s), device {device}, "
            f"{setup.precision}" + (f", {setup.threads} thread{'s' * (setup.threads != 1)}"
                                    + (" (tuned to the step time)" if setup.threads_tuned else "")
                                    if device.type == "cpu" else "")
            + (f"; fitted to the small dataset: {', '.join(setup.notes)}" if setup.notes else "")
            + (f"; {dropped} image(s) per epoch left out (a short last batch under --drop-last, "
               f"or to keep the ranks' steps equal)" if dropped else "")
            + (f"; {setup.skipped} (listed in config.json's data.skipped_images)" if setup.skipped else ""))
