"""Metrics: against the reference's values (golden), and against brute force on tiny cases."""
import itertools

import numpy as np

import pytest
import torch

from spot_fast.metrics import (
    MetricAccumulator,
    best_overlap,
    fg_ari,
    hungarian_miou,
    masks_to_labels,
    segmentation_metrics,
)

GOLDEN_TOL = 1e-9  # percent


def _golden_inputs(golden, prefix):
    return tuple(golden[f"{prefix}/{k}"] for k in ("pred_labels", "instance_labels", "class_labels", "ignore"))


# ----------------------------------------------------------------------------- golden

@pytest.mark.parametrize("prefix", ["metrics", "metrics2"])
def test_matches_reference_values(golden, prefix):
    acc = MetricAccumulator()
    acc.update(*_golden_inputs(golden, prefix))
    got, want = acc.compute(), golden[f"{prefix}/values"]
    assert set(got) == set(want)
    for name in want:
        assert abs(got[name] - float(want[name])) <= GOLDEN_TOL, (name, got[name], want[name])


@pytest.mark.parametrize("prefix", ["metrics", "metrics2"])
def test_accumulating_split_batches_equals_one_batch(golden, prefix):
    pred, inst, cls, ign = _golden_inputs(golden, prefix)
    acc = MetricAccumulator()
    for sl in (slice(0, 1), slice(1, 4)):  # the batch-wide one-hot channel counts differ per batch
        acc.update(pred[sl], inst[sl], cls[sl], ign[sl])
    want = golden[f"{prefix}/values"]
    for name, value in acc.compute().items():
        assert abs(value - float(want[name])) <= GOLDEN_TOL, name


def test_golden_image0_has_no_foreground(golden):
    pred, inst, _, ign = _golden_inputs(golden, "metrics")
    assert fg_ari(pred, inst, ign)[0].item() == 1.0
    for fn in (best_overlap, hungarian_miou):
        _, valid = fn(pred, inst, ign)
        assert valid.tolist() == [False, True, True, True]


# ----------------------------------------------------------------------------- brute force

def _pixels(pred, gt, ignore, b):
    """[(pred label, gt label)] of the non-ignored pixels of image b, as plain Python ints."""
    p, g, i = pred[b].flatten().tolist(), gt[b].flatten().tolist(), ignore[b].flatten().tolist()
    return [(pp, gg) for pp, gg, ii in zip(p, g, i) if not ii]


def _ari_pair_counting(pixels):
    """ARI over foreground pixels by counting all pixel pairs (O(P^2))."""
    fg = [(p, g) for p, g in pixels if g > 0]
    both = same_gt = same_pred = total = 0
    for (p1, g1), (p2, g2) in itertools.combinations(fg, 2):
        total += 1
        same_gt += g1 == g2
        same_pred += p1 == p2
        both += (g1 == g2) and (p1 == p2)
    expected = same_gt * same_pred / total if total else 0.0
    denominator = (same_gt + same_pred) / 2 - expected
    return (both - expected) / denominator if denominator > 0 else 1.0


def _ious_brute(pixels):
    """{gt label: [IoU with each pred label that occurs]} for the gt objects present."""
    preds = {p: {i for i, (pp, _) in enumerate(pixels) if pp == p} for p, _ in pixels}
    gts = {g: {i for i, (_, gg) in enumerate(pixels) if gg == g} for _, g in pixels if g > 0}
    return {g: [len(gs & ps) / len(gs | ps) for ps in preds.values()] for g, gs in gts.items()}, len(preds)


def _best_overlap_brute(pixels):
    ious, _ = _ious_brute(pixels)
    if not ious:
        return None
    return sum(max(v, default=0.0) for v in ious.values()) / len(ious)


def _hungarian_brute(pixels):
    ious, n_pred = _ious_brute(pixels)
    if not ious:
        return None
    rows = list(ious.values())                     # rows[k][p]: gt k vs pred p
    n_gt = len(rows)
    slots = max(n_pred, n_gt)                      # pred indices >= n_pred are "unmatched" (IoU 0)
    best = max(sum(rows[k][p] if p < n_pred else 0.0 for k, p in enumerate(perm))
               for perm in itertools.permutations(range(slots), n_gt))
    return best / n_gt


def _random_case(seed, B=4, H=10, W=10, n_pred=4, n_gt=4, p_ignore=0.15):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, n_pred, (B, H, W), generator=gen)
    # blocky gt so that IoUs are not all tiny, plus noise
    gt = torch.randint(0, n_gt, (B, H // 2, W // 2), generator=gen).repeat_interleave(2, 1).repeat_interleave(2, 2)
    noise = torch.rand(B, H, W, generator=gen) < 0.2
    gt = torch.where(noise, torch.randint(0, n_gt, (B, H, W), generator=gen), gt)
    ignore = (torch.rand(B, 1, H, W, generator=gen) < p_ignore).to(torch.uint8)
    # awkward images: 0 no foreground, 1 everything ignored, 2 one foreground pixel, 3 one pred label
    gt[0] = 0
    ignore[1] = 1
    gt[2] = 0
    gt[2, 3, 4] = 2
    ignore[2, 0, 3, 4] = 0
    pred[3] = 1
    return pred, gt, ignore


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fg_ari_vs_pair_counting(seed):
    pred, gt, ignore = _random_case(seed, B=6)
    got = fg_ari(pred, gt, ignore)
    assert got.dtype == torch.float64
    for b in range(pred.shape[0]):
        want = _ari_pair_counting(_pixels(pred, gt, ignore[:, 0], b))
        assert abs(got[b].item() - want) <= 1e-12, (b, got[b].item(), want)
    assert got[0].item() == 1.0 and got[1].item() == 1.0 and got[2].item() == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_pred,n_gt", [(4, 4), (2, 5), (5, 3)])
def test_best_overlap_and_hungarian_vs_brute_force(seed, n_pred, n_gt):
    pred, gt, ignore = _random_case(seed, B=6, n_pred=n_pred, n_gt=n_gt)
    for fn, brute in ((best_overlap, _best_overlap_brute), (hungarian_miou, _hungarian_brute)):
        values, valid = fn(pred, gt, ignore)
        for b in range(pred.shape[0]):
            want = brute(_pixels(pred, gt, ignore[:, 0], b))
            assert valid[b].item() == (want is not None), (fn.__name__, b)
            if want is not None:
                assert abs(values[b].item() - want) <= 1e-12, (fn.__name__, b, values[b].item(), want)
        assert valid[:2].tolist() == [False, False]  # no foreground; all ignored


def test_segmentation_metrics_sums_and_counts():
    pred, gt, ignore = _random_case(0, B=6)
    cls = (gt > 0).long() * (1 + gt % 2)
    out = segmentation_metrics(pred, gt, cls, ignore)
    ari = fg_ari(pred, gt, ignore)
    assert out["fg_ari"] == (pytest.approx(ari.sum().item(), abs=1e-12), 6)
    for name, fn, labels in (("mbo_i", best_overlap, gt), ("mbo_c", best_overlap, cls),
                             ("miou", hungarian_miou, gt)):
        values, valid = fn(pred, labels, ignore)
        assert out[name] == (pytest.approx(values[valid].sum().item(), abs=1e-12), int(valid.sum()))


def test_perfect_prediction_scores_100():
    _, gt, _ = _random_case(3, B=4)
    gt[0, 0, 0] = 1  # every image has foreground
    acc = MetricAccumulator()
    acc.update(gt + 2, gt, gt, None)  # renamed labels: a perfect segmentation
    for name, value in acc.compute().items():
        assert value == pytest.approx(100.0, abs=1e-12), name


def test_ignore_layouts_and_dtypes_agree():
    pred, gt, ignore = _random_case(1)
    want = segmentation_metrics(pred, gt, gt, ignore)
    assert segmentation_metrics(pred, gt, gt, ignore[:, 0].bool()) == want
    assert segmentation_metrics(pred, gt, gt, ignore.long() * 255) == want
    none = segmentation_metrics(pred, gt, gt, None)
    assert none == segmentation_metrics(pred, gt, gt, torch.zeros_like(ignore))


def test_no_images_with_objects():
    gt = torch.zeros(2, 5, 5, dtype=torch.long)
    pred = torch.randint(0, 3, (2, 5, 5), generator=torch.Generator().manual_seed(0))
    acc = MetricAccumulator()
    acc.update(pred, gt, gt)
    assert acc.compute() == {"mbo_i": 0.0, "mbo_c": 0.0, "miou": 0.0, "fg_ari": 100.0}


def test_bad_inputs_raise():
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="ignore"):
        fg_ari(pred, pred, torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="label maps"):
        best_overlap(pred, pred[:1])
    with pytest.raises(ValueError, match="integer"):
        hungarian_miou(pred.float(), pred)
    with pytest.raises(ValueError, match="negative"):
        fg_ari(pred - 1, pred)


# ----------------------------------------------------------------------------- masks_to_labels

def _bilinear_by_hand(masks: np.ndarray, size: int) -> np.ndarray:
    """(B, K, h, w) -> (B, K, size, size) in fp64, loop by loop: half-pixel centres (the source
    point of output pixel i is (i + 0.5) * h / size - 0.5, clamped to the edge pixels)."""
    def taps(n_in):
        out = []
        for i in range(size):
            x = min(max((i + 0.5) * n_in / size - 0.5, 0.0), n_in - 1)
            lo = int(np.floor(x))
            out.append((lo, min(lo + 1, n_in - 1), x - lo))
        return out
    B, K, h, w = masks.shape
    up = np.zeros((B, K, size, size))
    for i, (y0, y1, fy) in enumerate(taps(h)):
        for j, (x0, x1, fx) in enumerate(taps(w)):
            up[:, :, i, j] = ((1 - fy) * (1 - fx) * masks[:, :, y0, x0] + (1 - fy) * fx * masks[:, :, y0, x1]
                              + fy * (1 - fx) * masks[:, :, y1, x0] + fy * fx * masks[:, :, y1, x1])
    return up


@pytest.mark.parametrize("h,size", [(14, 40), (4, 16), (7, 5)])
def test_masks_to_labels_is_bilinear_upsampling_then_argmax(h, size):
    masks = torch.rand(3, 7, h, h, generator=torch.Generator().manual_seed(h), dtype=torch.float64)
    labels = masks_to_labels(masks.float(), size)
    assert labels.dtype == torch.int64 and labels.shape == (3, size, size)
    up = _bilinear_by_hand(masks.numpy(), size)
    top2 = np.sort(up, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5           # pixels whose winner fp32 rounding cannot change
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels.numpy()[clear], up.argmax(1)[clear])


def test_masks_to_labels_by_hand():
    """2x2 -> 4x4: slot 1 owns the top-left source pixel, slot 0 the rest; bilinear interpolation
    at half-pixel centres gives slot 1 exactly the output pixels whose value of its mask is > 0.5."""
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 1, 0, 0] = 1.0
    masks[0, 0] = 1 - masks[0, 1]
    # slot 1's mask upsampled: rows/cols weights (1, 0.75, 0.25, 0) on source pixel 0
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(masks_to_labels(masks, 4)[0], want)


def test_masks_to_labels_constant_masks():
    masks = torch.zeros(2, 4, 3, 3)
    masks[0, 2] = 1.0
    masks[1, 1, :, :2] = 1.0   # left two columns -> slot 1, right column -> slot 0 (ties pick 0)
    labels = masks_to_labels(masks, 9)
    assert (labels[0] == 2).all()
    assert (labels[1, :, 0] == 1).all() and (labels[1, :, -1] == 0).all()
