"""The sweep's summary: every variant's metrics side by side (Markdown and CSV, the best marked)
and one picture comparing the variants' masks on the same validation images.

Metric columns are flat names: `decoder.mbo_i`, `slot_attention.fg_ari`, ... (higher is better),
`train.*` (the last logged training losses) and `val.loss` (the last validation MSE), lower is
better. The overall best variant is the one with the best `rank_by` column.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spot_fast.evaluate import PALETTE
from spot_fast.io import write_atomic


@dataclass
class VariantResult:
    name: str                                                 # the variant (its run folder's name)
    overrides: dict[str, str] = field(default_factory=dict)  # what it changes from the base config
    metrics: dict[str, float] = field(default_factory=dict)  # flat metric name -> value


def lower_is_better(column: str) -> bool:
    return column.startswith(("train.", "val."))


def flatten_metrics(evaluation: dict[str, dict[str, float]]) -> dict[str, float]:
    """evaluate()'s {"decoder": {...}, "slot_attention": {...}} -> {"decoder.mbo_i": ...}."""
    return {f"{group}.{name}": float(v) for group, values in evaluation.items() for name, v in values.items()}


def _best_index(values: list[float], column: str) -> int | None:
    finite = [(v, i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return (min(finite) if lower_is_better(column) else max(finite))[1]


@dataclass
class Summary:
    keys: list[str]             # the override keys that differ between variants
    columns: list[str]          # metric columns, in order
    rows: list[VariantResult]
    best: dict[str, int]        # column -> index of the best row
    rank_by: str

    @property
    def best_variant(self) -> str | None:
        i = self.best.get(self.rank_by)
        return None if i is None else self.rows[i].name


def summarize(results: list[VariantResult], rank_by: str = "decoder.mbo_i") -> Summary:
    keys = list(dict.fromkeys(k for r in results for k in r.overrides))      # first-seen order: the grid's
    keys = [k for k in keys if len({r.overrides.get(k) for r in results}) > 1]
    columns = sorted({c for r in results for c in r.metrics}, key=lambda c: (lower_is_better(c), c))
    if rank_by not in columns and columns:
        raise ValueError(f"rank_by {rank_by!r} is not a metric of this sweep: choose one of {columns}")
    best = {}
    for c in columns:
        i = _best_index([r.metrics.get(c) for r in results], c)
        if i is not None:
            best[c] = i
    return Summary(keys, columns, list(results), best, rank_by)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def to_markdown(s: Summary) -> str:
    """A table: variant, the varied keys, the metrics; best per column in bold, best variant named."""
    head = ["variant", *(k.rsplit(".", 1)[-1] for k in s.keys), *s.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best_row = s.best.get(s.rank_by)
    for i, r in enumerate(s.rows):
        name = f"**{r.name}** (best)" if i == best_row else r.name
        cells = [name, *(r.overrides.get(k, "") for k in s.keys)]
        for c in s.columns:
            text = _fmt(r.metrics.get(c))
            cells.append(f"**{text}**" if s.best.get(c) == i else text)
        lines.append("| " + " | ".join(cells) + " |")
    arrow = "lower" if lower_is_better(s.rank_by) else "higher"
    lines.append(f"\nBest variant by {s.rank_by} ({arrow} is better): {s.best_variant}. "
                 "Bold: the best value of each column.")
    return "\n".join(lines) + "\n"


def to_csv(s: Summary) -> str:
    """The same table as CSV, full precision, with a `best` column (1 on the best variant)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", *s.keys, *s.columns, "best"])
    best_row = s.best.get(s.rank_by)
    for i, r in enumerate(s.rows):
        w.writerow([r.name, *(r.overrides.get(k, "") for k in s.keys),
                    *(repr(r.metrics[c]) if c in r.metrics else "" for c in s.columns), int(i == best_row)])
    return buf.getvalue()


def write_summary(results: list[VariantResult], out: Path, rank_by: str = "decoder.mbo_i") -> Summary:
    """summary.md and summary.csv in `out`."""
    s = summarize(results, rank_by)
    out.mkdir(parents=True, exist_ok=True)
    markdown, rows = to_markdown(s), to_csv(s)
    write_atomic(out / "summary.md", lambda f: f.write(markdown), mode="w")
    write_atomic(out / "summary.csv", lambda f: f.write(rows), mode="w")
    return s


def _paint(labels: torch.Tensor, size: int) -> np.ndarray:
    """A label map (H, W) -> (size, size, 3) palette colours (nearest resize)."""
    from PIL import Image
    lab = Image.fromarray(labels.numpy().astype(np.uint8)).resize((size, size), Image.NEAREST)
    return PALETTE[np.asarray(lab) % len(PALETTE)]


def _label(text: str, height: int, width: int) -> np.ndarray:
    """A white strip with `text` on it (PIL's default font), for the left of a row."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((2, max(height // 2 - 6, 0)), text, fill="black")
    return np.asarray(img)


def draw_rows(jpegs: list[bytes], truth: torch.Tensor, labels: dict[str, torch.Tensor], path: Path) -> None:
    """Columns are images; rows: the image, each entry of `labels` ((B, H, W) label maps) over it,
    the ground-truth instances. Each row is named on its left. One variant: one entry; the
    sweep's comparison: one entry per variant."""
    from PIL import Image
    rgbs = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    size = rgbs[0].shape[0]
    rows = {"image": rgbs}
    for name, lab in labels.items():
        rows[name] = [(0.45 * rgb + 0.55 * _paint(m, size)).astype(np.uint8) for rgb, m in zip(rgbs, lab)]
    rows["ground truth"] = [_paint(m, size) for m in truth]
    width = 6 * max(len(n) for n in rows) + 6
    bands = [np.concatenate([_label(n, size, width), *tiles], axis=1) for n, tiles in rows.items()]
    grid = Image.fromarray(np.concatenate(bands, axis=0))
    write_atomic(path, lambda f: grid.save(f, format="PNG"))


# ----------------------------------------------------------------------------- from run folders

def _last_records(log: Path) -> dict[str, dict]:
    """The last record of each kind in a run's log.jsonl."""
    last: dict[str, dict] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                last[rec["kind"]] = rec
    return last


def run_result(name: str, run: Path, overrides: dict[str, str]) -> VariantResult:
    """A variant's row from its run folder: eval/metrics.json and the last train/val log records."""
    metrics = {}
    last = _last_records(run / "log.jsonl")
    for key in ("loss", "mse", "ce"):
        if key in last.get("train", {}):
            metrics[f"train.{key}"] = float(last["train"][key])
    if "val" in last:
        metrics["val.loss"] = float(last["val"]["loss"])
    file = run / "eval" / "metrics.json"
    if file.is_file():
        result = json.loads(file.read_text())
        metrics.update(flatten_metrics({k: result[k] for k in ("decoder", "slot_attention")}))
    return VariantResult(name, dict(overrides), metrics)


def comparison_picture(runs: list[tuple[str, Path]], val_cache, path: Path, n: int = 8) -> bool:
    """masks.png: the first `n` val images, each variant's decoder masks (its eval/labels.npz)
    and the ground truth. False (nothing drawn) when a variant has no evaluation."""
    files = [run / "eval" / "labels.npz" for _, run in runs]
    if val_cache is None or not all(f.is_file() for f in files):
        return False
    batch = next(iter(val_cache.eval_reader(n)))
    labels = {name: torch.from_numpy(np.load(f)["decoder"][:n].astype(np.int64)) for (name, _), f in zip(runs, files)}
    draw_rows(batch["jpeg"], batch["instance_mask"], labels, path)
    return True


def write_sweep_summary(out: Path, trainers: list[tuple[str, object]], rank_by: str = "decoder.mbo_i") -> Summary:
    """summary.md, summary.csv and masks.png of a finished sweep, from its variants' run folders."""
    results = [run_result(name, t.run, t.tcfg.overrides) for name, t in trainers]
    if not any(rank_by in r.metrics for r in results):        # no val data: rank by the training loss
        rank_by = "train.loss"
    summary = write_summary(results, out, rank_by)
    comparison_picture([(name, t.run) for name, t in trainers], trainers[0][1].val_cache, out / "masks.png")
    return summary
