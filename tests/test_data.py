"""Datasets: every source against an independent reference (torchvision transforms, pycocotools).

Fixtures are tiny folders written into tmp_path; sizes are small (S=32, M=40) to stay fast.
"""
from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from spot_fast.data.base import BadImage, DatasetError
from spot_fast.data.coco import CAT_LIST, CocoSource
from spot_fast.data.folder import FolderSource
from spot_fast.data.movi import MoviSource
from spot_fast.data.sources import open_source
from spot_fast.data.synthetic import SyntheticConfig, write_synthetic
from spot_fast.data.transforms import resize_center_crop, to_input
from spot_fast.data.voc import VocSource, random_crop_offsets

S, M = 32, 40
# pycocotools' decode trips a numpy-2 deprecation warning inside the library itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- independent references ---------------------------------------------------------------------

def ref_image(img: Image.Image, size: int) -> torch.Tensor:
    """The reference's val / COCO-train image transform, by torchvision."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(MEAN, STD)])(img)


def ref_mask(mask: Image.Image, size: int) -> torch.Tensor:
    """The reference's ground-truth mask transform, by torchvision."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(size),
                      T.PILToTensor()])(mask).squeeze(0).long()


def ref_coco_masks(coco: COCO, image_id: int, size: int):
    """class, instance, ignore masks written out plainly from pycocotools' own decoder."""
    meta = coco.imgs[image_id]
    h, w = meta["height"], meta["width"]
    cls, inst, count = np.zeros((h, w), int), np.zeros((h, w), int), np.zeros((h, w), int)
    for number, ann in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=image_id)), start=1):
        if ann["category_id"] not in CAT_LIST:
            continue
        m = coco.annToMask(ann).astype(bool)
        free_cls, free_inst = m & (cls == 0), m & (inst == 0)
        cls[free_cls] = CAT_LIST.index(ann["category_id"])
        inst[free_inst] = number
        count += m
    return tuple(ref_mask(Image.fromarray(a.astype(np.uint8)), size) for a in (cls, inst, count > 1))


def rgb(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, SyntheticConfig(num_train=6, num_val=4, image_size=40, seed=3))
    return root


def _rect(x0, y0, x1, y1, h, w):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture
def handmade_coco(tmp_path):
    """Two images, every segmentation format, a category outside CAT_LIST, overlaps."""
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images, anns = [], []
    for image_id, (w, h) in [(7, (30, 20)), (3, (21, 33))]:
        name = f"{image_id}.jpg"
        rgb(w, h, image_id).save(tmp_path / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        compressed = mask_utils.encode(np.asfortranarray(_rect(2, 2, 12, 12, h, w)))
        flat = _rect(8, 5, 18, 15, h, w).flatten(order="F")
        runs = [len(list(g)) for _, g in itertools.groupby(flat)]
        uncompressed = {"size": [h, w], "counts": ([0] if flat[0] else []) + runs}
        segs = [([[1, 1, 9, 1, 9, 9, 1, 9]], 1),                                            # polygon
                ({"size": [h, w], "counts": compressed["counts"].decode()}, 12),           # skipped
                (uncompressed, 3),                                                          # list RLE
                ([[4, 4, 14, 4, 14, 16, 4, 16], [15, 0, 19, 0, 19, 3]], 90)]               # 2 polygons
        for seg, cat in segs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "segmentation": seg, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1]})
    cats = [{"id": c, "name": str(c)} for c in (1, 3, 12, 90)]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return tmp_path


@pytest.fixture
def voc(tmp_path):
    seg = tmp_path / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        (tmp_path / folder).mkdir()
    names = ["2007_000001", "2007_000002"]
    for k, (name, (w, h)) in enumerate(zip(names, [(50, 37), (37, 53)])):
        rgb(w, h, k).save(tmp_path / "JPEGImages" / f"{name}.jpg")
        for folder in ("SegmentationClass", "SegmentationObject"):
            labels = np.random.default_rng(k + 10).choice([0, 1, 2, 15, 255], size=(h, w)).astype(np.uint8)
            mask = Image.fromarray(labels, mode="P")
            mask.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
            mask.save(tmp_path / folder / f"{name}.png")
    (seg / "trainaug.txt").write_text("\n".join(names) + "\n")
    (seg / "val.txt").write_text("\n".join(names[::-1]) + "\n")
    return tmp_path


@pytest.fixture
def movi(tmp_path):
    for split, clips, frames in (("train", 2, 6), ("validation", 1, 2)):
        for c in range(clips):
            clip = tmp_path / split / f"clip{c:03d}"
            clip.mkdir(parents=True)
            for f in range(frames):
                rgb(24, 24, 100 * c + f).save(clip / f"{f:08d}_image.png")
                if split == "validation":
                    seg = np.random.default_rng(f).integers(0, 4, (24, 24))
                    for n in range(25):
                        Image.fromarray(((seg == n) * 255).astype(np.uint8)).save(clip / f"{f:08d}_mask_{n:02}.png")
    return tmp_path


# --- synthetic ----------------------------------------------------------------------------------

def test_synthetic_writes_valid_coco(synth):
    sizes, formats, overlaps = set(), set(), 0
    for split, count in (("train", 6), ("val", 4)):
        coco = COCO(str(synth / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.imgs) == count
        assert set(coco.cats) <= set(CAT_LIST[1:])
        for image_id, meta in coco.imgs.items():
            with Image.open(synth / f"{split}2017" / meta["file_name"]) as img:
                assert img.size == (meta["width"], meta["height"])
                sizes.add(img.size)
            masks = []
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                seg = ann["segmentation"]
                formats.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
                m = coco.annToMask(ann).astype(bool)
                assert m.sum() > 0
                masks.append(m)
            assert 2 <= len(masks) <= 5
            overlaps += sum((a & b).any() for a, b in itertools.combinations(masks, 2))
    assert formats == {"polygon", "str", "list"}  # polygons, compressed and uncompressed RLE
    assert overlaps > 0
    assert sizes == {(40, 53), (53, 40)}


def test_synthetic_is_deterministic(tmp_path):
    config = SyntheticConfig(num_train=2, num_val=1, image_size=32, seed=5)
    write_synthetic(tmp_path / "a", config)
    write_synthetic(tmp_path / "b", config)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


# --- transforms and COCO ------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,size", [(53, 40, 32), (40, 53, 32), (47, 33, 32),
                                               (35, 36, 32), (64, 31, 30), (30, 30, 30)])
def test_resize_center_crop_matches_torchvision(width, height, size):
    img = rgb(width, height, width * height)
    assert torch.equal(to_input(resize_center_crop(img, size)), ref_image(img, size))


@pytest.mark.parametrize("size", [S, 224])
def test_coco_train_views_match_torchvision(synth, size):
    src = open_source("synthetic", synth, "train", image_size=size, mask_size=M)
    assert src.num_views == 2 and len(src) == 6
    assert src.image_id(0) == 1
    for i in range(len(src)):
        img = Image.open(src.image_path(i)).convert("RGB")
        views = src.train_views(i)
        assert views.shape == (2, 3, size, size) and views.dtype == torch.float32
        ref = ref_image(img, size)
        assert torch.equal(views[0], ref)
        assert torch.equal(views[1], TF.hflip(ref))
    json.dumps(src.views_spec())


def test_coco_val_masks_match_pycocotools(synth):
    src = open_source("synthetic", synth, "val", image_size=S, mask_size=M)
    coco = COCO(str(synth / "annotations" / "instances_val2017.json"))
    assert [src.image_id(i) for i in range(len(src))] == list(coco.imgs)
    ignored = 0
    for i in range(len(src)):
        sample = src.val_sample(i)
        cls, inst, ignore = ref_coco_masks(coco, src.image_id(i), M)
        assert torch.equal(sample.class_mask, cls) and sample.class_mask.dtype == torch.int64
        assert torch.equal(sample.instance_mask, inst) and sample.instance_mask.dtype == torch.int64
        assert torch.equal(sample.ignore_mask.long(), ignore) and sample.ignore_mask.dtype == torch.uint8
        img = Image.open(src.image_path(i)).convert("RGB")
        assert torch.equal(sample.image, ref_image(img, S))
        assert Image.open(io.BytesIO(sample.jpeg)).size == (S, S)
        ignored += int(sample.ignore_mask.sum())
    assert ignored > 0


def test_coco_masks_every_format_and_skipped_category(handmade_coco):
    src = CocoSource(handmade_coco, "val", image_size=16, mask_size=20)
    coco = COCO(str(handmade_coco / "annotations" / "instances_val2017.json"))
    assert [src.image_id(i) for i in range(len(src))] == [7, 3]
    for i in range(len(src)):
        sample = src.val_sample(i)
        cls, inst, ignore = ref_coco_masks(coco, src.image_id(i), 20)
        assert torch.equal(sample.class_mask, cls)
        assert torch.equal(sample.instance_mask, inst)
        assert torch.equal(sample.ignore_mask.long(), ignore)
        # annotation 2 (category 12, not a COCO class) is skipped but still numbered
        assert set(sample.instance_mask.unique().tolist()) == {0, 1, 3, 4}
        assert set(sample.class_mask.unique().tolist()) == {0, 1, 3, 80}
        assert sample.ignore_mask.any()


def test_corrupt_and_truncated_images_raise_bad_image(handmade_coco):
    good = jpeg_bytes(rgb(30, 20, 0))
    (handmade_coco / "val2017" / "7.jpg").write_bytes(b"this is not a jpeg" * 10)
    (handmade_coco / "val2017" / "3.jpg").write_bytes(good[: len(good) // 2])
    src = CocoSource(handmade_coco, "val", image_size=16, mask_size=20)
    for i, reason in ((0, "cannot identify"), (1, "truncated")):
        for call in (src.train_views, src.val_sample):
            with pytest.raises(BadImage) as err:
                call(i)
            assert err.value.path == str(src.image_path(i))
            assert reason in err.value.reason.lower()
    (handmade_coco / "val2017" / "7.jpg").unlink()
    with pytest.raises(BadImage, match="not found"):
        src.train_views(0)


def test_missing_coco_files_raise_dataset_error(tmp_path):
    (tmp_path / "train2017").mkdir()
    with pytest.raises(DatasetError) as err:
        open_source("coco", tmp_path, "train")
    assert str(tmp_path / "annotations" / "instances_train2017.json") in str(err.value)
    with pytest.raises(DatasetError, match="spot-fast data synthetic"):
        open_source("synthetic", tmp_path, "train")
    with pytest.raises(DatasetError, match="val2017"):
        open_source("coco", tmp_path, "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a COCO annotation file"):
        open_source("coco", tmp_path, "train")


def test_open_source_rejects_bad_names_and_options(synth):
    with pytest.raises(DatasetError, match="unknown dataset"):
        open_source("imagenet", synth, "train")
    with pytest.raises(DatasetError, match="num_crops"):
        open_source("coco", synth, "train", num_crops=2)
    with pytest.raises(DatasetError, match="unknown split"):
        open_source("synthetic", synth, "test")


# --- VOC ----------------------------------------------------------------------------------------

def test_voc_train_views(voc):
    src = open_source("voc", voc, "train", image_size=S, mask_size=M, num_crops=3, seed=1)
    assert src.split == "train" and src.num_views == 6 and len(src) == 2
    assert src.image_id(1) == "2007_000002"
    for i in range(len(src)):
        views = src.train_views(i)
        assert views.shape == (6, 3, S, S)
        resized = T.Resize(S, interpolation=T.InterpolationMode.BILINEAR)(
            Image.open(voc / "JPEGImages" / f"{src.image_id(i)}.jpg").convert("RGB"))
        offsets = random_crop_offsets(resized.width, resized.height, S, 3, 1, i)
        for k, (left, top) in enumerate(offsets):
            ref = T.Normalize(MEAN, STD)(T.ToTensor()(TF.crop(resized, top, left, S, S)))
            assert torch.equal(views[2 * k], ref)
            assert torch.equal(views[2 * k + 1], TF.hflip(ref))
        assert torch.equal(views, VocSource(voc, "trainaug", S, M, num_crops=3, seed=1).train_views(i))
    lefts = {random_crop_offsets(100, S, S, 1, seed, 0)[0] for seed in range(10)}
    assert len(lefts) > 1  # the seed matters
    assert json.loads(json.dumps(src.views_spec()))["seed"] == 1


def test_voc_val_sample(voc):
    src = VocSource(voc, "val", image_size=S, mask_size=M)
    assert src.image_id(0) == "2007_000002"
    for i in range(len(src)):
        sample = src.val_sample(i)
        name = src.image_id(i)
        assert torch.equal(sample.image, ref_image(Image.open(voc / "JPEGImages" / f"{name}.jpg"), S))
        for got, folder in ((sample.class_mask, "SegmentationClass"), (sample.instance_mask, "SegmentationObject")):
            ref = ref_mask(Image.open(voc / folder / f"{name}.png"), M)
            assert (ref == 255).any()
            ref[ref == 255] = 0
            assert torch.equal(got, ref)
        assert sample.ignore_mask.shape == (M, M) and not sample.ignore_mask.any()


# --- MOVi ---------------------------------------------------------------------------------------

def test_movi_train_frames_and_views(movi):
    src = open_source("movi", movi, "train", image_size=S, mask_size=M, frames_per_clip=3, seed=0)
    ids = [src.image_id(i) for i in range(len(src))]
    assert len(ids) == 6 and src.num_views == 1
    assert [i.split("/")[0] for i in ids] == ["clip000"] * 3 + ["clip001"] * 3
    assert ids == [MoviSource(movi, "train", S, M, frames_per_clip=3, seed=0).image_id(i) for i in range(6)]
    other_seeds = {tuple(MoviSource(movi, "train", S, M, frames_per_clip=3, seed=s).image_id(i)
                         for i in range(6)) for s in range(1, 6)}
    assert other_seeds != {tuple(ids)}
    views = src.train_views(0)
    img = Image.open(movi / "train" / f"{ids[0]}_image.png").convert("RGB").resize((S, S))
    assert views.shape == (1, 3, S, S)
    assert torch.equal(views[0], T.Normalize(MEAN, STD)(T.ToTensor()(img)))
    assert json.loads(json.dumps(src.views_spec()))["frames_per_clip"] == 3


def test_movi_val_masks(movi):
    src = MoviSource(movi, "val", image_size=S, mask_size=M)
    assert len(src) == 2 and src.image_id(1) == "clip000/00000001"
    sample = src.val_sample(1)
    ref = torch.zeros(M, M, dtype=torch.long)
    for n in range(25):
        m = Image.open(movi / "validation" / "clip000" / f"00000001_mask_{n:02}.png").convert("1")
        ref += T.ToTensor()(m.resize((M, M))).squeeze(0).long() * n
    assert torch.equal(sample.instance_mask, ref)
    assert set(ref.unique().tolist()) == {0, 1, 2, 3}
    assert not sample.class_mask.any() and not sample.ignore_mask.any()


# --- folder -------------------------------------------------------------------------------------

def test_folder_source(tmp_path):
    (tmp_path / "sub").mkdir()
    rgb(40, 30, 0).save(tmp_path / "b.png")
    rgb(30, 45, 1).save(tmp_path / "sub" / "a.jpg")
    rgb(33, 33, 2).save(tmp_path / "a.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source("folder", tmp_path, "train", image_size=S)
    assert [src.image_id(i) for i in range(len(src))] == ["a.webp", "b.png", "sub/a.jpg"]
    views = src.train_views(1)
    ref = ref_image(Image.open(tmp_path / "b.png").convert("RGB"), S)
    assert views.shape == (2, 3, S, S)
    assert torch.equal(views[0], ref) and torch.equal(views[1], TF.hflip(ref))
    with pytest.raises(DatasetError, match="no ground-truth"):
        src.val_sample(0)
    with pytest.raises(DatasetError, match="only a train split"):
        open_source("folder", tmp_path, "val", image_size=S)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        FolderSource(empty)


def test_rle_string_counts_match_pycocotools_encoder():
    """Our reading of compressed RLE strings (checked before pycocotools' unchecked C decoder runs)
    equals the run lengths of the mask, for masks starting with 0 or 1 and long runs."""
    from spot_fast.data.coco import rle_string_counts
    from spot_fast.data.synthetic import uncompressed_rle
    rng = np.random.default_rng(0)
    for h, w, p in [(7, 5, 0.5), (40, 33, 0.02), (64, 64, 0.98), (3, 300, 0.5)]:
        mask = rng.random((h, w)) < p
        mask[0, 0] = h % 2 == 1                                      # both starting values occur
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        assert rle_string_counts(encoded) == uncompressed_rle(mask)["counts"]
    assert rle_string_counts(encoded + b"P") is None                  # cut inside a run length


def test_a_16_bit_png_decodes_to_its_8_bit_values(tmp_path):
    """PIL's convert('RGB') clips 16-bit greyscale at 255 (a 0..65535 ramp came out ~100% white);
    load_rgb scales it: v * 255 / 65535, rounded, as an 8-bit encoder of the same picture would."""
    from PIL import Image

    from spot_fast.data.transforms import load_rgb
    ramp = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "ramp16.png"))
    expect = np.floor(ramp.astype(np.float64) / 257 + 0.5).astype(np.uint8)    # 65535 / 255 = 257
    assert rgb.shape == (48, 64, 3) and (rgb == expect[..., None]).all()
    assert (rgb == 255).mean() < 0.01


def test_training_on_images_skips_and_lists_the_unreadable_ones(synth, tmp_path):
    import shutil

    from spot_fast.data.sources import ReadableSource, open_source
    root = tmp_path / "d"
    shutil.copytree(synth, root)
    src = open_source("synthetic", root, "train", image_size=32)
    broken = [src.image_path(1), src.image_path(3)]
    broken[0].write_bytes(b"not an image")
    broken[1].write_bytes(broken[1].read_bytes()[:100])                 # truncated
    readable = ReadableSource(src)
    assert len(readable) == len(src) - 2 and [s["index"] for s in readable.skipped] == [1, 3]
    assert readable.image_id(1) == src.image_id(2)
    assert torch.equal(readable.train_views(1), src.train_views(2))
    line = readable.summary()
    assert line.startswith(f"skipped 2 of {len(src)} images") and broken[0].name in line and broken[1].name in line
