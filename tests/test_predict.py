"""`spot_fast.predict`: slots and masks for image files, PIL images and tensors, the encoder run on
the fly, from a spot-fast run or from a reference-format checkpoint with its own encoder."""
from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from spot_fast.cache import open_cache
from spot_fast.checkpoint import export_reference
from spot_fast.data.sources import open_source
from spot_fast.encoders import FrozenEncoder
from spot_fast.predict import Predictor
from spot_fast.train import load_run
from train_case import IMAGE_SIZE, tiny_caches, tiny_stage1_run

pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_predictions_for_paths_pil_and_tensors_match_the_model_on_cached_features():
    caches, run = tiny_caches(), tiny_stage1_run()
    source = open_source("synthetic", caches.root, "val", image_size=IMAGE_SIZE, mask_size=16)
    paths = [source.image_path(i) for i in range(3)]
    predictor = Predictor.from_run(run, weights="random-init", device="cpu")
    from_paths = predictor(paths)
    from_pil = predictor([Image.open(p) for p in paths])
    from_tensors = predictor(torch.stack([source.val_sample(i).image for i in range(3)]))
    assert from_paths.slot_masks.shape == (3, 3, 4, 4) and from_paths.slots.shape == (3, 3, 16)
    for p in (from_pil, from_tensors):
        assert torch.equal(p.decoder_masks, from_paths.decoder_masks) and torch.equal(p.slots, from_paths.slots)

    # the same images' tokens from the fp32 cache through the model, with the predictor's noise
    model, cfg = load_run(run)
    features = next(iter(open_cache(caches.both / "val", allow_random_init=True).eval_reader(3)))["features"]
    noise = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(features, orders="all", noise=noise)
    assert close(from_paths.decoder_masks, out.dec_masks) and close(from_paths.slot_masks, out.sa_masks)
    assert from_paths.labels(16).shape == (3, 16, 16)


def test_a_reference_checkpoint_predicts_with_the_encoder_it_carries(tmp_path):
    run = tiny_stage1_run()
    model, cfg = load_run(run)
    encoder = FrozenEncoder.create(cfg.encoder, random_init=True, seed=0)
    ckpt = export_reference(model, frozen_encoder=encoder.vit.state_dict())
    ckpt["args"] = argparse.Namespace(lr=4e-4, num_slots=3)       # reference runs save their options
    torch.save(ckpt, tmp_path / "reference.pth")
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    ours = Predictor.from_run(run, weights="random-init", device="cpu")(images)
    theirs = Predictor.from_reference(tmp_path / "reference.pth", cfg, device="cpu")(images)
    assert torch.equal(ours.decoder_masks, theirs.decoder_masks) and torch.equal(ours.slots, theirs.slots)


def test_a_wrong_input_is_one_message():
    predictor = Predictor.from_run(tiny_stage1_run(), weights="random-init", device="cpu")
    with pytest.raises(ValueError, match=r"neither a path, a PIL image nor a \(3, 32, 32\) tensor: got Tensor \(3, 40, 40\)"):
        predictor([torch.zeros(3, 40, 40)])
