"""Bad input to the Python API (issue 10): weights files, SPOT.forward's inputs, load_reference's
checkpoint. Each is one ValueError-class message naming what was given and what was expected."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from error_checks import assert_user_error, cli  # noqa: E402

from spot_fast.checkpoint import CheckpointMismatch, export_reference, load_reference  # noqa: E402
from spot_fast.config import preset  # noqa: E402
from spot_fast.encoders import FrozenEncoder, WeightsError, build_vit  # noqa: E402
from spot_fast.model import SPOT  # noqa: E402

CFG = preset("tiny").encoder      # custom ViT: width 32, 4 blocks, patch 8, 32 px


def vit_state(**changes) -> dict[str, torch.Tensor]:
    return build_vit(dataclasses.replace(CFG, **changes)).state_dict()


# ------------------------------------------------------------------- weights files

def _write(path: Path, kind: str) -> Path:
    if kind == "random bytes":
        path.write_bytes(os.urandom(2048))
    elif kind == "text named .safetensors":
        path.write_text("these are not weights\n")
    elif kind == "dict of non-tensors":
        torch.save({"lr": 0.1, "name": "x"}, path)
    elif kind == "a list":
        torch.save([torch.zeros(2)], path)
    elif kind == "pickled objects":
        torch.save({"args": argparse.Namespace(a=1), "model": vit_state()}, path)
    elif kind == "not a ViT":
        torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    return path


@pytest.mark.parametrize("kind, name, says", [
    ("random bytes", "w.pth", "not a torch.save file"),
    ("text named .safetensors", "w.safetensors", "not a readable .safetensors weights file"),
    ("dict of non-tensors", "w.pth", "not tensors"),
    ("a list", "w.pth", "holds a list"),
    ("pickled objects", "w.pth", "argparse.Namespace"),
    ("not a ViT", "w.pth", "is not a ViT"),
])
def test_unusable_weights_files_are_named_with_the_reason(tmp_path, kind, name, says):
    path = _write(tmp_path / name, kind)
    with pytest.raises(WeightsError) as err:
        FrozenEncoder.create(CFG, weights=path)
    message = str(err.value)
    assert str(path) in message and says in message and "\n" not in message, message


@pytest.mark.parametrize("changes, holds", [
    (dict(embed_dim=48, num_heads=2), "width 48, 4 blocks, patch 8"),
    (dict(depth=3), "width 32, 3 blocks, patch 8"),
    (dict(patch_size=16), "width 32, 4 blocks, patch 16"),     # timm would resample it silently
])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_of_another_architecture_say_expected_and_found(tmp_path, changes, holds, suffix):
    path = tmp_path / f"other{suffix}"
    state = {k: v.contiguous() for k, v in vit_state(**changes).items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        FrozenEncoder.create(CFG, weights=path)
    assert str(path) in str(err.value) and f"holds a ViT of {holds}" in str(err.value)
    assert "expected encoder custom (width 32, 4 blocks, patch 8)" in str(err.value)


def test_fitting_weights_still_load_in_every_wrapping(tmp_path):
    state = vit_state()
    for name, obj in [("bare.pth", state), ("dino.pth", {"teacher": {f"backbone.{k}": v for k, v in state.items()}}),
                      ("mae.pth", {"model": state})]:
        torch.save(obj, tmp_path / name)
        loaded = FrozenEncoder.create(CFG, weights=tmp_path / name).vit.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name


def test_cli_refuses_bad_weights_in_one_line_and_writes_nothing(tmp_path):
    from spot_fast.data.synthetic import SyntheticConfig, write_synthetic
    write_synthetic(tmp_path / "d", SyntheticConfig(num_train=2, num_val=2, image_size=32))
    path = tmp_path / "w.pth"
    torch.save(vit_state(depth=3), path)
    res = cli("cache", "synthetic", "--root", tmp_path / "d", "--split", "train", "--preset", "tiny",
              "--weights", path, "--out", tmp_path / "c", "--num-workers", "0", "--no-progress")
    assert_user_error(res, str(path), "3 blocks", "expected encoder custom")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------- SPOT.forward's door

@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return SPOT(preset("tiny")), SPOT(preset("tiny", stage=2))      # N = 16 tokens, D = 32, K = 3, S = 16


@pytest.mark.parametrize("stage, shape, kwargs, says", [
    (1, (2, 16, 48), {}, "width 48 is not the 32"),
    (1, (2, 17, 32), {}, "drop the 1 CLS/register tokens"),
    (1, (2, 15, 32), {}, "15 tokens is not the 4x4 grid"),
    (1, (16, 32), {}, "add the batch dimension"),
    (2, (2, 16, 32), {}, "not the final tokens"),
    (1, (2, 16, 32), {"noise": (2, 3, 8)}, "noise of shape (2, 3, 8), expected (2, 3, 16)"),
    (2, (2, 17, 32), {"target": (2, 17, 32)}, "target of shape (2, 17, 32), expected (2, 16, 32)"),
    (1, (2, 16, 32), {"orders": -1}, "orders -1: order indices run 0..8"),
    (1, (2, 16, 32), {"orders": 9}, "orders 9: order indices run 0..8"),
    (1, (2, 16, 32), {"orders": [0, 9]}, "orders [0, 9]"),
    (1, (2, 16, 32), {"orders": (3,)}, "orders of shape (3,), expected (2,) or (2, R)"),
])
def test_forward_names_expected_and_given(models, stage, shape, kwargs, says):
    model = models[stage - 1]
    args = {k: (torch.zeros(v, dtype=torch.long) if k == "orders" else torch.randn(v))
            if isinstance(v, tuple) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError) as err:
        model(torch.randn(shape), **args)
    message = str(err.value)
    assert message.startswith("SPOT.forward:") and says in message and "\n" not in message, message
    if "inputs" in message:                      # expected beside given
        assert f"inputs of shape {shape}" in message and "expected" in message, message


def test_forward_accepts_every_valid_form(models):
    stage1, stage2 = models
    x = torch.randn(2, 16, 32)
    for orders in (None, "all", 0, 8, [1, 2], torch.tensor(3), torch.tensor([0, 8]),
                   torch.zeros(2, 2, dtype=torch.long)):
        assert stage1(x, orders=orders, noise=torch.randn(2, 3, 16)).recon.shape == (2, 16, 32)
    assert stage2(torch.randn(2, 17, 32), target=x).recon.shape == (2, 16, 32)


def test_the_checks_do_not_break_torch_compile(models):
    import torch._dynamo as dynamo
    stage1 = models[0].eval()
    explained = dynamo.explain(lambda x: stage1(x, orders="standard").loss)(torch.randn(2, 16, 32))
    assert explained.graph_break_count == 0, explained.break_reasons


# ------------------------------------------------------------------- load_reference

def test_load_reference_takes_a_path(tmp_path, models):
    source, target = models[0], SPOT(preset("tiny"))
    torch.save(export_reference(source), tmp_path / "ref.pth")
    for ckpt in (str(tmp_path / "ref.pth"), tmp_path / "ref.pth"):
        target.load_state_dict(SPOT(preset("tiny")).state_dict())
        load_reference(target, ckpt)
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_any_random_bytes_are_named_not_a_torch_save_file(tmp_path):
    """The unpickler fails on random bytes in many ways (UnpicklingError, IndexError, EOFError...):
    every one is reported the same way."""
    rng = np.random.default_rng(0)
    for i in range(40):
        path = tmp_path / f"w{i}.pth"
        path.write_bytes(rng.bytes(int(rng.integers(1, 4096))))
        with pytest.raises(WeightsError, match="not a torch.save file"):
            FrozenEncoder.create(CFG, weights=path)


@pytest.mark.parametrize("kind, says", [("missing", "no such file"), ("random bytes", "cannot be read"),
                                        ("pickled objects", "weights_only=False"), ("a list", "got a list")])
def test_load_reference_refuses_unreadable_files_in_one_line(tmp_path, kind, says):
    path = tmp_path / "ref.pth"
    if kind != "missing":
        _write(path, kind)
    with pytest.raises(CheckpointMismatch) as err:
        load_reference(SPOT(preset("tiny")), path)
    assert str(path) in str(err.value) and says in str(err.value) and "\n" not in str(err.value), str(err.value)
