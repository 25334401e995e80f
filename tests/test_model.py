"""Behaviour of the model beyond the golden numbers: batched multi-order decoding, per-sample
orders, reference checkpoints both ways, encoder weights from files, presets."""
import copy
import dataclasses

import pytest
import torch

from spot_fast.checkpoint import CheckpointMismatch, export_reference, load_reference
from spot_fast.config import EncoderConfig, PRESETS, preset
from spot_fast.encoders import FrozenEncoder, WeightsNotFound, build_vit
from spot_fast.model import SPOT


def tiny(**decoder):
    cfg = preset("tiny")
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, **decoder))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SPOT(tiny()).eval()


@pytest.fixture
def feats():
    torch.manual_seed(1)
    return torch.randn(3, 16, 32), torch.randn(3, 3, 16)


def test_all_orders_in_one_pass_equal_one_by_one_average(model, feats):
    x, noise = feats
    with torch.no_grad():
        batched = model(x, orders="all", noise=noise)
        singles = [model(x, orders=p, noise=noise) for p in range(9)]
    recon = torch.stack([o.recon for o in singles]).mean(0)
    masks = torch.stack([o.dec_masks for o in singles]).mean(0)
    torch.testing.assert_close(batched.recon, recon, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.dec_masks, masks, atol=1e-6, rtol=0)
    # the loss is the MSE of the mean reconstruction, not the mean of per-order losses
    torch.testing.assert_close(batched.loss, ((x - recon) ** 2).mean(), atol=1e-7, rtol=0)
    assert batched.loss < torch.stack([o.loss for o in singles]).mean()


def test_per_sample_orders_equal_decoding_each_sample_alone(model, feats):
    x, noise = feats
    orders = torch.tensor([4, 0, 8])
    with torch.no_grad():
        out = model(x, orders=orders, noise=noise)
        for b in range(3):
            alone = model(x[b:b + 1], orders=int(orders[b]), noise=noise[b:b + 1])
            torch.testing.assert_close(out.recon[b], alone.recon[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(out.dec_masks[b], alone.dec_masks[0], atol=1e-6, rtol=0)


def test_training_order_modes(feats):
    x, noise = feats
    torch.manual_seed(0)
    m = SPOT(tiny(train_orders="per_sample")).train()
    ids = m.order_ids(64)
    assert ids.shape == (64, 1) and len(ids.unique()) > 1
    m = SPOT(tiny(train_orders="random")).train()
    ids = m.order_ids(64)
    assert len(ids.unique()) == 1          # the reference: one order per step
    m = SPOT(tiny(train_orders="standard")).train()
    assert m.decoder.bos.shape[0] == 1 and m.order_ids(4).eq(0).all()


def test_decoder_masks_are_distributions_over_slots(model, feats):
    out = model(*feats[:1], noise=feats[1])
    torch.testing.assert_close(out.dec_masks.sum(1), torch.ones(3, 4, 4))
    torch.testing.assert_close(out.sa_masks.sum(1), torch.ones(3, 4, 4))


def test_reference_checkpoint_round_trip(model, feats, tmp_path):
    x, noise = feats
    ckpt = export_reference(model)
    assert "bos_tokens" in ckpt["model"] and ckpt["model"]["bos_tokens"].shape == (9, 1, 1, 32)
    assert ckpt["model"]["dec.blocks.0.self_attn_mask"].dtype == torch.bool
    torch.save(ckpt, tmp_path / "ref.pt")
    other = SPOT(tiny()).eval()
    loaded = torch.load(tmp_path / "ref.pt", weights_only=True)
    old_style = {k.replace("dec.", "tf_dec.", 1) if k.startswith("dec.") else k: v
                 for k, v in loaded["model"].items()}                  # older runs: `tf_dec.`
    load_reference(other, old_style)
    with torch.no_grad():
        torch.testing.assert_close(other(x, noise=noise).recon, model(x, noise=noise).recon, atol=0, rtol=0)


def test_mlp_and_stage2_export_round_trip(golden):
    torch.manual_seed(0)
    mlp = SPOT(tiny(kind="mlp", train_orders="standard"))
    state = export_reference(mlp, wrap=False)
    assert state["bos_tokens"].shape[0] == 1 and "input_proj.0.weight" in state
    load_reference(SPOT(tiny(kind="mlp", train_orders="standard")), state)

    s2 = SPOT(preset("tiny", stage=2))
    load_reference(s2, golden["s2/student_state"])
    with pytest.raises(CheckpointMismatch, match="frozen_encoder"):
        export_reference(s2)
    out = export_reference(s2, frozen_encoder=golden["encoder_state"], wrap=False)
    ref = golden["s2/student_state"]
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


def test_mismatched_checkpoint_lists_keys(golden):
    wrong = SPOT(preset("tiny"))        # shared_gaussian model vs an embedding-init checkpoint
    with pytest.raises(CheckpointMismatch) as e:
        load_reference(wrong, golden["s1_embed_bilevel/state"])
    assert "slot_attention.init_mu" in str(e.value)            # missing
    assert "slot_attention.init_embedding" in str(e.value)     # unexpected
    state = dict(golden["s1_gauss_none/state"])
    state["dec.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="dec.extra.weight"):
        load_reference(SPOT(preset("tiny")), state)


def test_stage2_tail_starts_from_frozen_weights(golden):
    cfg = preset("tiny", stage=2)
    student = SPOT(cfg)
    student.load_tail(golden["encoder_state"])
    frozen = FrozenEncoder(cfg.encoder, build_vit(cfg.encoder), "x")
    frozen.vit.load_state_dict(golden["encoder_state"])
    tokens = frozen(golden["image"], split_block=cfg.encoder.split_block)
    torch.testing.assert_close(student.encode(tokens.split), tokens.final, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["pth-dino", "pth-wrapped", "safetensors"])
def test_encoder_weights_from_local_file(golden, tmp_path, fmt):
    cfg = preset("tiny").encoder
    state = golden["encoder_state"]
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}} if fmt == "pth-wrapped"
                   else state, path)
    enc = FrozenEncoder.create(cfg, weights=path)
    assert len(enc.weights_id) == 64
    tokens = enc(golden["image"], split_block=2)
    torch.testing.assert_close(tokens.final, golden["final_tokens"], atol=1e-5, rtol=0)


def test_encoder_weights_from_hf_cache(golden, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    snap = tmp_path / "hub" / "models--timm--vit_base_patch16_224.dino" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--vit_base_patch16_224.dino" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--vit_base_patch16_224.dino" / "refs" / "main").write_text("abc")
    vit = build_vit(EncoderConfig(name="dino_vitb16"))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = FrozenEncoder.create(EncoderConfig(name="dino_vitb16"))
    assert enc.weights_id != "random-init" and len(enc.weights_id) == 64
    assert torch.equal(enc.vit.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)


def test_missing_weights_say_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsNotFound, match="--weights") as e:
        FrozenEncoder.create(EncoderConfig(name="dino_vits8"))
    assert "timm/vit_small_patch8_224.dino" in str(e.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    cfg = preset(name)
    assert cfg.slot_attention.init == "shared_gaussian" and cfg.slot_attention.truncate == "none"
    s2 = preset(name, stage=2)
    assert s2.slot_attention.init == "embedding" and s2.slot_attention.truncate == "bi-level"
    if name == "tiny":
        SPOT(s2)
    expected_slots = {"coco": 7, "voc": 6, "movi-c": 11, "movi-e": 24, "tiny": 3, "demo": 7}[name]
    assert cfg.slot_attention.num_slots == expected_slots


@pytest.mark.parametrize("name", ["dino_vitb16", "dino_vits8", "dinov2_vits14", "dinov2_vits14_reg", "mae_vitb16"])
def test_every_encoder_gives_grid_tokens(name):
    cfg = EncoderConfig(name=name, image_size=112 if "8" in name else 224, split_block=8)
    enc = FrozenEncoder.create(cfg, random_init=True)
    tokens = enc(torch.randn(1, 3, cfg.image_size, cfg.image_size), split_block=8)
    prefix = 1 + cfg.spec.num_registers
    assert tokens.final.shape == (1, cfg.num_patches, cfg.feature_dim)
    assert tokens.split.shape == (1, prefix + cfg.num_patches, cfg.feature_dim)
    assert enc.weights_id.startswith("random-init")
    # timm's own forward, cut by hand: final = the last block's output without the final norm, prefix
    # tokens dropped; split = the input of block 8 (timm run on blocks 0-7, no norm), prefix kept
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    got = enc(images, split_block=8)
    vit = copy.deepcopy(enc.vit)
    vit.norm = torch.nn.Identity()
    with torch.no_grad():
        final = vit.forward_features(images)
        vit.blocks = vit.blocks[:8]
        split = vit.forward_features(images)
    torch.testing.assert_close(got.final, final[:, prefix:], rtol=0, atol=0)
    torch.testing.assert_close(got.split, split, rtol=0, atol=0)
    # and the norm it leaves out is not a no-op here (else the check above could not tell)
    normed = enc.vit.norm(got.final)
    assert (normed - got.final).norm() > 0.1 * got.final.norm()
