"""The SPOT model on features (spec sections 2-4).

Stage 1 consumes cached final tokens. Stage 2 (`cfg.stage == 2`) owns the fine-tuned encoder tail
(timm blocks >= split_block, initialised from the frozen encoder) that turns cached split-layer
tokens (CLS/registers included) into its slot-attention input; its decoder target stays the
frozen final tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from spot_fast.config import SPOTConfig
from spot_fast.decoder import ARDecoder, MLPDecoder
from spot_fast.encoders import build_tail
from spot_fast.errors import UserError
from spot_fast.slot_attention import SlotAttention


def tail_name(block_name: str, split_block: int) -> str | None:
    """The encoder's timm name `blocks.{i}.<rest>` (i >= split_block) -> the stage-2 tail's
    `{i - split_block}.<rest>`; None for every other encoder parameter."""
    parts = block_name.split(".", 2)
    if parts[0] != "blocks" or len(parts) < 3 or int(parts[1]) < split_block:
        return None
    return f"{int(parts[1]) - split_block}.{parts[2]}"


def block_name(tail_name: str, split_block: int) -> str:
    """The inverse of `tail_name`: `{j}.<rest>` -> `blocks.{j + split_block}.<rest>`."""
    j, rest = tail_name.split(".", 1)
    return f"blocks.{int(j) + split_block}.{rest}"


class ModelInputError(UserError, ValueError):
    """An input SPOT.forward cannot take (shape, dtype, device, empty batch); the message says which."""


@dataclass
class SPOTOutput:
    loss: torch.Tensor | None   # () reconstruction MSE, sum((target - recon)^2) / (B * N * D)
    recon: torch.Tensor | None  # (B, N, D) raster order, mean over the decoded orders (None: masks_only)
    dec_masks: torch.Tensor  # (B, K, h, w) decoder cross-attention masks (last block)
    sa_masks: torch.Tensor   # (B, K, h, w) slot-attention masks (last iteration)
    sa_logits: torch.Tensor  # (B, N, K) last-iteration logits ((B, H, N, K) with H > 1 heads)
    slots: torch.Tensor      # (B, K, S)


class SPOT(nn.Module):
    def __init__(self, cfg: SPOTConfig):
        super().__init__()
        self.cfg = cfg
        D, S, grid = cfg.feature_dim, cfg.slot_attention.slot_size, cfg.grid_size
        self.encoder_tail = build_tail(cfg.encoder) if cfg.stage == 2 else None
        self.num_prefix_tokens = 1 + cfg.encoder.spec.num_registers
        self.slot_attention = SlotAttention(cfg.slot_attention, D)
        decoder_cls = ARDecoder if cfg.decoder.kind == "transformer" else MLPDecoder
        self.decoder = decoder_cls(cfg.decoder, D, S, grid)

    @property
    def num_orders(self) -> int:
        return self.cfg.decoder.num_orders

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Stage 2: split-layer tokens (B, P+N, D) -> features (B, N, D). Stage 1: identity."""
        if self.encoder_tail is None:
            return inputs
        x = inputs
        for block in self.encoder_tail:
            x = block(x)
        return x[:, self.num_prefix_tokens:]

    def load_tail(self, frozen_state: dict[str, torch.Tensor]) -> None:
        """Initialise the stage-2 tail from the frozen encoder's `blocks.{i}.*` (timm names)."""
        b = self.cfg.encoder.split_block
        state = {name: v for k, v in frozen_state.items() if (name := tail_name(k, b)) is not None}
        self.encoder_tail.load_state_dict(state)

    def order_ids(self, batch: int, orders=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, R) order indices to decode. `orders`: None (the config's train/eval default for
        the current mode), "standard", "random", "per_sample", "all", an int, or a tensor."""
        device = self.decoder.bos.device if hasattr(self.decoder, "bos") else None
        if isinstance(orders, (list, tuple)):            # the same R orders for every sample
            return torch.tensor(orders, dtype=torch.long, device=device).expand(batch, len(orders))
        if isinstance(orders, torch.Tensor):
            ids = orders.to(device=device, dtype=torch.long)
            if ids.dim() == 0:
                return ids.expand(batch, 1)
            return ids.view(batch, 1) if ids.dim() == 1 else ids   # (B,) one per sample, or (B, R)
        if isinstance(orders, int):
            return torch.full((batch, 1), orders, dtype=torch.long, device=device)
        mode = orders or (self.cfg.decoder.train_orders if self.training else self.cfg.decoder.eval_orders)
        P = self.num_orders
        if mode == "standard":
            return torch.zeros(batch, 1, dtype=torch.long, device=device)
        if mode == "all":
            return torch.arange(P, device=device).expand(batch, P)
        if mode == "random":
            p = torch.randint(P, (1,), generator=generator).item()
            return torch.full((batch, 1), p, dtype=torch.long, device=device)
        if mode == "per_sample":
            return torch.randint(P, (batch, 1), generator=generator).to(device)
        raise ValueError(f"unknown orders {orders!r}: use standard|random|per_sample|all, an int or a tensor")

    def _check_inputs(self, inputs: torch.Tensor, target, orders, noise) -> None:
        """One ValueError naming expected vs given. Plain Python on shapes and Python ints only:
        no device sync, nothing torch.compile cannot trace (tensor order values are not checked)."""
        cfg, stage2 = self.cfg, self.encoder_tail is not None
        N, D, P = cfg.grid_size ** 2, cfg.feature_dim, self.num_prefix_tokens
        T = P + N if stage2 else N
        given = tuple(inputs.shape)
        if len(given) != 3 or given[1:] != (T, D):
            what = "split-layer tokens (B, P+N, D)" if stage2 else "features (B, N, D)"
            raise ModelInputError(f"SPOT.forward: inputs of shape {given}, expected {what} = (B, {T}, {D}): "
                             + self._shape_hint(given))
        B, K, S = given[0], cfg.slot_attention.num_slots, cfg.slot_attention.slot_size
        if B == 0:
            raise ModelInputError("SPOT.forward: inputs hold no sample (batch of 0): pass at least one")
        self._check_kind("inputs", inputs)
        if target is not None:
            self._check_kind("target", target)
        for name, t, want in (("target", target, (B, N, D)), ("noise", noise, (B, K, S))):
            if t is not None and tuple(t.shape) != want:
                raise ModelInputError(f"SPOT.forward: {name} of shape {tuple(t.shape)}, expected {want}")
        if isinstance(orders, torch.Tensor) and orders.dim() > 0 and orders.shape[0] != B:
            raise ModelInputError(f"SPOT.forward: orders of shape {tuple(orders.shape)}, expected ({B},) or ({B}, R)")
        ints = [orders] if isinstance(orders, int) else orders if isinstance(orders, (list, tuple)) else []
        if any(isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < self.num_orders for o in ints):
            raise ModelInputError(f"SPOT.forward: orders {orders!r}: order indices run 0..{self.num_orders - 1} "
                             f"(this model has {self.num_orders} orders)")

    def _check_kind(self, name: str, t: torch.Tensor) -> None:
        """The device and dtype the model computes in: its parameters' (under autocast also fp32 or
        bf16, and fp16 on CUDA)."""
        param = next(self.parameters())
        if t.device != param.device:
            raise ModelInputError(f"SPOT.forward: {name} on {t.device}, the model on {param.device}: move one, "
                                  f"e.g. {name}.to('{param.device}')")
        kind = param.device.type
        ok = {param.dtype}
        if torch.is_autocast_enabled(kind):
            ok |= {torch.float32, torch.bfloat16} | ({torch.float16} if kind == "cuda" else set())
        if t.dtype not in ok:
            fix = "fp16 runs on CUDA only: use .float() or .bfloat16() under autocast" \
                if t.dtype == torch.float16 and kind != "cuda" else f"convert with .to({param.dtype})"
            raise ModelInputError(f"SPOT.forward: {name} of dtype {t.dtype}, the model computes in "
                                  f"{param.dtype}: {fix}")

    def _shape_hint(self, given: tuple[int, ...]) -> str:
        """What is wrong with an input of shape `given`, in words."""
        cfg, stage2 = self.cfg, self.encoder_tail is not None
        N, D, P = cfg.grid_size ** 2, cfg.feature_dim, self.num_prefix_tokens
        if len(given) != 3:
            return "add the batch dimension" if len(given) == 2 else "pass a (batch, tokens, width) tensor"
        if given[2] != D:
            return f"width {given[2]} is not the {D} of encoder {cfg.encoder.name}"
        if not stage2 and given[1] == P + N:
            return f"drop the {P} CLS/register tokens (x[:, {P}:])"
        if stage2 and given[1] == N:
            return "stage 2 takes the tokens entering split_block (CLS kept), not the final tokens"
        g = cfg.grid_size
        return f"{given[1]} tokens is not the {g}x{g} grid of {cfg.encoder.image_size}px images"

    def forward(self, inputs: torch.Tensor, target: torch.Tensor | None = None, orders=None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                masks_only: bool = False) -> SPOTOutput:
        """inputs: features (B, N, D) in stage 1, split-layer tokens (B, P+N, D) in stage 2.
        target: the decoder's target features (B, N, D); defaults to the (detached) features,
        which is stage 1. orders / noise: see `order_ids` and `SlotAttention.initial_slots`.
        masks_only: what evaluation needs, the same masks without the reconstruction (loss and
        recon None); the decoder stops at its last cross-attention."""
        self._check_inputs(inputs, target, orders, noise)
        features = self.encode(inputs)
        if target is None:
            target = features.detach()
        B, N, D = target.shape
        K, h = self.cfg.slot_attention.num_slots, self.cfg.grid_size
        sa = self.slot_attention(features, noise=noise)
        ids = self.order_ids(B, orders, generator)
        recon, dec_masks = self.decoder(sa.slots, target, ids, recon=not masks_only)
        if masks_only:
            recon = None
        loss = None if recon is None else ((target - recon) ** 2).sum() / (B * N * D)
        logits = sa.logits.squeeze(1) if sa.logits.shape[1] == 1 else sa.logits
        return SPOTOutput(loss=loss, recon=recon,
                          dec_masks=dec_masks.transpose(-1, -2).reshape(B, K, h, h),
                          sa_masks=sa.attn.transpose(-1, -2).reshape(B, K, h, h),
                          sa_logits=logits, slots=sa.slots)
