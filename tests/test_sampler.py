"""The epoch sampler: exactly once per epoch, true batch counts, ranks that add up, a global shuffle."""
import numpy as np
import pytest

from spot_fast.cache.sampler import dropped_samples, epoch_batches, num_batches, sample_views


def _all_ranks(n, b, world, drop_last, seed=0, epoch=0, views=1):
    return [epoch_batches(n, b, seed=seed, epoch=epoch, rank=r, world_size=world,
                          drop_last=drop_last, num_views=views) for r in range(world)]


def _check_epoch(n, b, world, drop_last, seed, epoch, views):
    """Every invariant of one epoch of every rank; returns which regime the case fell in."""
    ranks = _all_ranks(n, b, world, drop_last, seed, epoch, views)
    G = b * world
    steps = num_batches(n, b, world_size=world, drop_last=drop_last)
    # every rank takes the same number of steps, the count num_batches gives
    assert all(len(bs) == steps for bs in ranks), "every rank must take the same number of steps"
    # within a step all ranks hold the same number of samples, at most b, never zero; full steps hold b
    for i, step in enumerate(zip(*ranks)):
        sizes = {len(r) for r, _ in step}
        assert len(sizes) == 1 and 0 < sizes.pop() <= b
        if i < n // G:
            assert all(len(r) == b for r, _ in step)
    # no sample twice in an epoch, across ranks; only real rows; int64
    rows = np.concatenate([r for bs in ranks for r, _ in bs]) if steps else np.zeros(0, np.int64)
    assert rows.dtype == np.int64 and len(np.unique(rows)) == len(rows), "a sample was read twice"
    assert set(rows.tolist()) <= set(range(n))
    missing = n - len(rows)
    assert missing == dropped_samples(n, b, world_size=world, drop_last=drop_last)
    if drop_last:      # full global batches only: the n % G left over are not read
        assert steps == n // G and all(len(r) == b for bs in ranks for r, _ in bs) and missing == n % G
    else:              # at most world - 1 samples go unread (none on one rank)
        assert missing <= world - 1 and missing == (n % G) % world
    # step i of every rank, concatenated in rank order, is step i of one rank with batch G
    single = epoch_batches(n, G, seed=seed, epoch=epoch, drop_last=drop_last, num_views=views)
    for i, step in enumerate(zip(*ranks)):
        got_rows = np.concatenate([r for r, _ in step])
        np.testing.assert_array_equal(got_rows, single[i][0][:len(got_rows)])
        np.testing.assert_array_equal(np.concatenate([v for _, v in step]), single[i][1][:len(got_rows)])
    # the view of a sample is the epoch's per-sample draw, whichever rank and step read it
    every_view = sample_views(n, views, seed=seed, epoch=epoch)
    assert all(np.array_equal(v, every_view[r]) and ((v >= 0) & (v < views)).all() for bs in ranks for r, v in bs)
    # deterministic in (seed, epoch)
    again = _all_ranks(n, b, world, drop_last, seed, epoch, views)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
               for bs, bs2 in zip(ranks, again) for x, y in zip(bs, bs2))
    tail = not drop_last and (n % G) // world > 0
    return {"empty": steps == 0, "short tail": tail, "unread": missing > 0, "exact": n > 0 and n % G == 0,
            "drop_last": drop_last, "several ranks": world > 1 and steps > 1}


def test_epoch_invariants_over_random_cases():
    """A seeded property test: 400 random (n, batch, world, drop_last, seed, epoch, views)."""
    rng = np.random.default_rng(20261202)
    seen = dict.fromkeys(("empty", "short tail", "unread", "exact", "drop_last", "several ranks"), 0)
    for _ in range(400):
        world = int(rng.integers(1, 6))
        b = int(rng.choice([1, 2, 3, 8, int(rng.integers(1, 70))]))
        n = int(rng.integers(0, 3 * b * world + 10))
        case = dict(n=n, b=b, world=world, drop_last=bool(rng.integers(2)), seed=int(rng.integers(2**31)),
                    epoch=int(rng.integers(100)), views=int(rng.integers(1, 5)))
        try:
            for regime, hit in _check_epoch(**case).items():
                seen[regime] += hit
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from e
    assert min(seen.values()) >= 20, seen      # every regime was drawn often enough to mean something


def test_matches_the_documented_recipe():
    """Rows and views are the api's formulas, written out here independently."""
    n, b, world, seed, epoch = 53, 4, 3, 11, 2     # 4 full steps of 12, then 5 left: 1 per rank
    perm = np.random.default_rng([seed, epoch, 1]).permutation(n)
    views = np.random.default_rng([seed, epoch, 2]).integers(2, size=n)
    for r in range(world):
        got = epoch_batches(n, b, seed=seed, epoch=epoch, rank=r, world_size=world, num_views=2)
        want = [perm[i * 12 + r * b: i * 12 + (r + 1) * b] for i in range(4)] + [perm[48 + r: 49 + r]]
        assert len(got) == 5
        for (rows, v), w in zip(got, want):
            np.testing.assert_array_equal(rows, w)
            np.testing.assert_array_equal(v, views[w])
            assert rows.dtype == np.int64 and v.dtype == np.int64
    assert dropped_samples(n, b, world_size=world) == 2
    # 50 samples: the 2 left after 4 full steps give 0 per rank, so that step does not exist
    assert num_batches(50, b, world_size=world) == 4


def test_same_seed_epoch_same_batches_and_new_epoch_new_order():
    a = epoch_batches(1000, 32, seed=7, epoch=3, num_views=2)
    b = epoch_batches(1000, 32, seed=7, epoch=3, num_views=2)
    c = epoch_batches(1000, 32, seed=7, epoch=4, num_views=2)
    d = epoch_batches(1000, 32, seed=8, epoch=3, num_views=2)
    for (ra, va), (rb, vb) in zip(a, b):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(a[0][0], c[0][0]) and not np.array_equal(a[0][0], d[0][0])


def test_views_are_drawn_per_sample():
    got = epoch_batches(2000, 100, seed=0, epoch=0, num_views=4)
    views = np.concatenate([v for _, v in got])
    assert set(views.tolist()) == {0, 1, 2, 3}
    assert np.all(np.bincount(views) > 400)   # ~500 each
    assert all((v == 0).all() for _, v in epoch_batches(50, 8, seed=0, epoch=0, num_views=1))


def test_batches_span_the_whole_cache():
    """A global shuffle: one batch of 64 out of 10,000 rows is spread over the whole range,
    not a few windows of consecutive rows."""
    n, b = 10_000, 64
    for rows, _ in epoch_batches(n, b, seed=0, epoch=0)[:20]:
        s = np.sort(rows)
        assert s[-1] - s[0] > n // 2
        assert len(np.unique(s // 100)) > 30   # ~47 of 100 blocks of 100 rows expected; a window shuffle gives ~3
        # few consecutive neighbours: a window shuffle puts most rows next to each other
        assert np.sum(np.diff(s) == 1) < 5


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(10, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="rank"):
        epoch_batches(10, 2, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        num_batches(10, 2, world_size=0)
    with pytest.raises(ValueError, match="num_views"):
        epoch_batches(10, 2, seed=0, epoch=0, num_views=0)
    with pytest.raises(ValueError, match="seed"):
        epoch_batches(10, 2, seed=-1, epoch=0)


def test_empty_and_tiny():
    assert epoch_batches(0, 4, seed=0, epoch=0) == [] and num_batches(0, 4) == 0
    assert num_batches(3, 4, world_size=4) == 0          # 3 samples, 4 ranks: no step at all
    assert num_batches(3, 4, drop_last=True) == 0
    (rows, _), = epoch_batches(3, 4, seed=0, epoch=0)
    assert sorted(rows.tolist()) == [0, 1, 2]
