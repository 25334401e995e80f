"""Dataclass configs for every component, and named presets with the reference's defaults.

`preset("coco")` gives the stage-1 model of the paper's COCO run; `preset("coco", stage=2)` the
stage-2 student. `tiny` is a few-thousand-parameter model for tests; `demo` the model of `spot-fast demo`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
    name: str = "dino_vitb16"   # a key of ENCODERS, or "custom" (a plain ViT from the fields below)
    image_size: int = 224       # square input resolution
    split_block: int = 8        # stage 2 fine-tunes blocks >= this index (of `depth`)
    # Only read when name == "custom" (tests, the demo): a timm VisionTransformer of this shape.
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # Position table of a custom ViT built without weights: "learned" (timm's, ~0 at init, so such
    # features say nothing about where a patch is) | "sincos" (a fixed 2-D sin-cos table: the demo).
    position: str = "learned"
    position_scale: float = 0.25    # "sincos": the table's amplitude (about the patch embeddings' scale)

    def __post_init__(self):
        if self.position not in ("learned", "sincos"):
            raise ValueError(f"encoder position must be 'learned' or 'sincos', got {self.position!r}")
        if self.position != "learned" and self.name != "custom":
            raise ValueError(f"encoder position {self.position!r} is for custom encoders only; "
                             f"{self.name!r} brings its own table: leave position='learned'")
        if not self.position_scale > 0:
            raise ValueError(f"encoder position_scale must be > 0, got {self.position_scale}")

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
    num_slots: int = 7          # K
    slot_size: int = 256        # S
    mlp_hidden: int = 1024      # hidden width of the slot-update MLP
    num_iterations: int = 3     # T
    num_heads: int = 1          # heads of the joint (heads x slots) softmax; SPOT uses 1
    init: str = "shared_gaussian"   # "shared_gaussian" | "embedding"
    truncate: str = "none"          # "bi-level" | "fixed-point" | "none"
    use_kernel: bool = False    # opt-in: the fused Triton step on CUDA (not yet proven on a GPU)

    def __post_init__(self):
        if self.init not in ("shared_gaussian", "embedding"):
            raise ValueError(f"slot init must be 'shared_gaussian' or 'embedding', got {self.init!r}")
        if self.truncate not in ("bi-level", "fixed-point", "none"):
            raise ValueError(f"truncate must be 'bi-level', 'fixed-point' or 'none', got {self.truncate!r}")
        if self.slot_size % self.num_heads:
            raise ValueError(f"slot_size {self.slot_size} is not divisible by num_heads {self.num_heads}")


@dataclass
class DecoderConfig:
    kind: str = "transformer"   # "transformer" (SPOT's AR decoder) | "mlp" (DINOSAUR baseline)
    num_blocks: int = 4
    num_heads: int = 6
    num_cross_heads: int | None = None   # later blocks' cross-attention heads (None: num_heads)
    mlp_hidden: int = 2048      # hidden width of the MLP decoder
    train_orders: str = "random"     # "random" (one order per step) | "per_sample" | "standard" | "all"
    eval_orders: str = "standard"    # "standard" | "random" | "all"

    def __post_init__(self):
        if self.kind not in ("transformer", "mlp"):
            raise ValueError(f"decoder kind must be 'transformer' or 'mlp', got {self.kind!r}")
        if self.train_orders not in ("random", "per_sample", "standard", "all"):
            raise ValueError(f"train_orders must be random|per_sample|standard|all, got {self.train_orders!r}")
        if self.eval_orders not in ("standard", "random", "all"):
            raise ValueError(f"eval_orders must be standard|random|all, got {self.eval_orders!r}")
        if self.kind == "mlp" and (self.train_orders != "standard" or self.eval_orders != "standard"):
            raise ValueError("the MLP decoder only has the raster order: use train_orders=eval_orders='standard'")

    @property
    def cross_heads(self) -> int:
        return self.num_heads if self.num_cross_heads is None else self.num_cross_heads

    @property
    def num_orders(self) -> int:
        """P: how many patch orders (and BOS tokens) the model is built with."""
        return 1 if self.kind == "mlp" or self.train_orders == "standard" else 9


@dataclass
class OptimConfig:
    batch_size: int = 64
    epochs: int = 50
    lr: float = 4e-4            # peak learning rate (Adam, betas 0.9/0.999, no weight decay)
    lr_min: float = 4e-7        # end of the per-iteration cosine decay
    warmup_steps: int = 10000   # warm-up lasts int(warmup_steps / (len(train) / batch)) epochs
    clip: float = 0.3           # gradient clipping, infinity norm
    ce_weight: float = 5e-3     # stage-2 distillation weight (start of its cosine schedule)
    final_ce_weight: float | None = None  # end of that schedule (None: constant ce_weight)


@dataclass
class SPOTConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    slot_attention: SlotAttentionConfig = field(default_factory=SlotAttentionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: int = 1              # 1: frozen encoder; 2: student with a fine-tuned encoder tail

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
    64 wide) with a sin-cos position table as strong as its patch embeddings (scale 1: masks follow
    places as well as colours; 0.25 gave mBO^i ~10 lower), 7 small slots (3-4 objects + background;
    7 keeps objects from sharing a slot, and a grid of 7 has to split objects), small decoders,
    a short high-lr schedule (50 epochs: 30 left FG-ARI ~8 lower): minutes on a CPU. Stage 2
    (_STAGE2_OPTIM) gets 50 epochs too (~100 s on 2 cores; 30 left its decoder masks' FG-ARI 2-4
    lower, 49.6-52.3 against 53.8-54.1 over seeds 0-2)."""
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
                 "demo": dict(epochs=50)}  # demo: as long as the time budget allows (see _demo)


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
