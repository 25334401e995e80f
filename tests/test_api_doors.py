"""The Python API at its doors: SPOT.forward, Predictor and Trainer refuse what they cannot use
with one line naming the argument and the fix (a UserError), never an error from deep inside."""
from __future__ import annotations

import pytest
import torch

from spot_fast.config import preset
from spot_fast.errors import UserError
from spot_fast.model import SPOT
from spot_fast.predict import Predictor
from spot_fast.train import Trainer, TrainError
from train_case import IMAGE_SIZE, tiny_config, tiny_stage1_run

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = preset("tiny")
N, D = CFG.grid_size ** 2, CFG.feature_dim


@pytest.fixture(scope="module")
def model():
    return SPOT(CFG).eval()


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_run(tiny_stage1_run(), device="cpu")


def one_line(err) -> str:
    text = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in text, text
    return text


@pytest.mark.parametrize("inputs, says", [
    (torch.zeros(2, N, D, dtype=torch.long), "dtype torch.int64, the model computes in torch.float32"),
    (torch.zeros(2, N, D, dtype=torch.float64), "dtype torch.float64, the model computes in torch.float32"),
    (torch.zeros(2, N, D, dtype=torch.float16), "fp16 runs on CUDA only"),
    (torch.zeros(2, N, D, device="meta"), "inputs on meta, the model on cpu"),
    (torch.zeros(0, N, D), "batch of 0"),
])
def test_forward_refuses_inputs_it_cannot_compute_with(model, inputs, says):
    with pytest.raises(ValueError) as err:
        model(inputs)
    assert says in one_line(err)


def test_forward_refuses_a_target_of_another_dtype(model):
    with pytest.raises(ValueError) as err:
        model(torch.zeros(2, N, D), target=torch.zeros(2, N, D, dtype=torch.float64))
    assert "target of dtype torch.float64" in one_line(err)


@pytest.mark.parametrize("images, says", [
    (torch.zeros(2, 3, IMAGE_SIZE + 8, IMAGE_SIZE), f"(B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) batch"),
    (torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE), "got (2, 1, 32, 32)"),
    (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), "float tensor (ImageNet-normalised) expected"),
    (torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE), "B >= 1"),
    ([], "an empty list"),
])
def test_predictor_refuses_images_it_cannot_use(predictor, images, says):
    with pytest.raises(ValueError) as err:
        predictor(images)
    assert says in one_line(err)


def test_predictor_takes_any_float_dtype(predictor):
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    a, b = predictor(x), predictor(x.double())
    assert torch.equal(a.slots, b.slots)


@pytest.mark.parametrize("kw, says", [(dict(size=0), "size must be an int >= 1"),
                                      (dict(size=16, kind="bogus"), "kind must be one of 'decoder', 'slot_attention'")])
def test_labels_refuse_a_size_or_kind_that_does_not_exist(predictor, kw, says):
    prediction = predictor(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert prediction.labels(16, kind="slot_attention").shape == (1, 16, 16)
    with pytest.raises(ValueError) as err:
        prediction.labels(**kw)
    assert says in one_line(err)


def test_trainer_step_before_begin_says_to_begin(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "r"))
    batch = {"features": torch.zeros(4, N, D)}
    with pytest.raises(TrainError) as err:
        trainer.step(batch)
    assert "call trainer.begin() first" in one_line(err)
    for call in (lambda: trainer.record({"loss": torch.zeros(())}, batch), trainer.finish):
        with pytest.raises(TrainError, match="before Trainer.begin"):
            call()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device, says", [("foo", "is not a device: use cpu, cuda or cuda:N"),
                                          ("cuda", "no CUDA device"), ("cuda:7", "cuda:7")])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, device, says):
    from spot_fast.evaluate import evaluate_run
    from train_case import tiny_caches
    if torch.cuda.is_available() and device != "foo":
        pytest.skip("this machine has CUDA devices")
    for call in (lambda: evaluate_run(tiny_stage1_run(), tiny_caches().both / "val", device=device),
                 lambda: Predictor.from_run(tiny_stage1_run(), device=device),
                 lambda: Trainer(tiny_config(tmp_path / "r", device=device))):
        with pytest.raises(ValueError) as err:
            call()
        assert says in one_line(err)


def test_a_train_cache_is_refused_for_evaluation_before_training(tmp_path):
    from spot_fast.evaluate import evaluate_run
    from train_case import tiny_caches
    train_cache = str(tiny_caches().both / "train")
    with pytest.raises(TrainError, match="holds no ground-truth masks") as err:
        Trainer(tiny_config(tmp_path / "r", val_cache=train_cache))
    one_line(err)
    with pytest.raises(ValueError, match="holds no ground-truth masks") as err:
        evaluate_run(tiny_stage1_run(), train_cache, device="cpu")
    one_line(err)


def test_zero_epochs_is_refused_not_a_finished_run(tmp_path):
    with pytest.raises(TrainError) as err:
        Trainer(tiny_config(tmp_path / "r", epochs=None, overrides={"optim.epochs": "0"}))
    assert "epochs" in one_line(err) and not (tmp_path / "r").exists()
