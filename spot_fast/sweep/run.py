"""The sweep driver: every variant of a grid trained in ONE pass over the cache.

    sweep(SweepConfig(train=TrainConfig(cache="runs/cache", preset="coco", out="runs/sweep"),
                      grid=["slot_attention.num_slots=5,6,7", "slot_attention.truncate=none,bi-level"]))

One `Trainer` per variant (its own model, optimiser, schedules and run folder `OUT/<variant>`,
exactly what `spot-fast train` writes), one reader: each batch is read and moved to the device
once and every variant takes its optimiser step on it. Per-step randomness is the trainer's
`StepRandomness` (a function of seed and step), so a variant trained in the sweep computes what it
computes alone. Variants of one architecture run as one stacked model with `stack=True`
(`stacked.py`); the others run one after another. Stage 2: one frozen teacher forward per step
serves every variant that shares the teacher.

Resume: each variant resumes from its own newest checkpoint; the shared stream restarts at the
earliest of them and a variant that is ahead waits for the stream to reach it. At the end:
`summary.md`, `summary.csv` and `masks.png` in OUT (`report.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from spot_fast.cache import Cache, CacheError, device_batches
from spot_fast.config import SPOTConfig
from spot_fast.evaluate import MASK_KINDS
from spot_fast.io import write_json_atomic
from spot_fast.metrics import METRIC_NAMES
from spot_fast.precision import resolve_precision
from spot_fast.runs import step_checkpoints
from spot_fast.sweep.grid import GridError, Variant, expand, resolve_variants
from spot_fast.sweep.memory import GIB, HEADROOM, check_fits, free_bytes, how_many_fit, sweep_bytes, variant_memory
from spot_fast.sweep.report import write_sweep_summary
from spot_fast.sweep.stacked import StackedSPOT, stack_key
from spot_fast.sweep.variant import SharedTeacher, VariantRun, stacked_train_step
from spot_fast.threads import step_work
from spot_fast.train import ddp
from spot_fast.train.config import RESUME_FREE, TrainConfig, TrainError, config_diff, model_config
from spot_fast.train.loop import Trainer
from spot_fast.train.folder import train_command
from spot_fast.train.setup import cache_paths

SWEEP_FILE = "sweep.json"
RANK_COLUMNS = (*(f"{kind}.{m}" for kind in MASK_KINDS for m in METRIC_NAMES), "train.loss", "train.mse",
                "train.ce", "val.loss")


@dataclass
class SweepConfig:
    train: TrainConfig                   # what every variant shares; train.out is the sweep folder,
                                         # train.overrides apply to every variant before its own
    grid: list[str] = field(default_factory=list)   # "key=v1,v2,..." axes of the product
    variants_file: str | None = None     # TOML with [variants.NAME] tables (times the grid)
    teachers: str | None = None          # stage 2: a stage-1 sweep folder; variant v's teacher is teachers/v
    stack: bool = False                  # run same-architecture variants as one vmapped model
    rank_by: str = "decoder.mbo_i"       # the summary's best variant: this column's best value
    check_memory: bool = True            # refuse a sweep whose estimate does not fit before starting

    def validate(self) -> None:
        t = self.train
        if t.images is not None or t.stream is not None:
            raise TrainError("a sweep trains from a local feature cache: give --cache (or --train-cache), "
                             "not --images or --stream")
        if t.stage == 2 and (t.teacher is None) == (self.teachers is None):
            raise TrainError("stage 2 needs exactly one of --teacher (shared) or --teachers (a stage-1 sweep folder)")
        if self.stack and t.compile:
            raise TrainError("--stack and --compile cannot be combined: the stacked model is not compiled")
        dataclasses.replace(t, teacher=t.teacher or self.teachers).validate()   # the shared options
        if self.rank_by not in RANK_COLUMNS:
            raise TrainError(f"--rank-by {self.rank_by!r}: choose one of {', '.join(RANK_COLUMNS)}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainError("spot-fast sweep runs in one process: start it without torchrun")


def variant_configs(scfg: SweepConfig) -> list[tuple[Variant, TrainConfig, SPOTConfig]]:
    """Every variant with its own TrainConfig (out = OUT/name) and resolved model config."""
    t = scfg.train
    variants = expand(scfg.grid, scfg.variants_file)
    if t.lr is not None and any("optim.lr" in v.overrides for v in variants):
        raise GridError("--lr fixes every variant's optim.lr: drop --lr to vary optim.lr")
    try:
        manifest = Cache(cache_paths(t)[0]).manifest          # --cache: resolve_cache's one rule, as train
    except CacheError as e:
        raise TrainError(str(e)) from None
    base = model_config(t, manifest)
    out = []
    for v, cfg in resolve_variants(base, variants):
        teacher = str(Path(scfg.teachers) / v.name) if scfg.teachers else t.teacher
        if scfg.teachers and not Path(teacher).exists():
            raise TrainError(f"--teachers {scfg.teachers}: no run {v.name!r} in it for the variant of that name; "
                             f"give the stage-1 sweep of the same grid, or one shared --teacher")
        tcfg = dataclasses.replace(t, out=str(Path(t.out) / v.name), overrides={**t.overrides, **v.overrides},
                                   teacher=teacher, progress=False)   # one line per epoch instead of M bars
        out.append((v, tcfg, cfg))
    return out


def memory_args(scfg: SweepConfig, planned: list[tuple[Variant, TrainConfig, SPOTConfig]], device) -> dict:
    """The memory model's view of a sweep: groups that hold activations at once, precision, teacher.
    Measures every variant's model once (TrainError naming a variant whose model cannot be built)."""
    first = planned[0][2]
    bf16 = resolve_precision(scfg.train.precision, device, step_work(first.encoder, first.optim.batch_size)) == "bf16"
    groups: dict[str, list[SPOTConfig]] = {}
    for i, (v, _, c) in enumerate(planned):
        try:
            variant_memory(c, "bf16" if bf16 else "fp32")
        except ValueError as e:
            raise TrainError(f"variant {v.name}: its model cannot be built: {e}") from None
        groups.setdefault(stack_key(c) if scfg.stack else str(i), []).append(c)
    teachers = {t.teacher: dataclasses.replace(c, stage=1) for _, t, c in planned if c.stage == 2}
    return dict(groups=list(groups.values()), batch_size=planned[0][2].optim.batch_size,
                precision="bf16" if bf16 else "fp32", stacked=scfg.stack, teachers=tuple(teachers.values()))


def plan(scfg: SweepConfig) -> str:
    """What the sweep would train, how it groups the variants and whether it fits (`--plan`)."""
    scfg.validate()
    planned = variant_configs(scfg)
    device = ddp.setup(scfg.train.device).device
    args = memory_args(scfg, planned, device)
    lines = [f"{len(planned)} variants in {len(args['groups'])} "
             f"{'stacked groups' if scfg.stack else 'steps per batch (one after another)'}:"]
    for v, tcfg, cfg in planned:
        m = variant_memory(cfg, args["precision"])
        lines.append(f"  {v.name}: {m.params:,} parameters, {_size(m.state_bytes)} weights+grads+Adam, "
                     f"{_size(m.activations(args['batch_size']))} activations at batch {args['batch_size']}"
                     f"  ->  {tcfg.out}")
    need, free = sweep_bytes(**args), free_bytes(device)
    fit = how_many_fit(free=free, **args)
    lines.append(f"estimated peak {_size(need * HEADROOM)} (x{HEADROOM} headroom) of {_size(free)} free "
                 f"on {device}: {fit} of {len(planned)} variants fit")
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _groups(runs: list[VariantRun], stack: bool) -> list[list[VariantRun]]:
    """Runs that step together: same-architecture groups when stacking, else one run each."""
    if not stack:
        return [[r] for r in runs]
    groups: dict[str, list[VariantRun]] = {}
    for r in runs:
        groups.setdefault(stack_key(r.trainer.cfg), []).append(r)
    return list(groups.values())


class Sweep:
    def __init__(self, scfg: SweepConfig):
        scfg.validate()
        self.scfg, self.out = scfg, Path(scfg.train.out)
        planned = variant_configs(scfg)
        ranks = ddp.setup(scfg.train.device)
        if scfg.check_memory:                     # before anything is written
            try:
                check_fits(device=ranks.device, **memory_args(scfg, planned, ranks.device))
            except MemoryError as e:
                raise TrainError(str(e)) from None
        manifest = self._check_manifest(planned)
        if scfg.train.resume:                     # a variant killed before its first checkpoint starts afresh
            planned = [(v, dataclasses.replace(t, resume=bool(step_checkpoints(Path(t.out)))), c)
                       for v, t, c in planned]
        self.teachers: dict[str, SharedTeacher] = {}
        self.runs = [self._variant_run(v, tcfg, ranks) for v, tcfg, _ in planned]
        if len({len(r.trainer.data) for r in self.runs}) != 1:      # cannot happen: the grid fixes the data
            raise TrainError("the variants do not read the same batches: report this as a bug")
        if not scfg.train.resume:                 # written once every variant could be set up
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / SWEEP_FILE, manifest)
        self.groups = _groups(self.runs, scfg.stack)
        self._stacked: dict[tuple[int, ...], StackedSPOT] = {}

    def _stack(self, runs: list[VariantRun]) -> StackedSPOT:
        """The stacked model of these runs (built once per set of runs)."""
        key = tuple(id(r) for r in runs)
        if key not in self._stacked:
            self._stacked[key] = StackedSPOT([r.trainer.model for r in runs])
        return self._stacked[key]

    def _variant_run(self, v: Variant, tcfg: TrainConfig, ranks) -> VariantRun:
        trainer = Trainer(tcfg, ranks)
        if trainer.teacher is not None:        # one frozen teacher (and one forward per step) per teacher checkpoint
            shared = self.teachers.setdefault(trainer.setup.teacher_id, SharedTeacher(trainer.teacher))
            trainer.teacher = shared
        return VariantRun(v.name, trainer)

    # ------------------------------------------------------------------ sweep.json

    def _manifest(self, planned) -> dict:
        train = {k: v for k, v in self.scfg.train.to_dict().items() if k not in RESUME_FREE}
        return {"train": train, "grid": self.scfg.grid, "variants_file": self.scfg.variants_file,
                "teachers": self.scfg.teachers, "stack": self.scfg.stack,
                "variants": [{"name": v.name, "overrides": v.overrides, "command": train_command(t)}
                             for v, t, _ in planned]}

    def _check_manifest(self, planned) -> dict:
        """sweep.json's content; a --resume must find the file unchanged, a fresh start absent."""
        file, new = self.out / SWEEP_FILE, self._manifest(planned)
        if file.is_file() and not self.scfg.train.resume:
            raise TrainError(f"{self.out} already holds a sweep: pass --resume to continue it, or choose "
                             f"another --out")
        if not file.is_file() and self.scfg.train.resume:
            raise TrainError(f"--resume: {file} is missing, so there is no sweep to resume in {self.out}")
        if self.scfg.train.resume:
            old = json.loads(file.read_text())
            diff = config_diff(_without_commands(old), _without_commands(new))
            if diff:
                raise TrainError(f"--resume with a changed sweep: {', '.join(diff)} differ from {file}; resume "
                                 f"with the sweep's own settings, or start a new sweep with another --out")
        return new

    # ------------------------------------------------------------------ the one pass

    def run(self) -> Path:
        first = self.runs[0].trainer
        for r in self.runs:
            r.begin()
        try:
            self._train(first)
            for r in self.runs:
                r.finish()
        finally:
            for r in self.runs:
                r.close()
        summary = write_sweep_summary(self.out, [(r.name, r.trainer) for r in self.runs], self.scfg.rank_by)
        print(f"sweep finished: {self.out / 'summary.md'} (best: {summary.best_variant})", flush=True)
        return self.out

    def _train(self, first: Trainer) -> None:
        """Read each batch once, move it once, step every variant whose position it is."""
        spe, total = first.steps_per_epoch, max(r.trainer.total_steps for r in self.runs)
        step = min(r.trainer.state.step for r in self.runs)
        # one tuner for the whole sweep step: the variants share the process's threads
        tuner = first.thread_tuner(say=lambda m: print(f"sweep {m}", flush=True))
        t0 = time.perf_counter()
        while step < total:
            epoch, start = divmod(step, spe)
            batches = device_batches(first.data.epoch(epoch, start), first.device)
            for _ in range(start, min(spe, total - epoch * spe)):
                t1 = time.perf_counter()
                batch = next(batches)
                t2 = time.perf_counter()
                self._step(step, batch, t2 - t1)
                if tuner is not None:
                    tuner.observe(time.perf_counter() - t2)
                step += 1
            print(f"sweep step {step}/{total} (epoch {epoch + 1}): {len(self.runs)} variants, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)

    def _step(self, step: int, batch: dict, wait: float) -> None:
        """Every variant whose position is `step` trains on the batch (ahead ones after a resume wait)."""
        for teacher in self.teachers.values():
            teacher.new_step()
        for group in self.groups:
            active = [r for r in group if r.trainer.state.step == step and not r.trainer.done]
            if len(active) > 1:
                trainers = [r.trainer for r in active]
                for t, out in zip(trainers, stacked_train_step(trainers, self._stack(active), batch)):
                    t.record(out, batch, wait)
            else:
                for r in active:
                    r.trainer.step(batch, wait)


def _without_commands(manifest: dict) -> dict:
    """A sweep.json without the per-variant commands (they spell out resume-free options too)."""
    variants = [{k: x for k, x in v.items() if k != "command"} for v in manifest["variants"]]
    return {**manifest, "variants": variants}


def sweep(scfg: SweepConfig) -> Path:
    """Train every variant to the end in one pass; returns the sweep folder."""
    return Sweep(scfg).run()
