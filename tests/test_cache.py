"""The feature cache in one process: what is stored, both formats, readers, checks and the CLI.

Every cache here is a tiny random-init encoder (32px, patch 8, D=32) over `FakeSource` images.
"""
from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import FakeSource, build_tiny, fake_image, tiny_encoder, tiny_spec  # noqa: E402

from spot_fast.cache import CacheError, build_cache, open_cache, read_manifest  # noqa: E402
from spot_fast.cache import TrainReader  # noqa: E402
from spot_fast.config import EncoderConfig, preset  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """fmt -> split -> path: 10 images, image 5 corrupt, split tokens at block 2, shards of 4."""
    root = tmp_path_factory.mktemp("caches")
    return {fmt: {split: build_tiny(root / f"{fmt}-{split}", n=10, split=split, bad=(5,), format=fmt,
                                    split_block=2).path for split in ("train", "val")}
            for fmt in ("zarr", "wds")}


def test_views_are_encoder_of_each_view(tmp_path):
    """View 1 of a train cache is encoder(flip(image)); view 0 is encoder(image) (fp32 storage)."""
    result = build_tiny(tmp_path / "c", n=5, dtype="fp32", split_block=2)
    cache = open_cache(result.path, allow_random_init=True)
    assert cache.views == 2
    enc = tiny_encoder()
    for i in range(5):
        img = fake_image(0, i)
        want0 = enc(img[None], split_block=2)
        want1 = enc(img.flip(-1)[None], split_block=2)
        shard = cache.read_shard(i // 4)
        row = list(shard.rows).index(i)
        torch.testing.assert_close(torch.from_numpy(shard.features[row, 0]), want0.final[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(shard.features[row, 1]), want1.final[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(shard.split_tokens[row, 1]), want1.split[0], atol=1e-5, rtol=1e-5)


def test_split_tokens_and_tail_reproduce_final_tokens(tmp_path):
    """Stage 2 needs only the cache: the student's tail, initialised from the cached frozen
    weights, turns the cached split tokens back into the cached final tokens."""
    from spot_fast.model import SPOT
    result = build_tiny(tmp_path / "c", n=4, dtype="fp32", split_block=2)
    cfg = preset("tiny", stage=2)
    cache = open_cache(result.path, cfg, allow_random_init=True)
    state = cache.tail_state()
    assert set(state) == set(tiny_encoder().tail_state(2))
    student = SPOT(cfg)
    student.load_tail(state)
    batch = next(iter(cache.eval_reader(4)))
    with torch.no_grad():
        features = student.encode(batch["split_tokens"])          # (B, 1+N, D) -> (B, N, D)
    torch.testing.assert_close(features, batch["features"], atol=1e-5, rtol=1e-5)


def test_zarr_and_webdataset_hold_identical_tensors(caches):
    for split in ("train", "val"):
        z, w = open_cache(caches["zarr"][split], allow_random_init=True), open_cache(caches["wds"][split], allow_random_init=True)
        assert [s["images"] for s in z.shards] == [s["images"] for s in w.shards]
        for k in range(len(z.shards)):
            a, b = z.read_shard(k), w.read_shard(k)
            assert a.rows.tolist() == b.rows.tolist() and a.image_ids == b.image_ids
            for name in ("features", "split_tokens", "instance_mask", "class_mask", "ignore_mask"):
                va, vb = getattr(a, name), getattr(b, name)
                assert (va is None) == (vb is None)
                if va is not None:
                    assert va.dtype == vb.dtype and np.array_equal(va, vb), (split, k, name)
            assert a.jpeg == b.jpeg
        for ba, bb in zip(z.eval_reader(3), w.eval_reader(3), strict=True):
            for key in ba:
                if isinstance(ba[key], torch.Tensor):
                    assert torch.equal(ba[key], bb[key]), key
                else:
                    assert ba[key] == bb[key], key


def test_webdataset_stream_matches_train_reader(caches):
    """WdsReader (webdataset pipeline) delivers the same (image, view, features) as TrainReader."""
    cache = open_cache(caches["wds"]["train"], allow_random_init=True)
    def by_index(batches):
        out = {}
        for b in batches:
            for j, i in enumerate(b["index"].tolist()):
                out[i] = (b["view"][j].item(), b["features"][j], b["image_id"][j])
        return out
    a = by_index(cache.train_reader(3, seed=4, epoch=1, rank=0, world_size=1, drop_last=False))
    b = by_index(cache.wds_reader(3, seed=4, epoch=1, rank=0, world_size=1, drop_last=False, shuffle_buffer=5))
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    for i in a:
        assert a[i][0] == b[i][0] and a[i][2] == b[i][2] == 1000 + i
        assert torch.equal(a[i][1], b[i][1])


def test_corrupt_image_is_skipped_and_listed(caches):
    for fmt in ("zarr", "wds"):
        cache = open_cache(caches[fmt]["train"], allow_random_init=True)
        m = cache.manifest
        assert m["counts"] == {"source_images": 10, "images": 9, "skipped": 1, "shards": 3}
        assert m["skipped"] == [{"index": 5, "path": "/fake/img5.jpg", "reason": "truncated file"}]
        seen = [i for b in cache.eval_reader(4) for i in b["index"].tolist()]
        assert seen == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_val_cache_holds_masks_and_jpeg(caches):
    source = FakeSource(10, "val")
    cache = open_cache(caches["zarr"]["val"], allow_random_init=True)
    assert cache.views == 1 and cache.manifest["mask_dtype"] == "uint8"
    for batch in cache.eval_reader(4):
        for j, i in enumerate(batch["index"].tolist()):
            s = source.val_sample(i)
            assert torch.equal(batch["instance_mask"][j], s.instance_mask)
            assert torch.equal(batch["class_mask"][j], s.class_mask)
            assert torch.equal(batch["ignore_mask"][j], s.ignore_mask)
            assert batch["jpeg"][j] == s.jpeg and batch["image_id"][j] == 1000 + i


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_stored_dtypes_round_trip(tmp_path, dtype):
    result = build_tiny(tmp_path / "c", n=3, dtype=dtype)
    cache = open_cache(result.path, allow_random_init=True)
    feats = next(iter(cache.eval_reader(3)))["features"]
    want = tiny_encoder()(fake_image(0, 1)[None]).final[0]
    cast = want.bfloat16().float() if dtype == "bf16" else want
    torch.testing.assert_close(feats[1], cast, atol=1e-2 if dtype == "bf16" else 1e-5, rtol=1e-2)
    assert cache.manifest["stored_dtype"] == ("uint16 (bfloat16 bits)" if dtype == "bf16" else "float32")


def test_zstd_compression_holds_the_same_tensors(tmp_path, caches):
    result = build_tiny(tmp_path / "c", n=10, bad=(5,), split_block=2, compression="zstd")
    a = open_cache(result.path, allow_random_init=True)
    b = open_cache(caches["zarr"]["train"], allow_random_init=True)
    assert np.array_equal(a.read_shard(1).features, b.read_shard(1).features)


def test_same_build_twice_is_already_cached(caches):
    path = caches["zarr"]["train"]
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    again = build_tiny(path, n=10, bad=(5,), format="zarr", split_block=2)
    assert again.already_cached and again.images_built == 0
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before


def test_different_cache_at_same_out_is_refused(caches):
    with pytest.raises(CacheError, match=r"holds a cache of other settings \(--split-block: 2 -> None\)"):
        build_tiny(caches["zarr"]["train"], n=10, bad=(5,), format="zarr", split_block=None)


def test_default_location_depends_on_content(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOT_FAST_CACHE_DIR", str(tmp_path / "base"))
    a, b = tiny_spec("/data/x"), tiny_spec("/data/x", dtype="bf16")
    assert a.default_path().parent == tmp_path / "base"
    assert a.default_path().name.startswith("fake-train-custom-") and a.default_path() != b.default_path()
    assert a.default_path() == tiny_spec("/data/x").default_path()


# ----------------------------------------------------------------------------- fitting a model

def test_mismatched_cache_is_refused_naming_both_sides(caches):
    path = caches["zarr"]["train"]
    with pytest.raises(CacheError) as e:
        open_cache(path, EncoderConfig("dino_vitb16"), allow_random_init=True)
    assert "'custom'" in str(e.value) and "'dino_vitb16'" in str(e.value) and "D=32" in str(e.value) \
        and "D=768" in str(e.value)
    small = preset("tiny").encoder
    with pytest.raises(CacheError, match="64px"):
        open_cache(path, EncoderConfig("custom", image_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2),
                   allow_random_init=True)
    other_block = EncoderConfig(**{**small.__dict__, "split_block": 3})
    with pytest.raises(CacheError, match="block 2.*block 3"):
        open_cache(path, other_block, need_split_tokens=True, allow_random_init=True)
    assert open_cache(path, preset("tiny", stage=2), allow_random_init=True).has_split_tokens


def test_stage2_needs_split_tokens(tmp_path):
    result = build_tiny(tmp_path / "c", n=3)
    assert open_cache(result.path, preset("tiny"), allow_random_init=True)
    with pytest.raises(CacheError, match="split-layer tokens.*--split-block 2"):
        open_cache(result.path, preset("tiny", stage=2), allow_random_init=True)


def test_random_init_cache_is_refused_by_default(caches):
    with pytest.raises(CacheError, match="random-init"):
        open_cache(caches["zarr"]["train"], preset("tiny"))


def test_unfinished_or_foreign_directory_is_not_a_cache(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CacheError, match="not a spot-fast cache"):
        open_cache(tmp_path / "x")
    with pytest.raises(CacheError, match="does not exist"):
        open_cache(tmp_path / "missing")
    (tmp_path / "x" / "junk.txt").write_text("hi")
    with pytest.raises(CacheError, match="not empty"):
        build_tiny(tmp_path / "x", n=2)


def test_unwritable_output_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheError, match="cannot create the cache directory .*file/sub"):
        build_tiny(tmp_path / "file" / "sub", n=2)


def test_full_disk_leaves_no_cache_and_no_temporaries(tmp_path, monkeypatch):
    from spot_fast.cache import wds_store
    real = wds_store.write_shard
    calls = []

    def full_disk(path, shard, on_file=None):
        calls.append(shard.index)
        if len(calls) == 2:
            (path / "shard-00001.tar.tmp").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "shard-00001.tar.tmp"))
        return real(path, shard, on_file)

    monkeypatch.setattr(wds_store, "write_shard", full_disk)
    with pytest.raises(OSError, match="No space"):
        build_tiny(tmp_path / "c", n=10, format="wds")
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert not list((tmp_path / "c").rglob("*.tmp"))
    with pytest.raises(CacheError, match="unfinished cache build"):
        open_cache(tmp_path / "c", allow_random_init=True)
    monkeypatch.setattr(wds_store, "write_shard", real)
    resumed = build_tiny(tmp_path / "c", n=10, format="wds")
    assert resumed.shards_resumed == 1 and resumed.manifest["counts"]["images"] == 10


def test_mask_values_beyond_dtype_name_the_fix(tmp_path):
    class BigMasks(FakeSource):
        def val_sample(self, index):
            s = super().val_sample(index)
            s.class_mask[0, 0] = 300
            return s
    spec = tiny_spec(tmp_path, "val")
    with pytest.raises(CacheError, match="--mask-dtype int16"):
        build_cache(BigMasks(2, "val"), tiny_encoder(), spec, tmp_path / "c", device="cpu", progress=False)
    spec = tiny_spec(tmp_path, "val", mask_dtype="int16")
    r = build_cache(BigMasks(2, "val"), tiny_encoder(), spec, tmp_path / "d", device="cpu", progress=False)
    assert next(iter(open_cache(r.path, allow_random_init=True).eval_reader(2)))["class_mask"][0, 0, 0] == 300


# ----------------------------------------------------------------------------- readers

def _order(reader):
    return [(i, v) for b in reader for i, v in zip(b["index"].tolist(), b["view"].tolist())]


def test_train_reader_is_deterministic_per_seed_and_epoch(tmp_path):
    path = build_tiny(tmp_path / "c", n=40, chunk_images=4).path
    cache = open_cache(path, allow_random_init=True)
    r = cache.train_reader(5, seed=3, rank=0, world_size=1)
    e0 = _order(r)
    assert e0 == _order(cache.train_reader(5, seed=3, rank=0, world_size=1))
    r.set_epoch(1)
    e1 = _order(r)
    assert e1 != e0 and sorted(i for i, _ in e0) == sorted(i for i, _ in e1) == list(range(40))
    assert len({v for _, v in e0}) == 2                     # both views appear
    assert len(r) == 8 and all(b["features"].shape == (5, 16, 32) for b in r)
    assert e0 != _order(cache.train_reader(5, seed=4, rank=0, world_size=1))


def test_train_reader_ranks_are_disjoint_and_equal_length(tmp_path):
    path = build_tiny(tmp_path / "c", n=42, chunk_images=4, bad=(7,)).path
    cache = open_cache(path, allow_random_init=True)
    for epoch in (0, 1):
        parts = [_order(TrainReader(cache, 4, seed=0, epoch=epoch, rank=r, world_size=3)) for r in range(3)]
        index_sets = [{i for i, _ in p} for p in parts]
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) > 0   # same number of steps
        assert not (index_sets[0] & index_sets[1] or index_sets[0] & index_sets[2] or index_sets[1] & index_sets[2])
        assert 7 not in set.union(*index_sets)
        assert len(set.union(*index_sets)) >= 41 - 3 * 4 * 2   # at most a shard per rank left out


def test_early_break_stops_the_prefetch_thread(caches):
    import threading
    cache = open_cache(caches["zarr"]["train"], allow_random_init=True)
    for b in cache.train_reader(2, rank=0, world_size=1, prefetch=1):
        break
    assert not any(t.name.startswith(("cache-prefetch", "cache-read")) and t.is_alive() for t in threading.enumerate())


# ----------------------------------------------------------------------------- CLI

def _cli(*args):
    from spot_fast.cli.app import app
    return CliRunner().invoke(app, ["cache", *map(str, args)])


def test_cli_info_and_verify_detects_tampering(tmp_path, caches):
    import shutil
    for fmt in ("zarr", "wds"):
        path = tmp_path / fmt
        shutil.copytree(caches[fmt]["val"], path)
        res = _cli("info", path)
        assert res.exit_code == 0, res.output
        assert "fake / val" in res.output and "RANDOM-INIT" in res.output and "img5.jpg" in res.output
        res = _cli("verify", path)
        assert res.exit_code == 0 and "ok:" in res.output, res.output
        victim = path / ("features/c/1/0/0/0" if fmt == "zarr" else "shard-00001.tar")
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        res = _cli("verify", path)
        assert res.exit_code == 1 and "shard 1" in res.output and victim.name in res.output, res.output
        assert "Traceback" not in res.output


def test_cli_reports_missing_cache_without_traceback(tmp_path):
    for cmd in ("info", "verify"):
        res = _cli(cmd, tmp_path / "nothing")
        assert res.exit_code == 2 and "error: no cache at" in res.output and "Traceback" not in res.output


def test_cli_already_cached_does_no_work(tmp_path):
    """The content key of the CLI's spec equals the API's: the rerun stops before opening the dataset.
    `--preset tiny` includes the preset's split block (2), so the API cache has it too."""
    out = tmp_path / "c"
    spec = tiny_spec(tmp_path / "data", dataset="folder", split_block=2)
    build_cache(FakeSource(3), tiny_encoder(), spec, out, device="cpu", progress=False)
    res = _cli("folder", "--root", tmp_path / "data", "--split", "train", "--preset", "tiny", "--random-init",
               "--chunk-images", 4, "--mask-size", 16, "--out", out)
    assert res.exit_code == 0 and "already cached" in res.output, res.output


def test_cli_missing_weights_says_where_to_put_them(tmp_path, monkeypatch):
    import spot_fast.encoders as encoders
    monkeypatch.setattr(encoders, "find_local_weights", lambda cfg: None)
    res = _cli("coco", "--root", tmp_path, "--encoder", "dino_vitb16")
    assert res.exit_code == 2 and "no weights found" in res.output and "--weights" in res.output
    assert "Traceback" not in res.output
    res = _cli("coco", "--root", tmp_path, "--encoder", "dino_vitb16", "--weights", tmp_path / "w.pth")
    assert res.exit_code == 2 and "w.pth: no such file" in res.output


def test_cli_bad_options_are_one_line(tmp_path):
    for args, expect in [(["--format", "hdf5"], "--format"), (["--dtype", "int4"], "--dtype"),
                         (["--encoder", "resnet"], "unknown encoder"), (["--split-block", "9"], "--split-block 9"),
                         (["--split", "test"], "--split")]:
        res = _cli("coco", "--root", tmp_path, "--preset", "tiny", "--random-init", *args)
        assert res.exit_code == 2 and expect in res.output and "Traceback" not in res.output, (args, res.output)


def test_manifest_is_complete_and_deterministic(caches):
    m = read_manifest(caches["zarr"]["val"])
    for key in ("schema_version", "dataset", "split", "encoder", "weights", "image_size", "patch_size", "grid",
                "views", "views_spec", "layers", "dtype", "counts", "skipped", "shards", "spot_fast_version"):
        assert key in m
    assert m["weights"] == "random-init:0" and m["random_init"] and m["layers"]["split_block"] == 2
    assert all(len(sha) == 64 for s in m["shards"] for sha in s["files"].values())
    assert "created" not in json.dumps(m)


def test_raw_chunk_reads_equal_the_zarr_api(caches):
    """The np.fromfile fast path (uncompressed chunks) against zarr's own decoding, edge chunk included."""
    from spot_fast.cache.zarr_store import ZarrStore
    for split in ("train", "val"):
        m = read_manifest(caches["zarr"][split])
        ref = ZarrStore(caches["zarr"][split], m["arrays"], raw=False)
        fast = ZarrStore(caches["zarr"][split], m["arrays"], chunk_images=m["chunk_images"], raw=True)
        for s in m["shards"]:
            a, b = ref.read(s["index"], s["start"], s["stop"]), fast.read(s["index"], s["start"], s["stop"])
            assert a.rows.tolist() == b.rows.tolist() and a.image_ids == b.image_ids and a.jpeg == b.jpeg
            for name in ("features", "split_tokens", "instance_mask", "class_mask", "ignore_mask"):
                va, vb = getattr(a, name), getattr(b, name)
                assert (va is None and vb is None) or (va.dtype == vb.dtype and np.array_equal(va, vb))


def test_reader_can_keep_the_stored_dtype(caches):
    cache = open_cache(caches["zarr"]["train"], allow_random_init=True)
    half = next(iter(cache.train_reader(3, rank=0, world_size=1, dtype=None)))
    full = next(iter(cache.train_reader(3, rank=0, world_size=1)))
    assert half["features"].dtype == torch.float16 and full["features"].dtype == torch.float32
    assert torch.equal(half["features"].float(), full["features"])


def test_webdataset_reader_ranks_are_disjoint(caches):
    cache = open_cache(caches["wds"]["train"], allow_random_init=True)
    parts = [_order(cache.wds_reader(2, seed=1, rank=r, world_size=3)) for r in range(3)]
    sets = [{i for i, _ in p} for p in parts]
    assert len({len(p) for p in parts}) == 1 and sum(map(len, sets)) == len(set.union(*sets))


def test_interrupted_preparation_starts_over(tmp_path):
    """Killed while creating the metadata: the state says 'prepared': False, the rerun starts clean."""
    out = tmp_path / "c"
    out.mkdir()
    spec = tiny_spec("/fake/data")
    (out / ".build.json").write_text(json.dumps({"content_key": spec.key(), "spec": {}, "prepared": False}))
    (out / "zarr.json").write_text("{half")
    result = build_tiny(out, n=3)
    assert result.manifest["counts"]["images"] == 3 and not (out / ".build.json").exists()


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_shard_of_only_corrupt_images(tmp_path, fmt):
    from spot_fast.cache import verify
    result = build_tiny(tmp_path / "c", n=10, split="val", bad=(4, 5, 6, 7), format=fmt, split_block=2)
    cache = open_cache(result.path, allow_random_init=True)
    assert cache.manifest["shards"][1]["images"] == 0 and verify(result.path) == []
    empty = cache.read_shard(1)
    assert empty.features.shape == (0, 1, 16, 32) and empty.instance_mask.shape == (0, 16, 16)
    assert [i for b in cache.eval_reader(4) for i in b["index"].tolist()] == [0, 1, 2, 3, 8, 9]
