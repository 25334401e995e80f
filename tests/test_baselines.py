"""The trivial baselines: their label maps, and their metrics on hand-checkable scenes."""
import pytest
import torch

from spot_fast.baselines import grid_labels, grid_rows, one_slot_labels, score


def _scene() -> dict:
    """One 4x4 image: object 1 = 2 pixels, object 2 = 6 pixels (top-right 2x3), rest background."""
    inst = torch.tensor([[0, 0, 2, 2],
                         [1, 0, 2, 2],
                         [1, 0, 2, 2],
                         [0, 0, 0, 0]]).unsqueeze(0)
    cls = (inst > 0).long() * torch.tensor([0, 3, 5])[inst]          # object 1 class 3, object 2 class 5
    return {"instance_mask": inst, "class_mask": cls, "ignore_mask": torch.zeros_like(inst, dtype=torch.uint8)}


@pytest.mark.parametrize("k, rows", [(1, [1]), (2, [2]), (3, [3]), (4, [2, 2]), (5, [3, 2]),
                                     (7, [4, 3]), (9, [3, 3, 3]), (11, [4, 4, 3])])
def test_grid_rows(k, rows):
    assert grid_rows(k) == rows
    assert sum(rows) == k


def test_grid_of_four_is_quadrants():
    expect = torch.tensor([[0, 0, 1, 1],
                           [0, 0, 1, 1],
                           [2, 2, 3, 3],
                           [2, 2, 3, 3]])
    assert torch.equal(grid_labels(4, 4, 4), expect)


def test_grid_of_three_is_vertical_stripes():
    assert torch.equal(grid_labels(3, 2, 6), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2))


@pytest.mark.parametrize("k, size", [(5, 60), (7, 84), (7, 64), (11, 97)])
def test_grid_blocks_have_nearly_equal_area(k, size):
    labels = grid_labels(k, size, size)
    areas = torch.bincount(labels.flatten(), minlength=k)
    assert areas.numel() == k and int(areas.min()) > 0
    # rounded row bounds and column splits: each block is within one image row of the exact share
    assert float((areas - size * size / k).abs().max()) <= size


def test_one_slot_scores_the_objects_share_of_the_image():
    scene = _scene()
    m = score(lambda b: one_slot_labels(*b["instance_mask"].shape), [scene])
    # IoU(object, whole image) = area / 16; mBO^i = mean over the two objects
    assert m["mbo_i"] == pytest.approx(100 * (2 / 16 + 6 / 16) / 2)
    assert m["mbo_c"] == pytest.approx(100 * (2 / 16 + 6 / 16) / 2)
    # one predicted mask can be matched to one object only: the larger, 6/16, over 2 objects
    assert m["miou"] == pytest.approx(100 * (6 / 16) / 2)
    # every foreground pixel in one cluster while there are two objects: ARI 0
    assert m["fg_ari"] == pytest.approx(0.0, abs=1e-12)


def test_one_slot_leaves_ignored_pixels_out():
    scene = _scene()
    scene["ignore_mask"][0, 3, :] = 1               # the bottom row (4 background pixels) ignored
    m = score(lambda b: one_slot_labels(*b["instance_mask"].shape), [scene])
    assert m["mbo_i"] == pytest.approx(100 * (2 / 12 + 6 / 12) / 2)


def test_grid_scores_by_hand():
    scene = _scene()
    m = score(lambda b: grid_labels(4, 4, 4).expand(1, 4, 4), [scene])
    # object 1 (pixels (1,0), (2,0)): best block is top-left (4 px, 1 shared) or bottom-left
    # (4 px, 1 shared): IoU 1 / 5. Object 2 (6 px): top-right block (4 px, all inside): 4 / 6.
    assert m["mbo_i"] == pytest.approx(100 * (1 / 5 + 4 / 6) / 2)
    assert m["miou"] == pytest.approx(100 * (1 / 5 + 4 / 6) / 2)
    # pairs: object 1 split 1+1 over two blocks, object 2 split 4 (top-right) + 2 (bottom-right)
    # rindex = 0 + 0 + 12 + 2 = 14; aindex = 2 + 30 = 32; bindex over fg pixels per block: 0+0+12+2 = 14
    # expected = 32 * 14 / 56 = 8; max = (32 + 14) / 2 = 23; ARI = (14 - 8) / (23 - 8) = 0.4
    assert m["fg_ari"] == pytest.approx(40.0)


def test_batches_are_averaged_per_image():
    scene = _scene()
    empty = {k: torch.zeros_like(v) for k, v in scene.items()}  # no object: FG-ARI 1, out of mBO
    m = score(lambda b: one_slot_labels(*b["instance_mask"].shape), [scene, empty])
    assert m["fg_ari"] == pytest.approx(50.0)
    assert m["mbo_i"] == pytest.approx(100 * (2 / 16 + 6 / 16) / 2)


def test_grid_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        grid_rows(0)
