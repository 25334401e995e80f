"""8-bit caches (--dtype fp8 / int8): the codec's error bounds against fp64, what the readers return,
dequantisation on the device, the derived stage-2 targets, and integrity as for fp16.

Bounds are scale-aware: a token row x with s = max|x| / FORMAT_MAX stores each value with an error
of at most s / 2 (int8: a rounding step is s) or |x| * 2^-4 + s * 2^-10 (e4m3: 3 mantissa bits,
subnormal step 2^-9 s); both plus the fp32 arithmetic's own error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import FakeSource, build_tiny, tiny_encoder, tiny_spec  # noqa: E402

from spot_fast.cache import CacheError, FrozenTail, device_batches, open_cache, verify  # noqa: E402
from spot_fast.config import preset  # noqa: E402
from spot_fast.cache.codec import dequantize, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FP32_EPS = 2.0 ** -23


def bound(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The largest error 8-bit storage may leave in each value of x (..., D), from its row's scale."""
    s = x.abs().amax(-1, keepdim=True) / (127.0 if dtype == "int8" else 448.0)
    quant = s / 2 if dtype == "int8" else x.abs() * 2.0 ** -4 + s * 2.0 ** -10
    return quant + 4 * FP32_EPS * x.abs().amax(-1, keepdim=True)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_codec_error_is_within_the_format_bound_vs_fp64(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None]
    x[5] = 0                                                           # an all-zero row
    x[7, 3] = 1e4                                                      # one outlier in a row
    q, s = quantize(x.float(), dtype)
    assert q.dtype == (torch.int8 if dtype == "int8" else torch.float8_e4m3fn) and s.shape == (64, 1)
    y = dequantize(q, s, torch.float32).double()
    err = (y - x).abs()
    assert (err <= bound(x, dtype)).all(), float((err - bound(x, dtype)).max())
    assert (y[5] == 0).all() and s[5] == 0
    # each row's largest value lands on the format's largest: the whole 8-bit range is used
    top = q.float().abs().amax(-1)
    assert torch.equal(top[torch.arange(64) != 5], torch.full((63,), 127.0 if dtype == "int8" else 448.0))
    # rounding, not truncation: int8 errors are centred on 0 (a biased codec fails this)
    if dtype == "int8":
        rel = ((y - x) / s.double())[torch.arange(64) != 5]
        assert abs(float(rel.mean())) < 0.02


def test_dequantize_in_the_compute_dtype():
    q = torch.tensor([[-127, 0, 64, 127]], dtype=torch.int8)
    s = torch.tensor([[0.5]])
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        y = dequantize(q, s, dt)
        assert y.dtype == dt and torch.equal(y.float(), torch.tensor([[-63.5, 0.0, 32.0, 63.5]]))
    f = torch.tensor([[1.5, -448.0]]).to(torch.float8_e4m3fn)
    assert torch.equal(dequantize(f, torch.tensor([[2.0]]), torch.bfloat16).float(), torch.tensor([[3.0, -896.0]]))


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """(fmt, dtype) -> a train cache of 6 images, split tokens at block 2, shards of 4."""
    root = tmp_path_factory.mktemp("q8")
    return {(fmt, dt): build_tiny(root / f"{fmt}-{dt}", n=6, format=fmt, dtype=dt, split_block=2, chunk_images=4).path
            for fmt in ("zarr", "wds") for dt in ("int8", "fp8")}


def encoder_tokens(n: int = 6):
    """Final and split tokens of every (image, view) of FakeSource(n), from the encoder itself, fp32."""
    src = FakeSource(n)
    views = torch.stack([src.train_views(i) for i in range(n)]).flatten(0, 1)     # (n*2, 3, S, S)
    with torch.no_grad():
        t = tiny_encoder()(views, split_block=2)
    return t.final.double(), t.split.double()


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_readers_return_stored_bytes_and_device_dequantises(q8, fmt, dtype):
    cache = open_cache(q8[fmt, dtype], allow_random_init=True)
    final, split = encoder_tokens()
    batch = next(iter(cache.train_reader(6, drop_last=False, dtype=None)))
    want = torch.int8 if dtype == "int8" else torch.float8_e4m3fn
    assert batch["features"].dtype == want and batch["split_tokens"].dtype == want
    assert batch["features_scale"].shape == (6, 16, 1) and batch["features_scale"].dtype == torch.float32
    dev = next(device_batches(iter([batch]), "cpu", torch.float32))
    assert "features_scale" not in dev and dev["features"].dtype == torch.float32
    rows = batch["index"] * 2 + batch["view"]
    x = split[rows]
    assert ((dev["split_tokens"].double() - x).abs() <= bound(x, dtype)).all()
    # the stored final tokens are the frozen tail applied to the stored split tokens (then 8-bit):
    # against the encoder's own final tokens they carry both roundings, so a loose, scale-aware bound
    f = final[rows]
    assert ((dev["features"].double() - f).norm(dim=-1) <= 0.1 * f.norm(dim=-1)).all()
    # the other readers agree with the device path exactly
    ev = next(iter(cache.eval_reader(6)))
    ref = cache.train_reader(6, drop_last=False, dtype=torch.float32)
    fl = next(iter(ref))
    torch.testing.assert_close(fl["features"], dev["features"], rtol=0, atol=0)
    torch.testing.assert_close(ev["features"], dequantize(*_view0(cache), torch.float32), rtol=0, atol=0)
    if fmt == "wds":
        w = next(iter(cache.wds_reader(6, drop_last=False, dtype=None, shuffle_buffer=1)))
        assert w["features"].dtype == want and "features_scale" in w
        wd = next(device_batches(iter([w]), "cpu", torch.float32))
        wrows = w["index"] * 2 + w["view"]
        assert ((wd["split_tokens"].double() - split[wrows]).abs() <= bound(split[wrows], dtype)).all()


def _view0(cache):
    """(q, s) of view 0 of every image, read with the shard API (not the readers)."""
    qs, ss = [], []
    for s in cache.shards:
        sh = cache.read_shard(s["index"])
        qs.append(torch.from_numpy(sh.features[:, 0].copy()))
        ss.append(torch.from_numpy(sh.features_scale[:, 0].copy()))
    q = torch.cat(qs)
    return (q.view(torch.float8_e4m3fn) if cache.dtype == "fp8" else q), torch.cat(ss)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_tail_consistency_of_derived_targets_is_the_final_rounding_only(q8, dtype):
    """8-bit final tokens are derived from the stored split tokens: the frozen tail applied to what
    stage 2 reads differs from the stored target only by the target's own 8-bit rounding."""
    cache = open_cache(q8["zarr", dtype], allow_random_init=True)
    b = next(device_batches(iter(cache.train_reader(6, drop_last=False, dtype=None)), "cpu", torch.float32))
    enc = tiny_encoder()
    x = b["split_tokens"]
    with torch.no_grad():
        for block in enc.vit.blocks[2:]:
            x = block(x)
    target = x[:, 1:].double()
    assert ((b["features"].double() - target).abs() <= bound(target, dtype) + 1e-5).all()
    rec = cache.manifest["stored_error"]
    assert set(rec) == {"final", "split", "tail"} and rec["tail"]["tokens"] == 6 * 2 * 16
    scales = np.concatenate([cache.read_shard(s["index"]).features_scale for s in cache.shards])
    worst = float(scales.max()) * (0.5 if dtype == "int8" else 448 * 2.0 ** -4 + 2.0 ** -10)
    assert 0 < rec["tail"]["max_abs"] <= worst + 1e-5


def test_manifest_records_the_format_and_the_key_includes_it(q8, tmp_path):
    m = open_cache(q8["zarr", "int8"], allow_random_init=True).manifest
    assert m["dtype"] == "int8" and m["quantization"]["format"] == "int8"
    assert m["arrays"]["features_scale"]["dtype"] == "float32"
    keys = {dt: tiny_spec("/fake/data", dtype=dt, split_block=2).key() for dt in ("fp16", "fp8", "int8")}
    assert len(set(keys.values())) == 3
    with pytest.raises(CacheError, match=r"--dtype: 'int8' -> 'fp8'"):
        build_tiny(q8["zarr", "int8"], n=6, dtype="fp8", split_block=2, chunk_images=4)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_damaged_scales_are_refused_and_listed_by_verify(q8, fmt, tmp_path):
    import shutil
    path = tmp_path / "c"
    shutil.copytree(q8[fmt, "int8"], path)
    rel = "features_scale/c/0/0/0/0" if fmt == "zarr" else "shard-00000.tar"
    data = bytearray((path / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / rel).write_bytes(bytes(data))
    assert any(rel in p for p in verify(path))
    with pytest.raises(CacheError, match="corrupt"):
        next(iter(open_cache(path, allow_random_init=True).train_reader(6, drop_last=False, dtype=None)))


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_non_finite_tokens_are_refused_naming_the_image(tmp_path, dtype):
    with pytest.raises(CacheError, match=r"image 1002 .*non-finite"):
        build_tiny(tmp_path / "c", n=4, dtype=dtype, scale={2: float("nan")})


def test_error_record_is_measured_against_the_encoder(q8):
    """The manifest's relative RMS equals one computed here from the encoder and the stored bytes."""
    cache = open_cache(q8["zarr", "int8"], allow_random_init=True)
    _, split = encoder_tokens()
    stored = torch.cat([torch.from_numpy(cache.read_shard(s["index"]).split_tokens.astype(np.float64)) *
                        torch.from_numpy(cache.read_shard(s["index"]).split_tokens_scale.astype(np.float64))
                        for s in cache.shards]).flatten(0, 1)                     # (n*2, T, D)
    rel = float((stored - split).norm() / split.norm())
    assert abs(cache.manifest["stored_error"]["split"]["rel_rms"] - rel) <= 1e-5 * rel
    assert json.loads(json.dumps(cache.manifest["stored_error"])) == cache.manifest["stored_error"]


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_targets_derived_on_the_device_are_tail_consistent(q8, dtype):
    """With `targets=FrozenTail`, the stage-2 target is the frozen tail of the split tokens the
    student reads: consistency 0, where the stored 8-bit target is off by its rounding."""
    cache = open_cache(q8["zarr", dtype], allow_random_init=True)
    tail = FrozenTail.from_cache(cache, preset("tiny").encoder)
    host = next(iter(cache.train_reader(6, drop_last=False, dtype=None)))
    clone = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in host.items()}
    derived = next(device_batches(iter([host]), "cpu", torch.float32, targets=tail))
    stored = next(device_batches(iter([clone]), "cpu", torch.float32))
    x = stored["split_tokens"]                              # the encoder's own blocks, independently
    with torch.no_grad():
        for block in tiny_encoder().vit.blocks[2:]:
            x = block(x)
    torch.testing.assert_close(derived["features"], x[:, 1:], rtol=1e-6, atol=1e-6)
    assert float((stored["features"] - x[:, 1:]).abs().max()) > 1e-4      # the stored target is not exact
    with pytest.raises(CacheError, match="split_block=1"):
        FrozenTail.from_cache(cache, preset("demo").encoder)


def test_compressed_8bit_cache_reads_the_same_as_uncompressed(q8, tmp_path):
    """zstd-compressed zarr goes through the zarr API (ZarrSlabs) for tokens and scales alike."""
    z = build_tiny(tmp_path / "z", n=6, dtype="int8", split_block=2, chunk_images=4, compression="zstd")
    a = next(iter(open_cache(z.path, allow_random_init=True).train_reader(6, drop_last=False, dtype=None, seed=3)))
    b = next(iter(open_cache(q8["zarr", "int8"], allow_random_init=True).train_reader(6, drop_last=False, dtype=None,
                                                                                       seed=3)))
    for k in ("features", "features_scale", "split_tokens", "split_tokens_scale", "index", "view"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", ["int8", "fp16"])
def test_stage2_batches_of_an_8bit_cache_carry_their_tail(q8, tmp_path, dtype):
    """The trainer's data path (CacheBatches -> device_batches): on an 8-bit cache the stage-2 target is
    the frozen tail of the split tokens the step reads; an fp16 cache keeps its stored final tokens."""
    from spot_fast.train.data import CacheBatches
    path = q8["zarr", "int8"] if dtype == "int8" else build_tiny(tmp_path / "c", n=6, split_block=2, chunk_images=4).path
    cache = open_cache(path, allow_random_init=True)
    data = CacheBatches(cache, 3, seed=0, rank=0, world_size=1, drop_last=True, split_tokens=True)
    plain = CacheBatches(cache, 3, seed=0, rank=0, world_size=1, drop_last=True, split_tokens=False)
    for b, p in zip(device_batches(data.epoch(1), "cpu"), device_batches(plain.epoch(1), "cpu")):
        x = b["split_tokens"]
        with torch.no_grad():
            for block in tiny_encoder().vit.blocks[2:]:
                x = block(x)
        assert "targets" not in b and torch.equal(b["index"], p["index"])
        if dtype == "int8":
            torch.testing.assert_close(b["features"], x[:, 1:], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(b["features"], p["features"])       # stored tokens, untouched
    assert (data.targets is None) == (dtype == "fp16")


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_reader_scales_are_the_stored_rows_over_uneven_shards_and_skipped_images(tmp_path, fmt):
    """Every (image, view) of two epochs, batches of 3 over 9 stored images in shards of 4, 4, 2 (one
    image skipped): the batch's bytes and scales equal the shard API's rows (scales held in memory
    for zarr, gathered from the tars for WebDataset)."""
    path = build_tiny(tmp_path / "c", n=10, bad=(5,), format=fmt, dtype="int8", split_block=2,
                      chunk_images=4).path
    cache = open_cache(path, allow_random_init=True)
    rows = {}
    for s in cache.shards:
        sh = cache.read_shard(s["index"])
        for i, row in enumerate(sh.rows.tolist()):
            rows[row] = {n: getattr(sh, n)[i] for n in ("features", "features_scale", "split_tokens",
                                                         "split_tokens_scale")}
    assert len(rows) == 9 and 5 not in rows
    seen = set()
    for epoch in (0, 1):
        for batch in cache.train_reader(3, epoch=epoch, drop_last=False, dtype=None):
            for i, (row, view) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist())):
                for n, want in rows[row].items():
                    np.testing.assert_array_equal(batch[n][i].numpy(), want[view], err_msg=f"{n} {row} {view}")
                seen.add((epoch, row))
    assert len(seen) == 18


def test_cold_reads_and_reads_without_mincore_equal_warm_reads(q8, monkeypatch):
    """Slabs whose first page is not in the page cache are advised before the copy (cold reads
    overlap); where libc's mincore cannot be called every slab is advised. Either way the bytes
    are the same."""
    import os
    from spot_fast.cache import slabs

    path = q8["zarr", "int8"]
    warm = next(iter(open_cache(path, allow_random_init=True).train_reader(6, drop_last=False, dtype=None)))
    for f in Path(path).rglob("c/*/*/*/*"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    cold = next(iter(open_cache(path, allow_random_init=True).train_reader(6, drop_last=False, dtype=None)))
    monkeypatch.setattr(slabs, "_LIBC", None)
    plain = next(iter(open_cache(path, allow_random_init=True).train_reader(6, drop_last=False, dtype=None)))
    for name in ("features", "features_scale", "split_tokens", "split_tokens_scale"):
        assert torch.equal(cold[name].view(torch.uint8), warm[name].view(torch.uint8))
        assert torch.equal(plain[name].view(torch.uint8), warm[name].view(torch.uint8))


def test_residency_says_a_read_page_is_resident(q8):
    from spot_fast.cache import slabs

    if slabs._LIBC is None:
        pytest.skip("no libc mincore here")
    cache = open_cache(q8["zarr", "int8"], allow_random_init=True)
    m = slabs.zarr_slabs(cache, "features")
    assert int(m.maps[0][:4096].sum()) >= 0             # touch the first page
    assert m.resident(0, 0)


def test_stage2_batches_streamed_from_an_8bit_cache_carry_their_tail(q8):
    """`train --stream` (StreamBatches, as `open_stream` makes it) on an 8-bit WebDataset cache: the
    stage-2 target is the frozen tail (the encoder's own blocks here) of the split tokens the step reads."""
    from spot_fast.train.data import StreamBatches, stage2_targets
    cache = open_cache(q8["wds", "int8"], allow_random_init=True)
    data = StreamBatches(cache.shard_urls(), cache.manifest, 2, seed=0, split_tokens=True,
                         targets=stage2_targets(cache, True))
    blocks = tiny_encoder().vit.blocks[2:]
    n = 0
    for b in device_batches(data.epoch(0), "cpu"):
        x = b["split_tokens"]
        with torch.no_grad():
            for block in blocks:
                x = block(x)
        torch.testing.assert_close(b["features"], x[:, 1:], rtol=1e-6, atol=1e-6)
        n += 1
    assert n == len(data) > 0
    assert stage2_targets(cache, False) is None


def test_a_cold_slab_whose_first_page_a_neighbour_brought_in_is_still_advised(tmp_path):
    """Slabs are not page-aligned: the page a slab starts on also holds the end of the slab before
    it. After that neighbour is read, the slab's own pages are still cold, and `advise` must still
    start reading them (it probes a page the slab owns, not its first)."""
    import mmap as mm
    import os
    import time
    from spot_fast.cache import slabs

    if slabs._LIBC is None:
        pytest.skip("no libc mincore here")
    P = mm.PAGESIZE
    L, D = 3, P // 2 + 50                                  # 1-byte items: a slab of 1.5 pages + 150 bytes
    nbytes, count = L * D, 64
    path = tmp_path / "slabs.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, nbytes * count, dtype=np.uint8).tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with open(path, "rb") as f:
            m = mm.mmap(f.fileno(), 0, access=mm.ACCESS_COPY)
        mapped = slabs.MappedSlabs([m], np.zeros(count, np.int64), np.arange(count) * nbytes, (L, D), "int8")
        target = next(s for s in range(1, count) if (s * nbytes) % P)      # starts inside a page
        start = target * nbytes
        own = slabs.owned_page(start, nbytes)
        if mapped.resident(0, own):
            pytest.skip("this file system keeps the file in memory (no cold pages to test)")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, nbytes, start - nbytes)                 # the neighbour is read: the shared page too
        first = start - start % P
        assert mapped.resident(0, first) and not mapped.resident(0, own)
        mapped.advise(np.array([target]), np.array([0]))
        deadline = time.monotonic() + 5                     # the advice reads in the background
        while not mapped.resident(0, own) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mapped.resident(0, own)
        out = torch.empty((1, L, D), dtype=torch.int8)
        mapped.fill(out, np.array([target]), np.array([0]), advise=False)
        assert out.view(torch.uint8).numpy().tobytes() == path.read_bytes()[start:start + nbytes]
    finally:
        os.close(fd)


def test_owned_page_lies_inside_the_slab():
    import mmap as mm
    from spot_fast.cache.slabs import owned_page

    P = mm.PAGESIZE
    for start, n in [(0, P), (1, 2 * P), (P - 1, P + 1), (5 * P + 7, 3 * P), (10, P)]:
        page = owned_page(start, n)
        if page is None:
            assert -(-start // P) * P + P > start + n
        else:
            assert page % P == 0 and start <= page and page + P <= start + n
