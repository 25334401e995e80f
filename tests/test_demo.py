"""`spot-fast demo` end to end at a tiny size: files, the table against the runs' own metrics and
independently scored baselines, reuse on a second run, and the errors a user can cause."""
import dataclasses
import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from spot_fast.baselines import grid_labels, one_slot_labels
from spot_fast.demo import MODELS, TILE_ZOOM, DemoConfig, DemoError, demo_encoder, make_data, run_demo
from spot_fast.encoders import sincos_table
from spot_fast.metrics import MetricAccumulator

# A few steps of each model: batch 8 over 32 images (4 steps an epoch).
TINY = {"optim.batch_size": "8"}


def tiny_config(out, **kw) -> DemoConfig:
    base = dict(out=str(out), num_train=32, num_val=6, epochs=1, stage2_epochs=1, progress=False, device="cpu",
                extra=TINY)
    return DemoConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    result = run_demo(tiny_config(out), say=lines.append)
    return out, result, lines


def _score(labels_of, val_batches) -> dict:
    acc = MetricAccumulator()
    for b in val_batches:
        acc.update(labels_of(b), b["instance_mask"], b["class_mask"], b["ignore_mask"])
    return acc.compute()


def test_demo_writes_its_files(demo_run):
    out, result, lines = demo_run
    for name in ("report.md", "masks.png", "results.json", "data/demo_data.json"):
        assert (out / name).is_file(), name
    for name in MODELS:
        assert (out / name / "eval" / "metrics.json").is_file()
        assert (out / name / "eval" / "masks.png").is_file()
    from PIL import Image
    picture = Image.open(out / "masks.png")
    tile = 64 * TILE_ZOOM                                            # 6 val images under a title strip,
    assert picture.size == (tile * (3 + len(MODELS)), 18 + tile * 6)  # 3 + one column per model
    strip = np.asarray(picture.convert("RGB"))[:18]
    assert (strip < 128).any() and (strip == 255).mean() > 0.5      # dark titles on white
    assert result.report == out / "report.md"


def test_table_holds_the_runs_metrics(demo_run):
    out, result, lines = demo_run
    report = (out / "report.md").read_text()
    titles = {"stage1": "SPOT stage 1", "stage2": "SPOT stage 2", "dinosaur": "DINOSAUR (MLP decoder)"}
    for name in MODELS:
        saved = json.loads((out / name / "eval" / "metrics.json").read_text())
        for kind, label in (("decoder", "decoder"), ("slot_attention", "slot attention")):
            row = next(r for r in result.rows if r["model"] == titles[name] and r["masks"] == label)
            m = saved[kind]
            assert [row[k] for k in ("fg_ari", "mbo_i", "mbo_c", "miou")] == \
                   [m[k] for k in ("fg_ari", "mbo_i", "mbo_c", "miou")]
            cells = f"| {titles[name]} | {label} | {m['fg_ari']:.1f} | {m['mbo_i']:.1f} | {m['mbo_c']:.1f} | {m['miou']:.1f} |"
            assert cells in report
    table = "\n".join(lines)
    assert re.search(r"SPOT stage 1\s+decoder\s+-?\d+\.\d", table)
    assert f"== DINOSAUR (MLP decoder) -> {out / 'dinosaur'}" in lines       # not announced as stage 1


def test_baselines_in_the_table_are_scored_independently(demo_run):
    out, result, _ = demo_run
    from spot_fast.cache import open_cache
    val = open_cache(out / "cache" / "val", allow_random_init=True)
    batches = list(val.eval_reader(4, split_tokens=False))
    k = json.loads((out / "stage1" / "config.json").read_text())["model"]["slot_attention"]["num_slots"]
    expect = {"trivial: one slot": _score(lambda b: one_slot_labels(*b["instance_mask"].shape), batches),
              f"trivial: grid of {k}": _score(lambda b: grid_labels(k, *b["instance_mask"].shape[1:]).expand_as(
                  b["instance_mask"]), batches)}
    for name, m in expect.items():
        row = next(r for r in result.rows if r["model"] == name)
        for key, value in m.items():
            assert row[key] == pytest.approx(value, abs=1e-9)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result.rows))


def test_rerun_reuses_everything_and_reports_the_times_of_the_runs_that_made_it(demo_run):
    out, result, _ = demo_run
    lines: list[str] = []
    again = run_demo(tiny_config(out), say=lines.append)
    text = "\n".join(lines)
    assert again.reused == ["data", "cache", *MODELS]
    for step in ("data", "cache", *MODELS):
        assert again.times[step] == result.times[step] > 0          # not this invocation's ~0 s
    report = (out / "report.md").read_text()
    t = result.times["stage1"]
    assert f"stage1 {t:.0f} s" in report if t >= 10 else f"stage1 {t:.1f} s" in report
    assert "Reused by this invocation: data, cache, stage1, stage2, dinosaur." in report
    assert "already generated" in text
    assert text.count("already cached") == 2
    assert text.count("already trained") == len(MODELS)
    assert again.rows == result.rows


def test_the_demo_cache_has_the_content_keys_of_its_spec(demo_run):
    """The demo builds through cache.build_splits; its caches keep the keys of the spec written out
    here field by field (what the demo built before it called build_splits), so old caches are reused."""
    from spot_fast.cache import CacheSpec, find_cached
    from spot_fast.config import preset
    out, _, lines = demo_run
    enc = preset("demo").encoder
    for split in ("train", "val"):
        spec = CacheSpec("synthetic", str(out / "data"), split, enc, "random-init:0+sincos-position-1.0",
                         split_block=enc.split_block, mask_size=enc.image_size)
        assert find_cached(spec, out / "cache" / split) is not None, split
        manifest = json.loads((out / "cache" / split / "manifest.json").read_text())
        assert manifest["counts"]["images"] == {"train": 32, "val": 6}[split]
        assert f"cached {split}: {manifest['counts']['images']} images" in "\n".join(lines)


def test_other_settings_in_the_same_folder_are_refused(demo_run):
    out, _, _ = demo_run
    before = (out / "data" / "demo_data.json").read_text()
    with pytest.raises(DemoError, match="other settings"):
        make_data(tiny_config(out, num_train=40))
    assert (out / "data" / "demo_data.json").read_text() == before


def test_a_finished_run_with_other_settings_is_refused(demo_run, tmp_path):
    out, _, _ = demo_run
    from spot_fast.demo import train_config, train_model
    tcfg = train_config(tiny_config(out, extra={**TINY, "optim.lr": "0.001"}), "stage1", out / "cache")
    with pytest.raises(DemoError, match="other settings"):
        train_model(tcfg)


def test_stage2_trained_from_other_teacher_weights_is_refused(demo_run):
    """Stage 2's run config names only the teacher's folder: the demo records the sha256 of the
    weights it distilled, and refuses to reuse the run once stage 1 holds other weights."""
    out, _, _ = demo_run
    from spot_fast.demo import TEACHER_RECORD, teacher_id, train_config, train_model
    from spot_fast.train.state import step_checkpoints
    record = json.loads((out / "stage2" / TEACHER_RECORD).read_text())
    newest = step_checkpoints(out / "stage1")[-1]
    assert record["sha256"] == teacher_id(out / "stage1") == hashlib.sha256(newest.read_bytes()).hexdigest()
    saved = newest.read_bytes()
    try:
        newest.write_bytes(saved + b"retrained")          # stage 1 now holds other weights
        with pytest.raises(DemoError, match="other stage-1 weights"):
            train_model(train_config(tiny_config(out), "stage2", out / "cache"))
    finally:
        newest.write_bytes(saved)


@pytest.mark.parametrize("field, value, message", [
    ("num_val", 0, "^num_val must be >= 1"), ("num_train", 3, "^num_train must be at least the batch size 8"),
    ("epochs", 0, "^epochs must be >= 1"), ("level", "hard", "^level must be one of"),
    ("encoder", "vit_huge", "^encoder must be one of"), ("weights", "/no/such.pth", "^weights='/no/such.pth'"),
    ("threads", 0, "^threads must be >= 1"), ("device", "foo", "^device='foo': not a device"),
    ("seed", -1, "^seed must be >= 0")])
def test_bad_options_are_named(tmp_path, field, value, message):
    with pytest.raises(DemoError, match=message):
        tiny_config(tmp_path, **{field: value}).validate()
    assert not any(tmp_path.iterdir())              # nothing written


def test_real_weights_use_the_named_encoder_and_its_last_two_blocks(tmp_path):
    from spot_fast.demo import cache_encoder
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    enc = cache_encoder(tiny_config(tmp_path, weights=str(weights), encoder="dino_vits8"))
    assert (enc.name, enc.split_block, enc.image_size, enc.spec.patch_size) == ("dino_vits8", 10, 64, 8)
    assert cache_encoder(tiny_config(tmp_path)).name == "custom"


def test_cli_bad_option_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "spot_fast.cli.app", "demo", "--out", str(tmp_path / "d"),
                          "--num-val", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Invalid value for '--num-val': 0 is out of range: it must be >= 1" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "spot_fast.cli.app", "demo", "--out", str(tmp_path / "d"),
                          "--device", "cuda:7"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: --device cuda:7:"), res.stderr
    assert "Traceback" not in res.stderr


def test_sincos_table_matches_the_formula():
    grid, dim = 5, 12
    t = sincos_table(grid, dim)
    assert t.shape == (grid * grid, dim)
    q = dim // 4
    for n, (r, c) in enumerate((r, c) for r in range(grid) for c in range(grid)):
        w = [100.0 ** (-i / q) for i in range(q)]
        expect = ([np.sin(r * x) for x in w] + [np.cos(r * x) for x in w]
                  + [np.sin(c * x) for x in w] + [np.cos(c * x) for x in w])
        np.testing.assert_allclose(t[n].numpy(), expect, atol=1e-6)
    assert len({tuple(row.tolist()) for row in t}) == grid * grid     # every patch has its own code


def _position_r2(encoder, images: torch.Tensor) -> float:
    """R^2 of the best linear map from the encoder's final tokens to (row, column)."""
    tokens = encoder(images).final                                   # (B, N, D)
    B, N, D = tokens.shape
    g = int(N ** 0.5)
    pos = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(N, 2)
    x = torch.cat([tokens.reshape(B * N, D), torch.ones(B * N, 1)], 1).double()
    y = pos.repeat(B, 1).double()
    fit = x @ torch.linalg.lstsq(x, y).solution
    return float(1 - ((fit - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_demo_encoder_features_carry_position():
    """The reason for the sin-cos table: an untrained ViT's tokens hardly say where a patch is
    once the image has the pixel noise of a real one (std 0.05 after normalisation, ~3/255)."""
    from spot_fast.config import preset
    from spot_fast.encoders import FrozenEncoder
    enc = preset("demo").encoder
    g = torch.Generator().manual_seed(0)
    # flat-coloured 8x8 patches: colour carries no position
    images = torch.rand(16, 3, enc.grid_size, enc.grid_size, generator=g) * 4 - 2
    images = images.repeat_interleave(enc.patch_size, 2).repeat_interleave(enc.patch_size, 3)
    images = images + 0.05 * torch.randn(images.shape, generator=g)
    assert enc.position == "sincos"
    plain = FrozenEncoder.create(dataclasses.replace(enc, position="learned"), random_init=True, seed=0)
    ours = demo_encoder(enc, seed=0)
    assert ours.weights_id == "random-init:0+sincos-position-1.0"   # still marked random-init
    assert _position_r2(ours, images) > 0.95
    assert _position_r2(plain, images) < 0.5


def test_the_position_table_is_part_of_the_cache_key():
    """The encoder's position option reaches the cache description (so its key and manifest);
    the default learned table adds nothing, so caches built before the option keep their keys."""
    from spot_fast.cache.paths import encoder_description
    from spot_fast.config import EncoderConfig, preset
    sincos = preset("demo").encoder
    learned = dataclasses.replace(sincos, position="learned")
    assert encoder_description(sincos)["position"] == "sincos:1.0"
    assert encoder_description(dataclasses.replace(sincos, position_scale=0.5))["position"] == "sincos:0.5"
    assert "position" not in encoder_description(learned)
    assert "position" not in encoder_description(EncoderConfig())
    pos = demo_encoder(sincos, seed=0).vit.pos_embed[0, 1:]
    torch.testing.assert_close(pos, 1.0 * sincos_table(sincos.grid_size, sincos.embed_dim))


@pytest.mark.parametrize("fields, words", [(dict(position="rope"), "'learned' or 'sincos'"),
                                           (dict(name="dino_vits8", position="sincos"), "custom encoders only"),
                                           (dict(name="custom", position_scale=0.0), "position_scale must be > 0")])
def test_bad_encoder_position_is_named(fields, words):
    from spot_fast.config import EncoderConfig
    with pytest.raises(ValueError, match=words):
        EncoderConfig(**fields)
