"""What a cache stores, independent of the file format.

Rows are the source's images in order; shard k holds rows [k*C, min((k+1)*C, n)) with C the
chunk size. Arrays (n = images in the source, V views, N patches, T = prefix + N, D width):

    features      (n, V, N, D)  final tokens, no final norm, CLS/registers dropped
    split_tokens  (n, V, T, D)  tokens entering block `split_block`, CLS/registers kept (optional)
  8-bit caches (--dtype fp8 | int8, codec.py) also hold, per token array:
    features_scale      (n, V, N, 1) float32: the scale of each token row
    split_tokens_scale  (n, V, T, 1) float32
    image_id      (n,)          str
    valid         (n,)          uint8: 0 where the image was skipped (BadImage); its row is zeros
  val split only (V = 1):
    instance_mask (n, M, M)     uint8 | int16, 0 = background
    class_mask    (n, M, M)     uint8 | int16, 0 = background
    ignore_mask   (n, M, M)     uint8, 1 where instances overlap
    jpeg          (n,)          bytes: the S x S centre crop for pictures

zarr keeps the row layout (skipped rows are zero, `valid` = 0) so every shard has a fixed place;
WebDataset tars simply omit skipped images. A `Shard` in memory holds only the valid rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spot_fast.cache.codec import STORED_NUMPY, is_quantized, scale_name
from spot_fast.cache.manifest import MASK_DTYPES

MASK_NAMES = ("instance_mask", "class_mask", "ignore_mask")
SCALE_NAMES = ("features_scale", "split_tokens_scale")
NUMERIC = ("features", "split_tokens", *SCALE_NAMES, *MASK_NAMES)    # the per-image numeric arrays


def array_specs(*, num_rows: int, views: int, num_patches: int, num_tokens: int | None, dim: int,
                dtype: str, with_val: bool, mask_size: int, mask_dtype: str) -> dict[str, dict]:
    """name -> {"shape": [...], "dtype": numpy dtype name or "str"/"bytes"} of every array."""
    stored = np.dtype(STORED_NUMPY[dtype]).name
    specs = {"features": {"shape": [num_rows, views, num_patches, dim], "dtype": stored}}
    if num_tokens is not None:
        specs["split_tokens"] = {"shape": [num_rows, views, num_tokens, dim], "dtype": stored}
    if is_quantized(dtype):
        for name in list(specs):
            specs[scale_name(name)] = {"shape": [*specs[name]["shape"][:3], 1], "dtype": "float32"}
    specs["image_id"] = {"shape": [num_rows], "dtype": "str"}
    specs["valid"] = {"shape": [num_rows], "dtype": "uint8"}
    if with_val:
        mask = np.dtype(MASK_DTYPES[mask_dtype]).name
        specs["instance_mask"] = {"shape": [num_rows, mask_size, mask_size], "dtype": mask}
        specs["class_mask"] = {"shape": [num_rows, mask_size, mask_size], "dtype": mask}
        specs["ignore_mask"] = {"shape": [num_rows, mask_size, mask_size], "dtype": "uint8"}
        specs["jpeg"] = {"shape": [num_rows], "dtype": "bytes"}
    return specs


def shard_bounds(num_rows: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of every shard."""
    return [(s, min(s + chunk, num_rows)) for s in range(0, num_rows, chunk)]


@dataclass
class Shard:
    """The valid rows of one shard, in row order, arrays in stored dtypes."""
    index: int
    start: int
    stop: int
    rows: np.ndarray                      # (n,) int64 source indices of the stored images
    image_ids: list[str]
    features: np.ndarray | None = None     # (n, V, N, D); None when not read
    split_tokens: np.ndarray | None = None  # (n, V, T, D)
    features_scale: np.ndarray | None = None      # (n, V, N, 1) float32, 8-bit caches only
    split_tokens_scale: np.ndarray | None = None  # (n, V, T, 1) float32, 8-bit caches only
    instance_mask: np.ndarray | None = None  # (n, M, M)
    class_mask: np.ndarray | None = None
    ignore_mask: np.ndarray | None = None
    jpeg: list[bytes] | None = None
    skipped: list[dict] = field(default_factory=list)   # {"index", "path", "reason"}
    stats: dict = field(default_factory=dict)   # layer -> stored-token error sums (encode.py)
    int_ids: bool = False                 # every image id was an int (restored as int on reading)

    def __len__(self) -> int:
        return len(self.rows)
