"""`spot-fast bench` on the tiny preset (CPU, seconds): the FLOP formula against torch's own
counter, the JSON record, the 9-order mask check, the data rows over a real cache, and option
checks. No timing is asserted: speed is measured by the bench itself."""
import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from spot_fast.bench import BenchConfig, BenchError, format_table, run_bench
from spot_fast.bench import flops
from spot_fast.cli.app import app
from spot_fast.config import preset
from spot_fast.encoders import FrozenEncoder
from spot_fast.model import SPOT

from train_case import tiny_caches


def counted(fn) -> int:
    """torch's FLOP count of fn; attention on the math backend (the counter does not see the
    CPU flash kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def wide_tiny(stage=1):
    """The tiny preset with several heads and slots, so that no count hides behind a 1."""
    cfg = preset("tiny", stage=stage)
    return dataclasses.replace(cfg, slot_attention=dataclasses.replace(cfg.slot_attention, num_slots=4))


@pytest.mark.parametrize("orders", [1, 9])
def test_flop_formula_matches_torch_counter_stage1(orders):
    cfg, B = wide_tiny(), 3
    model = SPOT(cfg).eval()
    model.decoder.fast = False                 # the formula counts the plain path's work
    x = torch.randn(B, cfg.encoder.num_patches, cfg.feature_dim)
    ids = "all" if orders == 9 else 2
    with torch.no_grad():
        assert counted(lambda: model(x, orders=ids)) == flops.spot_forward(cfg, B, orders)


def test_flop_formula_of_masks_only_decoding_matches_torch_counter():
    """What masks-only decoding saves, by the formula and by torch's counter on the fast path."""
    cfg, B = wide_tiny(), 3
    model = SPOT(cfg).eval()
    x = torch.randn(B, cfg.encoder.num_patches, cfg.feature_dim)
    with torch.no_grad():
        saved = counted(lambda: model(x, orders="all")) - counted(lambda: model(x, orders="all", masks_only=True))
    assert saved == flops.spot_forward(cfg, B, 9) - flops.spot_forward(cfg, B, 9, masks_only=True) > 0


def test_flop_formula_matches_torch_counter_stage2_and_encoder():
    cfg, B = wide_tiny(stage=2), 2
    model = SPOT(cfg).eval()
    model.decoder.fast = False
    tokens = torch.randn(B, 1 + cfg.encoder.num_patches, cfg.feature_dim)
    with torch.no_grad():
        assert counted(lambda: model(tokens, orders=0)) == flops.spot_forward(cfg, B)
    encoder = FrozenEncoder.create(cfg.encoder, random_init=True)
    images = torch.randn(B, 3, cfg.encoder.image_size, cfg.encoder.image_size)
    assert counted(lambda: encoder(images)) == flops.encoder(cfg, B)


def test_training_step_counts_three_forwards():
    cfg, B = wide_tiny(), 2
    model = SPOT(cfg).train()
    model.decoder.fast = False
    x = torch.randn(B, cfg.encoder.num_patches, cfg.feature_dim)
    total = counted(lambda: model(x, orders=1).loss.backward())
    # the backward skips the gradient of the detached decoder target's input projection
    # and of the (non-trainable) features: within a few percent of 3x
    assert abs(total / (flops.TRAIN_FACTOR * flops.spot_forward(cfg, B)) - 1) < 0.1


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cache = tiny_caches().both / "train"
    cfg = BenchConfig(preset="tiny", batch=4, device="cpu", cache=str(cache), warmup=0, repeats=1,
                      jpegs=3, data_batches=3, out=str(out), precision="fp32")
    return run_bench(cfg, log=lambda msg: None)


def test_bench_json_has_every_section_and_the_record(result):
    saved = json.loads(open(result["saved"]).read())
    for key in ("hardware", "versions", "date", "git_commit", "peak_flops", "flop_count"):
        assert key in saved, key
    assert set(saved["sections"]) == {"stage1", "stage2", "eval", "data"}
    assert set(saved["sections"]["eval"]["paths"]) == {"reference", "serial", "batched"}
    for sec in ("stage1", "stage2"):
        rows = saved["sections"][sec]["paths"]
        assert set(rows) == {"reference", "spot-fast"}
        assert rows["reference"]["flops_per_step"] > rows["spot-fast"]["flops_per_step"] > 0
        assert all(r["median_s"] > 0 and r["img_s"] > 0 for r in rows.values())


def test_bench_eval_masks_agree(result):
    check = result["sections"]["eval"]["mask_check"]["batched"]
    assert check["max_abs_mask_diff"] < 1e-5 and check["argmax_agreement"] > 0.99


def test_bench_fp32_and_bf16_rows_side_by_side(tmp_path):
    """--precision both: a bf16 row beside every fp32 fast row, its masks checked against the
    serial fp32 decoding (bf16 rounding: close, not equal)."""
    cfg = BenchConfig(preset="tiny", batch=3, device="cpu", sections=("stage1", "eval"), warmup=0, repeats=1,
                      jpegs=2, precision="both", save=False)
    res = run_bench(cfg, log=lambda msg: None)
    assert set(res["sections"]["stage1"]["paths"]) == {"reference", "spot-fast", "spot-fast bf16"}
    assert set(res["sections"]["eval"]["paths"]) == {"reference", "serial", "batched", "batched bf16"}
    checks = res["sections"]["eval"]["mask_check"]
    assert checks["batched"]["max_abs_mask_diff"] < 1e-5
    assert 0 < checks["batched bf16"]["max_abs_mask_diff"] < 0.05
    assert "batched bf16 vs serial" in format_table(res)


def test_bench_data_rows_from_a_real_cache(result):
    data = result["sections"]["data"]
    for row in ("jpeg_reference", "cache_reader", "raw_memmap"):
        assert data[row]["img_s"] > 0 and data[row]["gb_s"] > 0, row
    assert 0 <= data["data_wait"]["share"] <= 1


def test_table_names_every_path_and_missing_gpu(result):
    table = format_table(result)
    for word in ("stage1", "stage2", "eval", "batched vs serial", "jpeg_reference", "cache_reader"):
        assert word in table, word
    if not torch.cuda.is_available():
        assert "not measured" in table


@pytest.mark.parametrize("args, message", [
    (["--sections", "stage1,nope"], "--sections"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--precision", "fp8"], "--precision must be one of"),
    (["--cache", "/nonexistent"], "not a feature cache"),
    (["--preset", "imagenet"], "--preset must be one of"),
])
def test_bad_options_give_one_message(args, message, tmp_path):
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())        # nothing written


@pytest.mark.parametrize("native, expected", [(True, ("fp32", "bf16")), (False, ("fp32",))])
def test_auto_precision_on_a_cpu_adds_bf16_only_where_native(monkeypatch, native, expected):
    import spot_fast.bench.runner as runner
    monkeypatch.setattr(runner, "cpu_bf16_native", lambda: native)
    assert BenchConfig(device="cpu").resolved().precisions == expected


def test_bench_config_rejects_bad_values():
    with pytest.raises(BenchError, match="--batch must be >= 1"):
        BenchConfig(batch=0).validate()


def test_bench_sweep_times_every_variant_both_ways(one_thread):
    from spot_fast.bench.sweep import SweepBenchConfig, format_sweep_table, run_sweep_bench
    cfg = SweepBenchConfig(variants=2, cache=str(tiny_caches().both / "train"), batch_size=4, steps=2)
    result = run_sweep_bench(cfg)
    assert [r["grid"] for r in result["rows"]] == ["slot_attention.num_slots=3,4", "optim.lr=0.0002,0.0004"]
    for row in result["rows"]:
        assert row["variants"] == 2
        for key in ("separate_s", "sweep_s", "stacked_s"):
            assert len(row[key]) == 2 and all(t > 0 for t in row[key])
        assert row["ratio_sweep"][0] == pytest.approx(row["separate_s"][0] / row["sweep_s"][0])
    assert "optim.lr=0.0002,0.0004" in format_sweep_table(result)


@pytest.mark.parametrize("args, message", [
    (["--sweep", "1"], "variants must be >= 2"),
    (["--sweep", "2", "--steps", "0"], "steps must be >= 1"),
    (["--sweep", "2", "--cache", "/nonexistent"], "not a finished train cache"),
])
def test_bench_sweep_bad_options_give_one_message(args, message, tmp_path):
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())
