"""The frozen tail of a stage-2 cache: the encoder's blocks >= split_block, from the cache's
tail.safetensors, mapping stored split tokens to final tokens on the device.

    tail = FrozenTail.from_cache(cache, encoder_cfg).to(device)
    for batch in device_batches(reader, device, torch.bfloat16, targets=tail):
        ...        # batch["features"] = tail(batch["split_tokens"]): the stage-2 target, exactly
                   # what the frozen tail makes of what the student reads (tail consistency 0)

Why: an 8-bit cache stores final tokens to 8 bits, so the frozen tail applied to the stored split
tokens differs from them by their rounding (`cache info`: tail consistency). Deriving the target
on the device instead costs one no-grad pass of the tail blocks per step and removes it.
"""
from __future__ import annotations

import torch
from torch import nn

from spot_fast.cache.manifest import CacheError
from spot_fast.cache.store import CacheStore
from spot_fast.config import EncoderConfig
from spot_fast.encoders import build_tail


class FrozenTail(nn.Module):
    """Blocks split_block.. of the frozen encoder (no final norm, as the cached final tokens)."""

    def __init__(self, blocks: nn.ModuleList, num_prefix_tokens: int):
        super().__init__()
        self.blocks = blocks.eval().requires_grad_(False)
        self.num_prefix_tokens = num_prefix_tokens

    @classmethod
    def from_cache(cls, cache: CacheStore, cfg: EncoderConfig) -> "FrozenTail":
        """The tail of `cache` (its tail.safetensors), with the block architecture of `cfg`."""
        if cfg.split_block != cache.split_block:
            raise CacheError(f"cache {cache.path} holds the tail from block {cache.split_block}, the config "
                             f"says split_block={cfg.split_block}")
        blocks = build_tail(cfg)
        b = cfg.split_block
        state = {f"{int(k.split('.')[1]) - b}.{k.split('.', 2)[2]}": v
                 for k, v in cache.tail_state().items() if k.startswith("blocks.")}
        blocks.load_state_dict(state)
        return cls(blocks, cache.manifest["num_prefix_tokens"])

    @torch.no_grad()
    def forward(self, split: torch.Tensor) -> torch.Tensor:
        """split tokens (B, P+N, D) -> final tokens (B, N, D), computed in float32."""
        x = split.float()
        for block in self.blocks:
            x = block(x)
        return x[:, self.num_prefix_tokens:]
