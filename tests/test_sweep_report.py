"""The sweep's summary table (Markdown and CSV, best marked) and its mask picture."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from spot_fast.sweep.report import VariantResult, draw_rows, flatten_metrics, summarize, to_markdown, write_summary


def _results():
    def ev(mbo, ari):
        return flatten_metrics({"decoder": {"mbo_i": mbo, "fg_ari": ari}, "slot_attention": {"mbo_i": mbo - 5}})
    return [
        VariantResult("num_slots=5", {"slot_attention.num_slots": "5", "decoder.eval_orders": "all"},
                      {**ev(30.0, math.nan), "train.loss": 0.50}),
        VariantResult("num_slots=6", {"slot_attention.num_slots": "6", "decoder.eval_orders": "all"},
                      {**ev(34.9, 20.0), "train.loss": 0.40}),
        VariantResult("num_slots=7", {"slot_attention.num_slots": "7", "decoder.eval_orders": "all"},
                      {**ev(33.0, 25.0), "train.loss": 0.45}),
    ]


def test_summary_marks_the_best_per_column_and_overall(tmp_path):
    s = write_summary(_results(), tmp_path)
    assert s.keys == ["slot_attention.num_slots"]                      # the constant key is not a column
    assert s.columns == ["decoder.fg_ari", "decoder.mbo_i", "slot_attention.mbo_i", "train.loss"]
    assert s.best == {"decoder.fg_ari": 2, "decoder.mbo_i": 1, "slot_attention.mbo_i": 1, "train.loss": 1}
    assert s.best_variant == "num_slots=6"
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| variant | num_slots | decoder.fg_ari | decoder.mbo_i | slot_attention.mbo_i | train.loss |"
    assert md[2] == "| num_slots=5 | 5 | nan | 30.00 | 25.00 | 0.50 |"
    assert md[3] == "| **num_slots=6** (best) | 6 | 20.00 | **34.90** | **29.90** | **0.40** |"
    assert md[4] == "| num_slots=7 | 7 | **25.00** | 33.00 | 28.00 | 0.45 |"
    assert "Best variant by decoder.mbo_i (higher is better): num_slots=6" in md[-1]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert [r["best"] for r in rows] == ["0", "1", "0"]
    assert float(rows[1]["decoder.mbo_i"]) == 34.9
    assert rows[2]["slot_attention.num_slots"] == "7" and math.isnan(float(rows[0]["decoder.fg_ari"]))


def test_rank_by_a_loss_picks_the_lowest_and_unknown_column_is_refused():
    s = summarize(_results(), rank_by="train.loss")
    assert s.best_variant == "num_slots=6" and "(lower is better)" in to_markdown(s)
    with pytest.raises(ValueError, match="rank_by 'decoder.miou' is not a metric of this sweep"):
        summarize(_results(), rank_by="decoder.miou")


def test_mask_picture_has_a_row_per_variant(tmp_path):
    jpegs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    truth = torch.randint(0, 4, (3, 16, 16))
    labels = {"num_slots=5": torch.randint(0, 5, (3, 16, 16)), "num_slots=7": torch.randint(0, 7, (3, 16, 16))}
    draw_rows(jpegs, truth, labels, tmp_path / "masks.png")
    img = np.asarray(Image.open(tmp_path / "masks.png"))
    assert img.shape[0] == 4 * 24                      # image, two variants, ground truth
    assert img.shape[1] > 3 * 24                       # the three images plus the name strip
