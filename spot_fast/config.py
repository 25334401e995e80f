"""Dataclass configs for every component, and named presets with the reference's defaults.

`preset("coco")` gives the stage-1 model of the paper's COCO run; `preset("coco", stage=2)` the
stage-2 student. `tiny` is a few-thousand-parameter model for tests; `demo` the model of `spot-fast demo`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from spot_fast.fields import ConfigError, check_fields, setting


@dataclass(frozen=True)
class EncoderSpec:
    """What a frozen ViT is: enough to build it with timm and to size everything after it."""
    timm_name: str | None      # timm architecture (None: built from the fields below)
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    num_registers: int = 0     # register tokens after CLS (DINOv2-reg)
    mlp_ratio: float = 4.0     # block MLP width / embed_dim (custom encoders)
    hf_repo: str | None = None  # Hugging Face repo holding timm weights (looked up in the local cache only)
    torch_hub_file: str | None = None  # file name of the original release in ~/.cache/torch/hub/checkpoints


ENCODERS: dict[str, EncoderSpec] = {
    "dino_vitb16": EncoderSpec("vit_base_patch16_224.dino", 16, 768, 12, 12,
                               hf_repo="timm/vit_base_patch16_224.dino",
                               torch_hub_file="dino_vitbase16_pretrain.pth"),
    "dino_vits8": EncoderSpec("vit_small_patch8_224.dino", 8, 384, 12, 6,
                              hf_repo="timm/vit_small_patch8_224.dino",
                              torch_hub_file="dino_deitsmall8_pretrain.pth"),
    "dino_vitb8": EncoderSpec("vit_base_patch8_224.dino", 8, 768, 12, 12,
                              hf_repo="timm/vit_base_patch8_224.dino",
                              torch_hub_file="dino_vitbase8_pretrain.pth"),
    "dinov2_vits14": EncoderSpec("vit_small_patch14_dinov2.lvd142m", 14, 384, 12, 6,
                                 hf_repo="timm/vit_small_patch14_dinov2.lvd142m",
                                 torch_hub_file="dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": EncoderSpec("vit_base_patch14_dinov2.lvd142m", 14, 768, 12, 12,
                                 hf_repo="timm/vit_base_patch14_dinov2.lvd142m",
                                 torch_hub_file="dinov2_vitb14_pretrain.pth"),
    "dinov2_vits14_reg": EncoderSpec("vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, 12, 6, 4,
                                     hf_repo="timm/vit_small_patch14_reg4_dinov2.lvd142m",
                                     torch_hub_file="dinov2_vits14_reg4_pretrain.pth"),
    "dinov2_vitb14_reg": EncoderSpec("vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, 12, 12, 4,
                                     hf_repo="timm/vit_base_patch14_reg4_dinov2.lvd142m",
                                     torch_hub_file="dinov2_vitb14_reg4_pretrain.pth"),
    "mae_vitb16": EncoderSpec("vit_base_patch16_224.mae", 16, 768, 12, 12,
                              hf_repo="timm/vit_base_patch16_224.mae",
                              torch_hub_file="mae_pretrain_vit_base.pth"),
}


@dataclass
class EncoderConfig:
    name: str = setting("dino_vitb16", choices=(*ENCODERS, "custom"))  # a key of ENCODERS, or "custom" (a plain ViT)
    image_size: int = setting(224, min=1)   # square input resolution
    split_block: int = setting(8, min=0)    # stage 2 fine-tunes blocks >= this index (of `depth`)
    # Only read when name == "custom" (tests, the demo): a timm VisionTransformer of this shape.
    patch_size: int = setting(16, min=1)    # custom ViT: pixels per patch side
    embed_dim: int = setting(768, min=1)    # custom ViT: token width
    depth: int = setting(12, min=1)         # custom ViT: blocks
    num_heads: int = setting(12, min=1)     # custom ViT: attention heads (divide embed_dim)
    mlp_ratio: float = setting(4.0, above=0)    # custom ViT: block MLP width / embed_dim
    # Position table of a custom ViT built without weights: "learned" (timm's, ~0 at init, so such
    # features say nothing about where a patch is) | "sincos" (a fixed 2-D sin-cos table: the demo).
    position: Literal["learned", "sincos"] = "learned"
    # "sincos": the table's amplitude (about the patch embeddings' scale)
    position_scale: float = setting(0.25, above=0)

    def __post_init__(self):
        if self.name != "custom" and self.name not in ENCODERS:
            choices = f"choose one of {sorted(ENCODERS)} or 'custom'"
            raise ConfigError("name", f"must be a key of ENCODERS or 'custom', got {self.name!r}",
                              f"unknown encoder {self.name!r}: {choices}")
        check_fields(self)
        if self.position != "learned" and self.name != "custom":
            raise ConfigError("position", f"{self.position!r} is for custom encoders only; "
                              f"{self.name!r} brings its own table: leave position='learned'")
        if self.name == "custom" and self.embed_dim % self.num_heads:
            raise ConfigError("num_heads", f"must divide embed_dim {self.embed_dim}, got {self.num_heads}")

    @property
    def spec(self) -> EncoderSpec:
        if self.name == "custom":
            return EncoderSpec(None, self.patch_size, self.embed_dim, self.depth, self.num_heads,
                               mlp_ratio=self.mlp_ratio)
        if self.name not in ENCODERS:
            raise ValueError(f"unknown encoder {self.name!r}: choose one of {sorted(ENCODERS)} or 'custom'")
        return ENCODERS[self.name]

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) token grid."""
        return self.image_size // self.spec.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def feature_dim(self) -> int:
        return self.spec.embed_dim


@dataclass
class SlotAttentionConfig:
    num_slots: int = setting(7, min=1, flag="slots")        # K, slots per image
    slot_size: int = setting(256, min=1)    # S, slot width
    mlp_hidden: int = setting(1024, min=1)  # hidden width of the slot-update MLP
    num_iterations: int = setting(3, min=1, flag="iterations")  # T, slot-attention iterations
    num_heads: int = setting(1, min=1)      # heads of the joint (heads x slots) softmax (divide slot_size); SPOT uses 1
    init: Literal["shared_gaussian", "embedding"] = setting("shared_gaussian", flag="init")  # slot initialisation
    # gradient truncation of the iterations
    truncate: Literal["bi-level", "fixed-point", "none"] = setting("none", flag="truncate")
    use_kernel: bool = False    # opt-in: the fused Triton step on CUDA (not yet proven on a GPU)

    def __post_init__(self):
        check_fields(self)
        if self.slot_size % self.num_heads:
            raise ConfigError("num_heads", f"must divide slot_size {self.slot_size}, got {self.num_heads}")


@dataclass
class DecoderConfig:
    # transformer (SPOT's AR decoder) | mlp (the DINOSAUR baseline)
    kind: Literal["transformer", "mlp"] = setting("transformer", flag="decoder")
    num_blocks: int = setting(4, min=1)     # transformer blocks
    num_heads: int = setting(6, min=1)      # attention heads (divide the feature width)
    num_cross_heads: int | None = setting(None, min=1)   # later blocks' cross-attention heads (None: num_heads)
    mlp_hidden: int = setting(2048, min=1)  # hidden width of the MLP decoder
    # patch orders in training: one per step | one per sample | raster only | all of them
    train_orders: Literal["random", "per_sample", "standard", "all"] = setting("random", flag="train-orders")
    eval_orders: Literal["standard", "random", "all"] = "standard"   # patch orders decoded in evaluation

    def __post_init__(self):
        check_fields(self)
        if self.kind == "mlp" and (self.train_orders != "standard" or self.eval_orders != "standard"):
            raise ConfigError("kind", "is 'mlp': the MLP decoder only has the raster order; "
                              "give it train_orders and eval_orders 'standard'")

    @property
    def cross_heads(self) -> int:
        return self.num_heads if self.num_cross_heads is None else self.num_cross_heads

    @property
    def num_orders(self) -> int:
        """P: how many patch orders (and BOS tokens) the model is built with."""
        return 1 if self.kind == "mlp" or self.train_orders == "standard" else 9


@dataclass
class OptimConfig:
    batch_size: int = setting(64, min=1)    # images per optimiser step on each rank
    epochs: int = setting(50, min=1)        # passes over the train cache
    lr: float = setting(4e-4, above=0)      # peak learning rate (Adam, betas 0.9/0.999, no weight decay)
    lr_min: float = setting(4e-7, min=0)    # end of the per-iteration cosine decay (<= lr)
    warmup_steps: int = setting(10000, min=0)   # warm-up lasts int(warmup_steps / (len(train) / batch)) epochs
    clip: float = setting(0.3, above=0)     # gradient clipping, infinity norm
    ce_weight: float = setting(5e-3, min=0, flag="ce-weight")   # stage-2 distillation weight (cosine start)
    final_ce_weight: float | None = setting(None, min=0)  # end of that schedule (None: constant ce_weight)

    def __post_init__(self):
        check_fields(self)
        if self.lr_min > self.lr:
            raise ConfigError("lr_min", f"must be <= lr {self.lr:g}, got {self.lr_min:g}")


@dataclass
class SPOTConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    slot_attention: SlotAttentionConfig = field(default_factory=SlotAttentionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: Literal[1, 2] = 1    # 1: frozen encoder; 2: student with a fine-tuned encoder tail

    def __post_init__(self):
        check_fields(self)
        if self.stage == 2 and self.encoder.split_block >= self.encoder.spec.depth:
            raise ConfigError("encoder.split_block", f"must be below the encoder's depth {self.encoder.spec.depth} "
                              f"(stage 2 fine-tunes the blocks from it on), got {self.encoder.split_block}")
        d = self.decoder
        for heads in {d.num_heads, d.cross_heads} if d.kind == "transformer" else ():
            if self.feature_dim % heads:
                raise ConfigError("decoder.num_heads", f"must divide the feature width {self.feature_dim} "
                                  f"(num_heads and num_cross_heads), got {heads}")

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    @property
    def grid_size(self) -> int:
        return self.encoder.grid_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SPOTConfig":
        return cls(encoder=EncoderConfig(**d["encoder"]),
                   slot_attention=SlotAttentionConfig(**d["slot_attention"]),
                   decoder=DecoderConfig(**d["decoder"]),
                   optim=OptimConfig(**d.get("optim", {})),
                   stage=d.get("stage", 1))


def stage2(cfg: SPOTConfig) -> SPOTConfig:
    """The stage-2 student of a stage-1 config: embedding init, bi-level truncation."""
    sa = dataclasses.replace(cfg.slot_attention, init="embedding", truncate="bi-level")
    return dataclasses.replace(cfg, slot_attention=sa, stage=2)


def teacher(cfg: SPOTConfig) -> SPOTConfig:
    """The stage-2 teacher (the stage-1 model): shared-Gaussian init, no truncation, one random order."""
    sa = dataclasses.replace(cfg.slot_attention, init="shared_gaussian", truncate="none")
    dec = dataclasses.replace(cfg.decoder, eval_orders="random")
    return dataclasses.replace(cfg, slot_attention=sa, decoder=dec, stage=1)


def _coco() -> SPOTConfig:
    return SPOTConfig(slot_attention=SlotAttentionConfig(num_slots=7),
                      optim=OptimConfig(epochs=50))


def _voc() -> SPOTConfig:
    return SPOTConfig(slot_attention=SlotAttentionConfig(num_slots=6),
                      optim=OptimConfig(epochs=560))


def _movi(num_slots: int) -> SPOTConfig:
    return SPOTConfig(slot_attention=SlotAttentionConfig(num_slots=num_slots),
                      optim=OptimConfig(epochs=65, lr=2e-4, lr_min=4e-5))


def _tiny() -> SPOTConfig:
    return SPOTConfig(
        encoder=EncoderConfig(name="custom", image_size=32, patch_size=8, embed_dim=32, depth=4,
                              num_heads=2, split_block=2),
        slot_attention=SlotAttentionConfig(num_slots=3, slot_size=16, mlp_hidden=24),
        decoder=DecoderConfig(num_blocks=2, num_heads=2, mlp_hidden=40),
        optim=OptimConfig(batch_size=8, epochs=2, warmup_steps=10))


def _demo() -> SPOTConfig:
    """`spot-fast demo`: 64 px synthetic scenes, a 2-block random-init ViT (8x8 patches of 8 px,
    64 wide) with a sin-cos position table as strong as its patch embeddings, 7 small slots
    (3-4 objects + background), small decoders and a short high-lr schedule: minutes on a CPU."""
    return SPOTConfig(
        encoder=EncoderConfig(name="custom", image_size=64, patch_size=8, embed_dim=64, depth=2,
                              num_heads=2, split_block=1, position="sincos", position_scale=1.0),
        slot_attention=SlotAttentionConfig(num_slots=7, slot_size=32, mlp_hidden=64),
        decoder=DecoderConfig(num_blocks=2, num_heads=2, mlp_hidden=64),
        optim=OptimConfig(batch_size=32, epochs=50, lr=4e-3, lr_min=4e-5, warmup_steps=32))


PRESETS = {"coco": _coco, "voc": _voc, "movi-c": lambda: _movi(11), "movi-e": lambda: _movi(24),
           "tiny": _tiny, "demo": _demo}

# Stage-2 epochs and learning rates where they differ from stage 1 (spec section 5).
_STAGE2_OPTIM = {"movi-c": dict(epochs=30, lr_min=1.5e-4), "movi-e": dict(epochs=30, lr_min=1.5e-4),
                 "demo": dict(epochs=50)}


def preset(name: str, stage: int = 1) -> SPOTConfig:
    """A named configuration: coco, voc, movi-c, movi-e (the reference's defaults), tiny or demo."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    if stage == 2:
        cfg = stage2(cfg)
        if name in _STAGE2_OPTIM:
            cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **_STAGE2_OPTIM[name]))
    elif stage != 1:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    return cfg
