"""One encoder batch -> the arrays a shard stores, and what storing them cost in accuracy.

    enc = BatchEncoder(encoder, spec, device, views, dataset)
    arrays, stats = enc(items)     # {"features": (B, V, N, D) stored, ...}, {"final": {...}, ...}

Stats (codec.error_stats sums, merged per shard and then per cache into the manifest):
- "final" / "split": the stored tokens against the encoder's own output (fp32 unless --autocast);
- "tail": stage-2 tail consistency, the frozen tail (blocks >= split_block, fp32) applied to the
  stored split tokens against the stored final tokens -- on the first `TAIL_SAMPLE` images of a
  shard's first batch for fp16/bf16/fp32 (cheap), on every image for 8-bit caches, whose final
  tokens are derived from the stored split tokens through that tail (so the only disagreement
  left is the final tokens' own 8-bit rounding).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from spot_fast.cache.codec import error_stats, from_stored, is_quantized, scale_name, to_stored
from spot_fast.cache.manifest import CacheError
from spot_fast.cache.paths import CacheSpec
from spot_fast.encoders import FrozenEncoder

TAIL_SAMPLE = 4     # images of a shard's first batch whose tail consistency an fp16/bf16/fp32 build measures


class BatchEncoder:
    """Encodes batches of source items into stored-dtype arrays (+ 8-bit scales) and their error stats."""

    def __init__(self, encoder: FrozenEncoder, spec: CacheSpec, device: torch.device, views: int, dataset: str):
        self.encoder, self.spec, self.device, self.views, self.dataset = encoder, spec, device, views, dataset
        cfg = spec.encoder
        self.num_patches, self.dim = cfg.num_patches, cfg.feature_dim
        self.num_tokens = None if spec.split_block is None else encoder.num_prefix_tokens + cfg.num_patches
        self.quantized = is_quantized(spec.dtype)

    def tail(self, split: torch.Tensor) -> torch.Tensor:
        """The frozen tail in fp32: split tokens (M, T, D) -> final tokens (M, N, D), prefix dropped."""
        x = split.float()
        with torch.inference_mode():
            for block in self.encoder.vit.blocks[self.spec.split_block:]:
                x = block(x)
        return x[:, self.encoder.num_prefix_tokens:]

    def __call__(self, items: list[dict], first_of_shard: bool) -> tuple[dict[str, np.ndarray], dict]:
        first = items[0]["views"]
        views = torch.empty((len(items), *first.shape), dtype=first.dtype,
                            pin_memory=self.device.type == "cuda")     # pinned once, after stacking
        torch.stack([it["views"] for it in items], out=views)            # (B, V, 3, S, S)
        b, v = views.shape[:2]
        if v != self.views:
            raise CacheError(f"source {self.dataset!r} gave {v} views for image {items[0]['id']}, "
                             f"but says num_views = {self.views}")
        x = views.flatten(0, 1).to(self.device, non_blocking=True)    # (B*V, 3, S, S)
        autocast = contextlib.nullcontext()
        if self.spec.autocast is not None:
            dt = torch.bfloat16 if self.spec.autocast == "bf16" else torch.float16
            autocast = torch.autocast(self.device.type, dtype=dt)
        with torch.inference_mode(), autocast:
            tokens = self.encoder(x, split_block=self.spec.split_block)
        out, stats = {}, {}
        final_ref = tokens.final
        if self.num_tokens is not None:     # checked first: the earlier layer names where a NaN began
            split = tokens.split.reshape(b, v, self.num_tokens, self.dim)             # (B, V, T, D)
            self.put(out, stats, "split_tokens", "split", split, items, f"split (input of block {self.spec.split_block})")
            if self.quantized or first_of_shard:
                n = len(split) if self.quantized else min(TAIL_SAMPLE, b)
                derived = self.tail(self.restored(out, "split_tokens")[:n].flatten(0, 1).to(self.device))  # (n*V, N, D)
                if self.quantized:          # the target, derived from what stage 2's student reads
                    final_ref = derived
        final = final_ref.reshape(b, v, self.num_patches, self.dim)                     # (B, V, N, D)
        self.put(out, stats, "features", "final", final, items, "final",
                 ref=tokens.final.reshape(b, v, self.num_patches, self.dim))
        if self.num_tokens is not None and (self.quantized or first_of_shard):
            stored_final = self.restored(out, "features")[:n].flatten(0, 1)
            stats["tail"] = error_stats(stored_final, derived.float().cpu())
        return out, stats

    def restored(self, out: dict, name: str) -> torch.Tensor:
        """The stored values of `name` back as fp32 (what a reader returns after dequantising)."""
        return from_stored(out[name], self.spec.dtype, torch.float32, scale=out.get(scale_name(name)))

    def put(self, out: dict, stats: dict, name: str, layer: str, tokens: torch.Tensor, items: list[dict],
            what: str, ref: torch.Tensor | None = None) -> None:
        """Store `tokens` as out[name] (+ out[name_scale]); stats[layer]: their error against `ref`
        (default: `tokens`). CacheError naming the image and layer if any value is not finite."""
        a, scale = to_stored(tokens, self.spec.dtype)
        self.check_finite(tokens, a, items, what)
        out[name] = a
        if scale is not None:
            out[scale_name(name)] = scale
        stats[layer] = error_stats(self.restored(out, name), (tokens if ref is None else ref).float().cpu())

    def check_finite(self, tokens: torch.Tensor, a: np.ndarray, items: list[dict], layer: str) -> None:
        finite = torch.isfinite(tokens).flatten(1).all(1).cpu()
        if self.spec.dtype == "fp16":
            finite &= torch.from_numpy(np.isfinite(a).reshape(len(a), -1).all(1))
        if bool(finite.all()):
            return
        i = int((~finite).nonzero()[0, 0])
        src = "non-finite values (NaN/inf)" if not torch.isfinite(tokens[i]).all() else \
            "values beyond fp16's range (|x| > 65504), inf once stored as fp16"
        fix = "store with --dtype bf16 or fp32" if "fp16" in src else "check the encoder weights (--weights)"
        raise CacheError(f"image {items[i]['id']} (row {items[i]['index']}) of dataset {self.spec.dataset}: "
                         f"the encoder's {layer} tokens hold {src}; nothing is stored for it: {fix}, then "
                         f"rerun the same command to resume")
