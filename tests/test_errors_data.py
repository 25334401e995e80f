"""Bad datasets and stale caches (issue 10): refused with one line naming the input and the fix,
before anything is written; nothing already written is lost; nothing wrong is cached silently."""
from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from error_checks import assert_user_error, cli, flat, tree_digest  # noqa: E402

from spot_fast.cache import CacheError, CacheSpec, read_manifest  # noqa: E402
from spot_fast.cache.paths import check_existing, dataset_fingerprint  # noqa: E402
from spot_fast.config import preset  # noqa: E402
from spot_fast.data.base import DatasetError  # noqa: E402
from spot_fast.data.coco import CocoSource  # noqa: E402
from spot_fast.data.synthetic import SyntheticConfig, write_synthetic  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = ["--preset", "tiny", "--random-init", "--num-workers", "0", "--no-progress", "--mask-size", "16",
        "--chunk-images", "2"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, SyntheticConfig(num_train=3, num_val=3, image_size=32, seed=1))
    return root


def copy_with(tmp_path: Path, root: Path, edit) -> Path:
    """A copy of the synthetic dataset whose val annotation file went through `edit(coco_dict)`."""
    out = tmp_path / "edited"
    shutil.copytree(root, out)
    ann = out / "annotations" / "instances_val2017.json"
    coco = json.loads(ann.read_text())
    edit(coco)
    ann.write_text(json.dumps(coco))
    return out


# ------------------------------------------------------------------- data synthetic --out

def test_synthetic_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(tmp_path):
    out = tmp_path / "d"
    assert cli("data", "synthetic", "--out", out, "--num-train", 5, "--num-val", 2, "--image-size", 32).exit_code == 0
    before = tree_digest(out)
    res = cli("data", "synthetic", "--out", out, "--num-train", 2, "--num-val", 2, "--image-size", 32, "--seed", 1)
    assert_user_error(res, f"--out {out}", "--overwrite")
    assert tree_digest(out) == before                                  # nothing lost
    res = cli("data", "synthetic", "--out", out, "--num-train", 2, "--num-val", 2, "--image-size", 32, "--seed", 1,
              "--overwrite")
    assert res.exit_code == 0, res.output
    assert len(list((out / "train2017").iterdir())) == 2               # no orphans of the old 5
    assert len(json.loads((out / "annotations" / "instances_train2017.json").read_text())["images"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]         # no staging folder left


def test_overwrite_never_clears_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    res = cli("data", "synthetic", "--out", tmp_path, "--overwrite", "--num-train", 2, "--num-val", 2)
    assert_user_error(res, "notes.txt", "new folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_interrupted_rewrite_leaves_the_old_dataset(tmp_path):
    out = tmp_path / "d"
    write_synthetic(out, SyntheticConfig(num_train=3, num_val=2, image_size=32))
    before, calls = tree_digest(out), []

    def stop_after_two():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synthetic(out, SyntheticConfig(num_train=4, num_val=2, image_size=32, seed=5), stop_after_two,
                        overwrite=True)
    assert tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("field, value", [("num_train", -5), ("num_val", 0), ("image_size", 8), ("seed", -1),
                                          ("max_objects", 1)])
def test_synthetic_config_out_of_range_is_refused(tmp_path, field, value):
    cfg = SyntheticConfig(num_train=2, num_val=2, image_size=32, min_objects=2)
    setattr(cfg, field, value)
    with pytest.raises(DatasetError, match=field):
        write_synthetic(tmp_path / "d", cfg)
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------- COCO ground truth

def _first_rle_string(coco):
    return next(a for a in coco["annotations"]
                if isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str))


BROKEN = {
    "no segmentation": lambda c: c["annotations"][1].pop("segmentation"),
    "empty polygon list": lambda c: c["annotations"][1].update(segmentation=[]),
    "polygon of one point": lambda c: c["annotations"][1].update(segmentation=[[1.0, 2.0]]),
    "polygon of strings": lambda c: c["annotations"][1].update(segmentation=[["a"] * 6]),
    "RLE of another size": lambda c: c["annotations"][1].update(segmentation={"size": [5, 5], "counts": [25]}),
    "RLE counts too short": lambda c: c["annotations"][1].update(
        segmentation={"size": [c["images"][0]["height"], c["images"][0]["width"]], "counts": [3, 4]}),
    "compressed RLE cut off": lambda c: _first_rle_string(c)["segmentation"].update(
        counts=_first_rle_string(c)["segmentation"]["counts"][:-4]),
    "no category": lambda c: c["annotations"][1].update(category_id=None),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_unreadable_ground_truth_names_the_file_and_the_annotation(synth, tmp_path, case):
    coco = json.loads((synth / "annotations" / "instances_val2017.json").read_text())
    edited = copy.deepcopy(coco)
    BROKEN[case](edited)
    bad_id = next(a["id"] for a, b in zip(edited["annotations"], coco["annotations"]) if a != b)
    root = copy_with(tmp_path, synth, BROKEN[case])
    with pytest.raises(DatasetError, match=f"instances_val2017.json: annotation id {bad_id}:"):
        CocoSource(root, "val", image_size=32, mask_size=16, name="synthetic")
    out = tmp_path / "c"
    res = cli("cache", "synthetic", "--root", root, "--split", "val", "--out", out, *TINY)
    assert_user_error(res, "instances_val2017.json", f"annotation id {bad_id}", "Fix or remove")
    assert not out.exists()


def test_a_bad_val_split_stops_both_before_train_is_encoded(synth, tmp_path):
    root = copy_with(tmp_path, synth, BROKEN["no segmentation"])
    res = cli("cache", "synthetic", "--root", root, "--split", "both", "--out", tmp_path / "c", *TINY)
    assert_user_error(res, "instances_val2017.json", "annotation id")
    assert not (tmp_path / "c").exists()


def test_empty_ground_truth_is_a_loud_warning_in_the_output_and_the_manifest(synth, tmp_path):
    root = copy_with(tmp_path, synth, lambda c: c.update(annotations=[]))
    out = tmp_path / "c"
    res = cli("cache", "synthetic", "--root", root, "--split", "val", "--out", out, *TINY)
    assert res.exit_code == 0, res.output
    assert "WARNING:" in res.output and "empty ground truth" in res.output
    assert read_manifest(out)["views_spec"]["ground_truth"] == {"annotations": 0, "images_with_objects": 0,
                                                                "images": 3}
    assert "EMPTY GROUND TRUTH" in flat(cli("cache", "info", out).output)


def test_val_cache_info_shows_the_one_view_it_stores(synth, tmp_path):
    out = tmp_path / "c"
    assert cli("cache", "synthetic", "--root", synth, "--split", "val", "--out", out, *TINY).exit_code == 0
    spec = read_manifest(out)["views_spec"]
    assert spec["num_views"] == 1 and spec["views"] == ["original"]
    info = flat(cli("cache", "info", out).output)
    assert "views 1: original; resize shorter side to 32" in info and "hflip" not in info, info


# ------------------------------------------------------------------- folders

def test_folder_defaults_to_train_and_refuses_val_up_front(synth, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth / "train2017", images)
    for split in ("both", "val"):
        res = cli("cache", "folder", "--root", images, "--split", split, "--out", tmp_path / split, *TINY)
        assert_user_error(res, f"--split {split}", "no val split", "--split train")
        assert not (tmp_path / split).exists()
    res = cli("cache", "folder", "--root", images, "--out", tmp_path / "c", *TINY)
    assert res.exit_code == 0 and read_manifest(tmp_path / "c")["counts"]["images"] == 3, res.output


def test_a_cache_inside_the_folder_is_no_part_of_its_content(synth, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth / "train2017", images)
    build = ["cache", "folder", "--root", images, "--out", images / "cache", *TINY]
    assert cli(*build).exit_code == 0
    res = cli(*build)
    assert res.exit_code == 0 and "already cached" in res.output, res.output


def test_a_folder_of_non_images_is_refused_before_anything_is_cached(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"x{i}.jpg").write_text("not an image")
    res = cli("cache", "folder", "--root", images, "--out", tmp_path / "c", *TINY)
    assert_user_error(res, "none of 3 images", "can be decoded", "x0.jpg", "--root")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------- the cache's identity

def test_fingerprint_follows_the_files(synth, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(synth, root)
    first = dataset_fingerprint("synthetic", root, "train")
    assert dataset_fingerprint("synthetic", root, "train") == first
    assert dataset_fingerprint("synthetic", root, "val") != first
    image = sorted((root / "train2017").iterdir())[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    second = dataset_fingerprint("synthetic", root, "train")
    assert second != first
    shutil.copy(image, root / "train2017" / "extra.jpg")
    assert dataset_fingerprint("synthetic", root, "train") not in (first, second)


def test_a_regenerated_dataset_is_not_already_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOT_FAST_CACHE_DIR", str(tmp_path / "caches"))
    root, out = tmp_path / "d", tmp_path / "c"
    write_synthetic(root, SyntheticConfig(num_train=2, num_val=2, image_size=32))
    build = ["cache", "synthetic", "--root", root, "--split", "train", *TINY]
    assert cli(*build, "--out", out).exit_code == 0 and cli(*build).exit_code == 0
    kept = tree_digest(out)
    write_synthetic(root, SyntheticConfig(num_train=4, num_val=2, image_size=32), overwrite=True)
    res = cli(*build, "--out", out)                                   # same --out: refused, says why
    assert_user_error(res, str(out), "the dataset's files", "added, removed or modified", "delete it")
    assert tree_digest(out) == kept
    res = cli(*build)                                                  # default place: a new cache
    assert res.exit_code == 0 and "already cached" not in res.output and "cached 4 images" in res.output, res.output


def test_a_mismatched_existing_cache_names_the_settings_that_differ(synth, tmp_path):
    out = tmp_path / "c"
    build = ["cache", "synthetic", "--root", synth, "--split", "train", "--out", out, *TINY]
    assert cli(*build).exit_code == 0
    kept = tree_digest(out)
    res = cli(*build, "--dtype", "fp32", "--chunk-images", "3")
    assert_user_error(res, "--dtype: 'fp16' -> 'fp32'", "--chunk-images: 2 -> 3", "another --out")
    assert tree_digest(out) == kept and cli("cache", "verify", out).exit_code == 0


def test_an_unfinished_build_of_other_files_is_named(synth, tmp_path):
    spec = CacheSpec("synthetic", synth, "train", preset("tiny").encoder, "random-init:0")
    out = tmp_path / "c"
    out.mkdir()
    state = {"content_key": "0" * 64, "spec": {**spec.to_dict(), "content": "0" * 64}, "prepared": True}
    (out / ".build.json").write_text(json.dumps(state))
    with pytest.raises(CacheError, match=r"an unfinished build of other settings \(the dataset's files \(images"):
        check_existing(spec, out)
    check_existing(spec, tmp_path / "elsewhere")                       # nothing there: nothing to refuse


# ------------------------------------------------------------------- issue 7: no import cycle

def test_data_modules_import_one_way():
    """Only sources.py imports the dataset modules; they import base/transforms, never sources."""
    folder = Path(__file__).parents[1] / "spot_fast" / "data"
    for path in folder.glob("*.py"):
        imported = {n.module for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.ImportFrom) and n.module}
        if path.name != "sources.py":
            assert "spot_fast.data.sources" not in imported, path.name


# ------------------------------------------------------------------- issue 17: data that was silently wrong

def test_a_coco_file_without_images_says_so(synth, tmp_path):
    root = copy_with(tmp_path, synth, lambda c: c.pop("images"))
    with pytest.raises(DatasetError, match=r"instances_val2017.json has no 'images' list") as err:
        CocoSource(root, "val", image_size=32, mask_size=16, name="synthetic")
    assert "annotation id" not in str(err.value)
    root2 = copy_with(tmp_path / "b", synth, lambda c: c.update(images=[]))
    with pytest.raises(DatasetError, match="lists no images"):
        CocoSource(root2, "val", image_size=32, mask_size=16, name="synthetic")


def test_polygons_of_an_image_whose_file_has_another_size_are_refused(synth, tmp_path):
    """Masks are drawn at the annotated height x width; a file of another size would get masks that
    do not line up (silently, before): that image is a BadImage, skipped and listed by the build."""
    from spot_fast.data.base import BadImage

    def double_first(c):
        c["images"][0].update(height=c["images"][0]["height"] * 2, width=c["images"][0]["width"] * 2)
        for a in c["annotations"]:          # polygons scaled with it: valid for the stated size
            if a["image_id"] == c["images"][0]["id"]:
                a["segmentation"] = [[2 * v for v in poly] for poly in a["segmentation"]] \
                    if isinstance(a["segmentation"], list) else a["segmentation"]
        c["annotations"] = [a for a in c["annotations"]
                            if a["image_id"] != c["images"][0]["id"] or isinstance(a["segmentation"], list)]
    root = copy_with(tmp_path, synth, double_first)
    src = CocoSource(root, "val", image_size=32, mask_size=16, name="synthetic")
    meta = src.coco.imgs[src.ids[0]]
    with pytest.raises(BadImage, match=rf"the file is {meta['height'] // 2}x{meta['width'] // 2} .* says "
                                       rf"{meta['height']}x{meta['width']}"):
        src.val_sample(0)
    src.val_sample(1)                       # the others are untouched
    out = tmp_path / "c"
    res = cli("cache", "synthetic", "--root", root, "--split", "val", "--out", out, *TINY)
    assert res.exit_code == 0, res.output
    skipped = read_manifest(out)["skipped"]
    assert [s["path"].rsplit("/", 1)[-1] for s in skipped] == [meta["file_name"]], skipped
