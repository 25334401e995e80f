"""TrainReader through real caches: exactly once per epoch, a global shuffle, resume, the bytes zarr/webdataset read.

References are independent of the fast path: zarr.open (the zarr library's own decoding) for
zarr caches, the webdataset library's tar reader for WebDataset caches.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import build_tiny  # noqa: E402

from spot_fast.cache import CacheError, device_batches, epoch_batches, open_cache, verify  # noqa: E402
from spot_fast.cache import wds_store  # noqa: E402

# (images, chunk images, corrupt rows, format, compression): uneven last shards, skipped rows
LAYOUTS = {"zarr-20-4": (20, 4, (), "zarr", None), "zarr-13-5-bad": (13, 5, (2, 9), "zarr", None),
           "wds-7-3": (7, 3, (), "wds", None), "zstd-11-4": (11, 4, (1,), "zarr", "zstd")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    out = {}
    for name, (n, chunk, bad, fmt, compression) in LAYOUTS.items():
        out[name] = build_tiny(root / name, n=n, chunk_images=chunk, bad=bad, format=fmt, split_block=2,
                               compression=compression).path
    return out


class Reference:
    """(row, view) -> stored slab, decoded by the zarr / webdataset libraries (not the fast path)."""

    def __init__(self, path: Path):
        self.manifest = json.loads((path / "manifest.json").read_text())
        if self.manifest["format"] == "zarr":
            group = zarr.open_group(str(path), mode="r")
            self.arrays = {n: group[n][:] for n in ("features", "split_tokens")}
        else:
            samples = [s for k in range(len(self.manifest["shards"]))
                       for s in wds_store.iter_tar(path / wds_store.shard_name(k))]
            self.arrays = {n: {row: s[n] for row, s in samples} for n in ("features", "split_tokens")}

    def slab(self, name: str, row: int, view: int) -> np.ndarray:
        return np.asarray(self.arrays[name][row][view])


def _rows(reader):
    return [(b["index"].tolist(), b["view"].tolist()) for b in reader]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_once_per_epoch_and_true_length(caches, layout, batch, world):
    cache = open_cache(caches[layout], allow_random_init=True)
    n, _, bad, _, _ = LAYOUTS[layout]
    stored = sorted(set(range(n)) - set(bad))
    readers = [cache.train_reader(batch, seed=1, epoch=2, rank=r, world_size=world, drop_last=False)
               for r in range(world)]
    got = [_rows(r) for r in readers]
    assert {len(g) for g in got} == {len(readers[0])}          # same steps on every rank, len is true
    rows = [i for g in got for idx, _ in g for i in idx]
    assert len(rows) == len(set(rows)) and set(rows) <= set(stored)
    assert len(stored) - len(rows) == readers[0].dropped <= world - 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("slab_path", ["gather", "per-slab"])
def test_values_are_the_stored_slabs(caches, layout, slab_path, monkeypatch):
    """Every (image, view) the fast path yields equals what zarr.open / webdataset decode, in the stored
    dtype (dtype=None) and converted to float32; split tokens too; image ids match the rows. The
    tiny preset's slabs (1 KB) are gathered; `per-slab` takes the path of real slabs (>= 4 KB: a
    residency check, advice, one copy per slab)."""
    from spot_fast.cache import slabs
    if slab_path == "per-slab":
        monkeypatch.setattr(slabs, "SMALL_SLAB", 0)
    path = caches[layout]
    cache, ref = open_cache(path, allow_random_init=True), Reference(path)
    ids = dict(zip(cache.samples.rows.tolist(), cache.samples.image_ids))
    for dtype in (None, torch.float32):
        for b in cache.train_reader(3, seed=0, epoch=1, drop_last=False, dtype=dtype):
            assert b["features"].dtype == (torch.float16 if dtype is None else torch.float32)
            for i, (row, view) in enumerate(zip(b["index"].tolist(), b["view"].tolist())):
                for name in ("features", "split_tokens"):
                    want = ref.slab(name, row, view).astype(np.float32)
                    np.testing.assert_array_equal(b[name][i].float().numpy(), want)
                assert b["image_id"][i] == ids[row] == 1000 + row


def test_views_follow_the_sampler(caches):
    cache = open_cache(caches["zarr-13-5-bad"], allow_random_init=True)
    plan = epoch_batches(len(cache.samples), 4, seed=5, epoch=3, num_views=2)
    got = _rows(cache.train_reader(4, seed=5, epoch=3, drop_last=False))
    assert got == [(cache.samples.rows[s].tolist(), v.tolist()) for s, v in plan]
    assert {v for _, vs in got for v in vs} == {0, 1}


def test_same_seed_epoch_same_batches_and_resume_mid_epoch(caches):
    cache = open_cache(caches["zarr-20-4"], allow_random_init=True)
    full = _rows(cache.train_reader(3, seed=7, epoch=4, drop_last=False))
    assert full == _rows(cache.train_reader(3, seed=7, epoch=4, drop_last=False))
    assert full != _rows(cache.train_reader(3, seed=7, epoch=5, drop_last=False))
    resumed = cache.train_reader(3, seed=7, epoch=4, drop_last=False, start_step=4)
    assert len(resumed) == len(full) == 7                        # true batch count, not the remainder
    assert _rows(resumed) == full[4:]
    assert _rows(cache.train_reader(3, seed=7, epoch=4, start_step=7, drop_last=False)) == []


def test_batches_draw_from_across_the_cache(tmp_path):
    """A global shuffle: batches of 8 out of 10 shards of 4 touch ~5.7 shards on average (a window
    of 4 shards at most 4) and span most of the rows."""
    cache = open_cache(build_tiny(tmp_path / "c", n=40, chunk_images=4).path, allow_random_init=True)
    batches = [b["index"].numpy() for b in cache.train_reader(8, seed=0, epoch=0)]
    shards = [len(np.unique(idx // 4)) for idx in batches]
    assert np.mean(shards) > 4.5 and max(shards) >= 6
    assert np.mean([idx.max() - idx.min() for idx in batches]) > 25


def test_two_held_batches_stay_intact(caches):
    """The ring holds prefetch + 2 buffers: the current and the previous batch are never overwritten."""
    path = caches["zarr-20-4"]
    cache, ref = open_cache(path, allow_random_init=True), Reference(path)
    previous = None
    for b in cache.train_reader(2, seed=0, prefetch=1, workers=2, dtype=None):
        for held in (previous, b):
            if held is not None:
                for i, (row, view) in enumerate(zip(held["index"].tolist(), held["view"].tolist())):
                    np.testing.assert_array_equal(held["features"][i].numpy(), ref.slab("features", row, view))
        previous = b


def test_batch_larger_than_the_cache_is_a_clear_error(caches):
    cache = open_cache(caches["wds-7-3"], allow_random_init=True)
    with pytest.raises(CacheError, match="drop_last=False or a batch size <= 7"):
        cache.train_reader(100, drop_last=True)
    assert [len(i) for i, _ in _rows(cache.train_reader(100, drop_last=False))] == [7]
    with pytest.raises(CacheError, match="fewer than the 8 ranks"):
        cache.train_reader(1, rank=0, world_size=8, drop_last=False)
    with pytest.raises(ValueError, match="batch_size"):
        cache.train_reader(0)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_first_read_check_refuses_a_flipped_byte(tmp_path, fmt):
    path = build_tiny(tmp_path / "c", n=8, chunk_images=4, format=fmt).path
    cache = open_cache(path, allow_random_init=True)
    rel = cache.shard_file(1, "features")
    data = bytearray((path / rel).read_bytes())
    data[len(data) // 2] ^= 0x40
    (path / rel).write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"shard 1 \(images 4..7\): {rel} is corrupt.*cache verify"):
        list(open_cache(path, allow_random_init=True).train_reader(2))
    with pytest.raises(CacheError, match="is corrupt"):      # the eval reader checks too
        list(open_cache(path, allow_random_init=True).eval_reader(2))
    if fmt == "wds":                                          # and the stream, before streaming
        with pytest.raises(CacheError, match="is corrupt"):
            open_cache(path, allow_random_init=True).wds_reader(2)


def test_edited_manifest_is_detected(tmp_path):
    path = build_tiny(tmp_path / "c", n=6).path
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["counts"]["images"] = 60
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with pytest.raises(CacheError, match="modified after the build"):
        open_cache(path, allow_random_init=True)
    assert any("modified after the build" in p for p in verify(path))


def test_device_batches_on_cpu_cast_tokens_only(caches):
    cache = open_cache(caches["zarr-20-4"], allow_random_init=True)
    host = list(b for b in cache.train_reader(4, dtype=None, prefetch=4))[:1]   # hold one: clone first
    host = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in host[0].items()}]
    (out,) = list(device_batches(host, "cpu", torch.bfloat16))
    assert out["features"].dtype == out["split_tokens"].dtype == torch.bfloat16
    assert out["index"].dtype == torch.int64 and out["image_id"] == host[0]["image_id"]
    torch.testing.assert_close(out["features"], host[0]["features"].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.gpu
def test_device_batches_on_cuda_equal_the_host_batches(caches):
    cache = open_cache(caches["zarr-20-4"], allow_random_init=True)
    ref = Reference(caches["zarr-20-4"])
    n = 0
    for b in device_batches(cache.train_reader(3, dtype=None, drop_last=False), "cuda", torch.float32):
        assert b["features"].is_cuda and b["features"].dtype == torch.float32
        for i, (row, view) in enumerate(zip(b["index"].tolist(), b["view"].tolist())):
            want = torch.from_numpy(ref.slab("features", row, view).astype(np.float32))
            torch.testing.assert_close(b["features"][i].cpu(), want, rtol=0, atol=0)
        n += len(b["index"])
    assert n == 20


def test_wds_stream_views_use_the_epoch_being_iterated(caches):
    """Without a manifest, views are drawn per (seed, epoch, row): set_epoch after iter() must not leak in."""
    from spot_fast.cache import WdsReader
    cache = open_cache(caches["wds-7-3"], allow_random_init=True)

    def reader():
        return WdsReader(cache.shard_urls(), 2, seed=3, epoch=0, rank=0, world_size=1, num_views=2,
                         drop_last=False, shuffle_buffer=1)

    want = sorted((i, v) for b in reader() for i, v in zip(b["index"].tolist(), b["view"].tolist()))
    r = reader()
    it = iter(r)
    r.set_epoch(5)
    got = sorted((i, v) for b in it for i, v in zip(b["index"].tolist(), b["view"].tolist()))
    assert got == want and {v for _, v in want} == {0, 1}


def test_every_batch_is_advised_once_before_it_is_copied(caches, monkeypatch):
    """Cold reads overlap: the first ADVISE_AHEAD batches advise themselves, batch j advises batch
    j + ADVISE_AHEAD before its own copy; so every batch's slabs are advised once, before their copy."""
    from spot_fast.cache import slabs, train_reader
    monkeypatch.setattr(slabs, "SMALL_SLAB", 0)
    events = []
    real_advise, real_fill = slabs.MappedSlabs.advise, slabs.MappedSlabs.fill

    def advise(self, samples, views):
        if self.name == "features":
            events.append(("advise", tuple(samples.tolist())))
        return real_advise(self, samples, views)

    def fill(self, out, samples, views, advise=True):
        real_fill(self, out, samples, views, advise)          # (its own advice, when asked, comes first)
        if self.name == "features":
            events.append(("copy", tuple(samples.tolist())))
    monkeypatch.setattr(slabs.MappedSlabs, "advise", advise)
    monkeypatch.setattr(slabs.MappedSlabs, "fill", fill)
    cache = open_cache(caches["zarr-20-4"], allow_random_init=True)
    reader = cache.train_reader(2, seed=0, epoch=0, drop_last=False, split_tokens=False, workers=1, prefetch=1)
    for s in reader.slabs.values():
        s.name = "features"
    batches = [tuple(b["index"].tolist()) for b in reader]
    assert len(batches) > train_reader.ADVISE_AHEAD + 2
    rows = cache.samples.rows
    advised = [e[1] for e in events if e[0] == "advise"]
    assert sorted(advised) == sorted(e[1] for e in events if e[0] == "copy")          # each batch once
    for s in {e[1] for e in events}:
        assert events.index(("advise", s)) < events.index(("copy", s))
    assert [tuple(rows[list(e[1])].tolist()) for e in events if e[0] == "copy"] == batches
