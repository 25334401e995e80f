"""`--images`: the frozen encoder on the fly with the reference's transforms gives the same batches
and losses as an fp32 cache of the same images (same sampler, same model, same seed)."""
from __future__ import annotations

import pytest

from spot_fast.train import TrainError, Trainer, train
from train_case import tiny_caches, tiny_config, tiny_stage1_run, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("stage", [1, 2])
def test_images_path_equals_the_fp32_cache(tmp_path, stage):
    caches = tiny_caches()
    kw = dict(stage=stage, epochs=1, max_steps=3)
    if stage == 2:
        kw["teacher"] = str(tiny_stage1_run())
    from_cache = train(tiny_config(tmp_path / "cache", **kw))
    from_images = train(tiny_config(tmp_path / "images", cache=None, images=str(caches.root), dataset="synthetic",
                                    weights="random-init", **kw))
    a, b = train_losses(from_cache), train_losses(from_images)
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


def test_images_path_refuses_a_random_encoder_unless_asked(tmp_path):
    with pytest.raises(TrainError, match="--allow-random-init"):
        Trainer(tiny_config(tmp_path / "r", cache=None, images=str(tiny_caches().root), dataset="synthetic",
                            weights="random-init", allow_random_init=False))
