"""Datasets read for the cache or on the fly: `open_source(name, root, split)` (sources.py)."""

DATASET_NAMES = ("coco", "voc", "movi", "folder", "synthetic")    # the names `open_source` takes
