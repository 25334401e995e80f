"""`spot-fast eval`: its numbers are the metric functions applied to the label maps it saves, and
those label maps are the model's masks on the val cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from spot_fast.cache import open_cache
from spot_fast.metrics import MetricAccumulator, masks_to_labels
from spot_fast.train import load_run
from train_case import IMAGE_SIZE, MASK_SIZE, NUM_VAL, tiny_caches, tiny_stage1_run

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args):
    from spot_fast.cli.app import app
    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_metrics_equal_the_metric_functions_on_its_saved_label_maps(tmp_path):
    run, caches = tiny_stage1_run(), tiny_caches()
    res = cli("eval", run, "--cache", caches.both, "--orders", "standard", "--out", tmp_path, "--batch-size", 4,
              "--num-pictures", 3, "--allow-random-init", "--device", "cpu")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    saved = np.load(tmp_path / "labels.npz")
    val = open_cache(caches.both / "val", allow_random_init=True)
    truth = next(iter(val.eval_reader(NUM_VAL)))                    # every val image, in order
    assert saved["index"].tolist() == truth["index"].tolist()
    model, cfg = load_run(run)
    # evaluate's slot noise: a generator seeded with 0, drawn batch by batch (4 images, then 2)
    g, K, S = torch.Generator().manual_seed(0), cfg.slot_attention.num_slots, cfg.slot_attention.slot_size
    noise = torch.cat([torch.randn(b, K, S, generator=g) for b in (4, NUM_VAL - 4)])
    with torch.no_grad():
        out = model(truth["features"], orders="standard", noise=noise)
    for kind, masks in (("decoder", out.dec_masks), ("slot_attention", out.sa_masks)):
        labels = torch.from_numpy(saved[kind]).long()
        assert labels.shape == (NUM_VAL, MASK_SIZE, MASK_SIZE)
        assert torch.equal(labels, masks_to_labels(masks, MASK_SIZE))
        acc = MetricAccumulator()
        acc.update(labels, truth["instance_mask"], truth["class_mask"], truth["ignore_mask"])
        assert metrics[kind] == acc.compute()
    grid = Image.open(tmp_path / "masks.png")
    assert grid.size == (4 * IMAGE_SIZE, 3 * IMAGE_SIZE)


def test_eval_refuses_an_unknown_order_mode(tmp_path):
    res = cli("eval", tiny_stage1_run(), "--cache", tiny_caches().both, "--orders", "every")
    assert res.exit_code == 2 and "--orders must be one of" in res.output and "Traceback" not in res.output
