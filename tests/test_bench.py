"""`spot-fast bench` on the tiny preset (CPU, seconds): the FLOP formula against torch's own
counter, the JSON record (a peak per row), the 9-order mask check, the data rows over a real
cache, a cache the bench builds itself, the contended section's neighbours, the sweep section,
and option checks. No timing is asserted: speed is measured by the bench itself."""
import dataclasses
import json
import os

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
from spot_fast.errors import UserError
from spot_fast.fields import ConfigError
from spot_fast.model import SPOT

from error_checks import flat
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
    """Every default section over the shared tiny caches, passed as their --split both folder."""
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(preset="tiny", batch=4, device="cpu", cache=str(tiny_caches().both), warmup=0, repeats=1,
                      data_batches=3, out=str(out), precision="fp32", loader_workers=0)
    return run_bench(cfg, log=lambda msg: None)


def test_bench_json_has_every_section_and_the_record(result):
    saved = json.loads(open(result["saved"]).read())
    for key in ("hardware", "versions", "date", "git_commit", "flop_count", "threads", "reference"):
        assert key in saved, key
    assert set(saved["sections"]) == {"stage1", "stage2", "eval", "data"}
    assert set(saved["sections"]["eval"]["paths"]) == {"reference", "serial", "batched"}
    for sec in ("stage1", "stage2"):
        rows = saved["sections"][sec]["paths"]
        assert set(rows) == {"reference", "spot-fast"}
        assert rows["reference"]["flops_per_step"] > rows["spot-fast"]["flops_per_step"] > 0
        assert all(r["median_s"] > 0 and r["img_s"] > 0 for r in rows.values())


def test_every_row_records_the_peak_of_its_precision(result):
    """MFU = FLOPs / time / the peak of the row's own precision, recorded beside it."""
    for sec in ("stage1", "stage2", "eval"):
        for name, r in result["sections"][sec]["paths"].items():
            assert r["precision"] == "fp32" and r["peak_flops"] > 0 and "matmul" in r["peak_source"], name
            assert r["mfu"] == pytest.approx(r["flops_per_step"] * r["img_s"] / 4 / r["peak_flops"])


def test_bench_eval_masks_agree(result):
    check = result["sections"]["eval"]["mask_check"]["batched"]
    assert check["max_abs_mask_diff"] < 1e-5 and check["argmax_agreement"] > 0.99


def test_bench_builds_its_own_cache_and_sets_fp32_and_bf16_rows_side_by_side(tmp_path):
    """Without --cache the bench writes data and caches of the preset's shape; --precision both:
    a bf16 row beside every fp32 fast row, its masks checked against serial fp32 decoding."""
    cfg = BenchConfig(preset="tiny", batch=3, device="cpu", sections=("stage1", "eval"), warmup=0, repeats=1,
                      precision="both", save=False, loader_workers=1)
    res = run_bench(cfg, log=lambda msg: None)
    assert res["data"]["built"] is True
    assert set(res["sections"]["stage1"]["paths"]) == {"reference", "spot-fast", "spot-fast bf16"}
    assert res["sections"]["stage1"]["paths"]["spot-fast bf16"]["precision"] == "bf16"
    assert set(res["sections"]["eval"]["paths"]) == {"reference", "serial", "batched", "batched bf16"}
    checks = res["sections"]["eval"]["mask_check"]
    assert checks["batched"]["max_abs_mask_diff"] < 1e-5
    assert 0 < checks["batched bf16"]["max_abs_mask_diff"] < 0.05
    assert "batched bf16 vs serial" in format_table(res)


def test_bench_data_rows_from_a_real_cache(result):
    data = result["sections"]["data"]
    for row in ("reference_dataset", "cache_reader", "raw_memmap"):
        assert data[row]["img_s"] > 0, row
    assert 0 <= data["data_wait"]["share"] <= 1


def test_table_names_every_row_and_missing_gpu(result):
    table = format_table(result)
    for word in ("stage1", "stage2", "eval", "batched vs serial", "reference_dataset", "cache_reader",
                 "transcription of the reference", "MFU peak fp32"):
        assert word in table, word
    if not torch.cuda.is_available():
        assert "not measured" in table


@pytest.mark.parametrize("args, message", [
    (["--sections", "stage1,nope"], "--sections"),
    (["--repeats", "0"], "'--repeats': 0 is out of range: it must be >= 1"),
    (["--precision", "fp8"], "--precision must be one of"),
    (["--cache", "/nonexistent"], "no cache at /nonexistent"),
    (["--preset", "imagenet"], "--preset must be one of"),
    (["--reference-repo", "/nonexistent"], "not a checkout of the SPOT reference repository"),
    (["--sections", "sweep", "--sweep-variants", "1"], "'--sweep-variants': 1 is out of range: it must be >= 2"),
    (["--sections", "sweep", "--sweep-steps", "0"], "'--sweep-steps': 0 is out of range: it must be >= 1"),
    (["--data-batches", "0"], "'--data-batches': 0 is out of range: it must be >= 1"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda"),
])
def test_bad_options_give_one_message(args, message, tmp_path):
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert message in flat(res.output) and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())        # nothing written


def test_a_cache_of_another_shape_is_one_line(tmp_path):
    """The tiny cache under the COCO preset (width 32 vs 768): one line naming the cache and the fix."""
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--cache", str(tiny_caches().both / "train"),
                                   "--sections", "stage1"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "does not fit the model" in res.output and "--preset" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_eval_on_a_train_only_cache_names_the_fix(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--preset", "tiny",
                                   "--cache", str(tiny_caches().both / "train")])
    assert res.exit_code == 2 and "needs a val cache" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("native, expected", [(True, ("fp32", "bf16")), (False, ("fp32",))])
def test_auto_precision_on_a_cpu_adds_bf16_only_where_native(monkeypatch, native, expected):
    import spot_fast.bench.config as bench_config
    monkeypatch.setattr(bench_config, "cpu_bf16_native", lambda: native)
    assert BenchConfig(device="cpu").resolved().precisions == expected


def test_bench_config_rejects_bad_values_naming_the_argument():
    """In Python the field's own check, when the config is made, names the argument (not the flag)."""
    with pytest.raises(ConfigError, match="^batch must be >= 1, got 0$"):
        BenchConfig(batch=0)
    with pytest.raises(ConfigError, match="^precision must be one of auto, bf16, fp32, both, got 'fp8'$"):
        BenchConfig(precision="fp8")
    with pytest.raises(BenchError, match="^sections must be a non-empty tuple"):
        BenchConfig(sections=("stage1", "nope")).validate()


def test_results_go_to_the_current_folder_not_out_nor_the_source_tree(tmp_path, monkeypatch):
    from spot_fast.benchinfo import result_path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path / "elsewhere"))
    path = result_path("bench_train")
    assert path.parent == tmp_path / "bench-results" and not (tmp_path / "elsewhere").exists()
    assert result_path("bench_train", tmp_path / "mine").parent == tmp_path / "mine"


def test_busy_neighbours_run_during_the_block_and_are_always_killed():
    from spot_fast.bench.contended import busy_neighbours
    with pytest.raises(RuntimeError):
        with busy_neighbours(2, limit_s=60) as procs:
            assert all(p.poll() is None for p in procs)          # spinning
            raise RuntimeError("a failed measurement")
    assert all(p.poll() is not None for p in procs)              # gone, failure or not


def test_neighbours_run_in_sessions_of_their_own_or_in_ours():
    import os
    from spot_fast.bench.contended import busy_neighbours
    for own, want_ours in ((True, False), (False, True)):
        with busy_neighbours(2, limit_s=60, own_session=own) as procs:
            assert all((os.getsid(p.pid) == os.getsid(0)) is want_ours for p in procs)


def test_contended_section_times_the_policy_and_torch_default(tmp_path):
    cfg = BenchConfig(preset="tiny", batch=4, device="cpu", cache=str(tiny_caches().both), sections=("contended",),
                      warmup=0, repeats=1, precision="fp32", save=False, threads=1)
    res = run_bench(cfg, log=lambda msg: None)
    section = res["sections"]["contended"]
    rows = section["rows"]
    assert section["precision"] == "fp32"
    assert set(rows) == {"policy", "torch default"}
    assert rows["policy"]["threads"] == {"quiet": 1, "other sessions": 1, "this session": 1}   # --threads 1
    for r in rows.values():
        assert r["quiet_img_s"] > 0 and r["quiet_cores"] > 0
        assert set(r["contended"]) == {"other sessions", "this session"}
        for x in r["contended"].values():
            assert x["img_s"] > 0 and x["cores"] > 0 and 0 < x["fair_cores"] <= 1         # one thread
            assert x["share"] == pytest.approx(x["img_s"] / r["quiet_img_s"])
    assert "contended stage1" in format_table(res) and "this session" in format_table(res)


def test_sweep_ratio_is_separate_time_over_sweep_time(monkeypatch, tmp_path):
    """Known times in, known ratios out: M=2 separate runs of [2.0, 1.0] s each against a sweep
    of [3.0, 1.5] s and a stacked sweep of [1.0, 0.5] s (wall, CPU)."""
    import spot_fast.bench.sweep as sweep_bench
    times = iter([[2.0, 1.0], [2.0, 1.0], [3.0, 1.5], [1.0, 0.5]])
    monkeypatch.setattr(sweep_bench, "timed", lambda fn: next(times))
    row = sweep_bench.measure(_Base(), "optim.lr=0.1,0.2", tmp_path)   # timed() never runs its job here
    assert row["separate_s"] == [4.0, 2.0]
    assert row["ratio_sweep"] == pytest.approx([4 / 3, 4 / 3]) and row["ratio_stacked"] == pytest.approx([4.0, 4.0])


class _Base:
    """A TrainConfig stand-in: `measure` only reads its fields through to_dict."""

    def to_dict(self):
        from spot_fast.train import TrainConfig
        return TrainConfig(train_cache="unused", preset="tiny").to_dict()


def test_bench_sweep_section_times_every_variant_both_ways(one_thread):
    from spot_fast.bench.sweep import SweepBenchConfig, format_sweep_table, run_sweep_bench
    cfg = SweepBenchConfig(variants=2, cache=str(tiny_caches().both / "train"), batch_size=4, steps=2)
    result = run_sweep_bench(cfg)
    assert [r["grid"] for r in result["rows"]] == ["slot_attention.num_slots=3,4", "optim.lr=0.0002,0.0004"]
    for row in result["rows"]:
        assert row["variants"] == 2
        for key in ("separate_s", "sweep_s", "stacked_s"):
            assert len(row[key]) == 2 and all(t > 0 for t in row[key])
    assert "optim.lr=0.0002,0.0004" in format_sweep_table(result)


@pytest.mark.skipif(not os.environ.get("SPOT_REFERENCE_REPO"), reason="set SPOT_REFERENCE_REPO to a reference checkout")
def test_reference_repo_rows_run_the_checkout(tmp_path):
    cfg = BenchConfig(preset="tiny", batch=4, device="cpu", cache=str(tiny_caches().both), warmup=0, repeats=1,
                      precision="fp32", save=False, loader_workers=0, sections=("stage1", "stage2", "eval"),
                      reference_repo=os.environ["SPOT_REFERENCE_REPO"])
    res = run_bench(cfg, log=lambda msg: None)
    assert "checkout's own code" in res["reference"] and "checkout's own code" in format_table(res)
    assert all(res["sections"][s]["paths"]["reference"]["median_s"] > 0 for s in ("stage1", "stage2", "eval"))


def test_stage2_on_a_cache_without_split_tokens_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--preset", "tiny", "--sections", "stage2",
                                   "--cache", str(tiny_caches().nosplit)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "split" in res.output and len(res.output.strip().splitlines()) == 1


def test_cache_paths_follow_the_one_rule_of_every_command(tmp_path):
    """`--cache` as train and eval take it (spot_fast.cache.resolve_cache): a --split both folder
    gives both splits; a cache of one split feeds the training rows; a folder missing the val
    split is refused naming the split to build, not an option the bench does not have."""
    from spot_fast.bench.config import bench_caches
    both = tiny_caches().both
    assert bench_caches(both, need_val=True) == (both / "train", both / "val")
    assert bench_caches(both, need_val=False) == (both / "train", None)
    assert bench_caches(both / "val", need_val=False) == (both / "val", None)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train").symlink_to(both / "train")
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "out"), "--preset", "tiny",
                                   "--cache", str(tmp_path / "half")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "holds only a train cache" in res.output and "--split val" in res.output
    assert "--train-cache" not in res.output and not (tmp_path / "out").exists()


def test_the_python_api_names_arguments_not_flags(tmp_path):
    both = tiny_caches().both
    with pytest.raises(BenchError) as err:
        BenchConfig(preset="tiny", cache=str(both / "train"), sections=("eval",)).validate()
    assert f"cache={str(both / 'train')!r}" in str(err.value) and "'eval' out of sections" in str(err.value)
    with pytest.raises(BenchError, match="^sections must be a non-empty tuple"):
        BenchConfig(sections=("stage1", "nope")).validate()
    with pytest.raises(UserError, match="^reference_repo=/nonexistent: not a checkout"):
        BenchConfig(reference_repo="/nonexistent").validate()
    with pytest.raises(UserError, match=r"^cache=.* with preset=\)$"):
        BenchConfig(cache=str(both / "train"), sections=("stage1",)).validate()     # tiny cache, coco shapes
    half = tmp_path / "half"
    half.mkdir()
    (half / "train").symlink_to(both / "train")
    with pytest.raises(UserError, match=r"^cache= \S+ holds only a train cache"):
        BenchConfig(preset="tiny", cache=str(half)).validate()


def test_every_bench_field_has_a_comment_and_a_flag():
    """BenchConfig is the bench's one option list: each field commented (the help) and on the command line."""
    from spot_fast.fields import field_comments
    text = flat(CliRunner().invoke(app, ["bench", "--help"]).output)
    comments = field_comments(BenchConfig)
    for f in dataclasses.fields(BenchConfig):
        assert comments.get(f.name), f"BenchConfig.{f.name} has no comment"
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert comments[f.name].split(" (")[0][:30] in text, f.name


@pytest.mark.parametrize("threads, neighbours, cores, own_session, autogroup, want", [
    (1, 2, 2, True, True, 2 / 3),          # three sessions on two cores
    (2, 2, 2, True, True, 2 / 3),          # whatever the session's threads
    (2, 2, 2, False, True, 1.0),           # this session: per thread, 2 of 4 tasks on 2 cores
    (1, 2, 2, False, True, 2 / 3),
    (2, 2, 2, True, False, 1.0),           # no autogroup: per thread
    (1, 8, 8, True, True, 8 / 9),
    (4, 1, 8, False, False, 4),            # room for every thread
])
def test_fair_cores(threads, neighbours, cores, own_session, autogroup, want):
    from spot_fast.bench.contended import fair_cores
    assert fair_cores(threads, neighbours, cores, own_session, autogroup) == pytest.approx(want)
