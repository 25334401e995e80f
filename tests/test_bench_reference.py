"""The bench's transcription of the reference code (spot_fast.bench.reference) computes what
spot-fast's SPOT computes, on the same weights and inputs, in float64: the baseline's cost is
the reference's, its maths SPOT's. Weights reach the transcription through
`spot_fast.checkpoint.export_reference` (the reference's own names, loaded strictly), so a
renamed or re-shaped parameter fails here too. The metrics are checked against
spot_fast.metrics, an independent implementation (one contingency table per batch)."""
import random

import pytest
import torch

from spot_fast.bench.reference.metrics import ARI, MaskIoU
from spot_fast.bench.reference.model import ReferenceSPOT
from spot_fast.bench.reference.steps import Evaluation, Stage2, vit
from spot_fast.checkpoint import export_reference
from spot_fast.config import preset, stage2, teacher
from spot_fast.encoders import FrozenEncoder
from spot_fast.losses import stage2_loss
from spot_fast.metrics import MetricAccumulator
from spot_fast.model import SPOT

B = 3


def close(a, b):
    """Equal up to float64 rounding, relative to the tensor's scale."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = preset("tiny")
    encoder = FrozenEncoder.create(cfg.encoder, random_init=True).double()
    images = torch.randn(B, 3, cfg.encoder.image_size, cfg.encoder.image_size, dtype=torch.float64)
    return cfg, encoder, images


def transcription(model: SPOT, encoder: FrozenEncoder, second: bool = False, **kw) -> ReferenceSPOT:
    vit_state = encoder.vit.state_dict()
    frozen = vit(model.cfg, vit_state)
    first = vit(model.cfg, vit_state) if model.cfg.stage == 2 else frozen
    ref = ReferenceSPOT(model.cfg, first, frozen if model.cfg.stage == 2 or second else None,
                        model.cfg.encoder.split_block if model.cfg.stage == 2 else 100, **kw).double()
    state = export_reference(model, frozen_encoder=vit_state, wrap=False)
    if second and model.cfg.stage == 1:
        state.update({f"second_encoder.{k}": v for k, v in vit_state.items()})
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("order", [0, 5])
def test_stage1_forward_and_gradients_equal_spot_fast(parts, order):
    cfg, encoder, images = parts
    torch.manual_seed(1)
    model = SPOT(cfg).double().train()
    ref = transcription(model, encoder).train()
    noise = torch.randn(B, cfg.slot_attention.num_slots, cfg.slot_attention.slot_size, dtype=torch.float64)
    out = model(encoder(images).final, orders=order, noise=noise)
    random.setstate(_seed_drawing(order))          # the reference draws its order with Python's random
    mse, sa_masks, dec_masks, slots, recon, logits = ref(images, noise)
    assert close(mse, out.loss) and close(recon, out.recon) and close(slots, out.slots)
    assert close(sa_masks, out.sa_masks) and close(dec_masks, out.dec_masks) and close(logits, out.sa_logits)
    out.loss.backward()
    mse.backward()
    ours = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if name == "slot_attn.slot_attention.project_q.weight":
            assert close(p.grad, ours["slot_attention.to_q.weight"].grad)
        if name == "dec.blocks.1.ffn.2.weight":
            assert close(p.grad, ours["decoder.blocks.1.ffn.2.weight"].grad)


def _seed_drawing(order: int):
    """A Python RNG state whose next `random.choice(range(9))` is `order`."""
    for seed in range(1000):
        random.seed(seed)
        state = random.getstate()
        if random.choice(range(9)) == order:
            return state
    raise AssertionError("no seed draws that order")


def test_stage2_loss_equals_spot_fast(parts):
    """Student (fine-tuned tail + frozen target encoder), teacher decode, Hungarian matching,
    cross-entropy: the transcription's total, MSE and CE equal spot-fast's stage-2 loss."""
    cfg, encoder, images = parts
    torch.manual_seed(2)
    student = SPOT(stage2(cfg)).double().train()
    student.load_tail(encoder.vit.state_dict())
    with torch.no_grad():                            # a tail that differs from the frozen blocks
        for p in student.encoder_tail.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tutor = SPOT(teacher(cfg)).double().eval()
    step = Stage2.__new__(Stage2)                   # its loss only: no loader, no optimiser
    step.K, step.optim = cfg.slot_attention.num_slots, cfg.optim
    step.student = transcription(student, encoder).train()
    step.teacher = transcription(tutor, encoder).eval()
    noise = torch.randn(B, cfg.slot_attention.num_slots, cfg.slot_attention.slot_size, dtype=torch.float64)
    random.setstate(_seed_drawing(4))               # teacher's order, then the student's
    total, mse, ce = step.loss(images, noise)
    state = random.getstate()
    random.setstate(_seed_drawing(4))
    t_order = random.choice(range(9))
    s_order = random.choice(range(9))
    random.setstate(state)
    tokens = encoder(images, split_block=cfg.encoder.split_block)
    t = tutor(tokens.final, orders=t_order, noise=noise)
    out = student(tokens.split, target=tokens.final, orders=s_order)
    loss = stage2_loss(out, t.dec_masks, cfg.optim.ce_weight)
    assert close(mse, loss.mse) and close(ce, loss.ce) and close(total, loss.total)


def test_evaluation_masks_and_metrics_equal_spot_fast(parts):
    """Every order with a second encoder: the masks equal spot-fast's `orders="all"`, and the
    transcribed metrics (one-hot, per-image loops) equal spot_fast.metrics on those masks."""
    cfg, encoder, images = parts
    torch.manual_seed(3)
    model = SPOT(stage2(cfg)).double().eval()
    model.load_tail(encoder.vit.state_dict())
    ref = transcription(model, encoder, eval_orders="all").eval()
    with torch.no_grad():
        tokens = encoder(images, split_block=cfg.encoder.split_block)
        out = model(tokens.split, target=tokens.final, orders="all")
        mse, sa_masks, dec_masks = ref(images)[:3]
    assert close(mse, out.loss) and close(dec_masks, out.dec_masks) and close(sa_masks, out.sa_masks)
    size, g = 24, torch.Generator().manual_seed(0)
    instance = torch.randint(0, 4, (B, size, size), generator=g)
    instance[0] = 0                                             # an image without objects
    cls = (instance * 2) % 5
    ignore = (torch.rand(B, 1, size, size, generator=g) < 0.1).long()
    ev = Evaluation.__new__(Evaluation)
    ev.mask_size, ev.val_mse = size, 0.0
    ev.metrics = {n: ARI() if n.startswith("ari") else MaskIoU("hungarian" if "miou" in n else "best_overlap")
                  for n in ("mbo_i", "mbo_c", "miou", "ari", "mbo_i_slot", "mbo_c_slot", "miou_slot", "ari_slot")}
    ev.update((mse, sa_masks.float(), dec_masks.float()), instance, cls, ignore)
    got = ev.compute()
    from spot_fast.metrics import masks_to_labels
    for suffix, masks in (("", dec_masks), ("_slot", sa_masks)):
        acc = MetricAccumulator()
        acc.update(masks_to_labels(masks.float(), size), instance, cls, ignore)
        want = acc.compute()
        for ours, theirs in (("mbo_i", "mbo_i"), ("mbo_c", "mbo_c"), ("miou", "miou"), ("ari", "fg_ari")):
            assert got[ours + suffix] == pytest.approx(want[theirs], abs=1e-9), ours + suffix



def test_reference_dataset_masks_equal_spot_fast_coco_masks(tmp_path):
    """The reference's mask arithmetic (transcribed for its cost) gives spot_fast.data.coco's masks."""
    import numpy as np
    from spot_fast.bench.reference.data import ReferenceCOCO, masks, write_dataset
    from spot_fast.data.coco import coco_masks
    root = write_dataset(tmp_path, images=3, entries=3, short_side=64)
    ds = ReferenceCOCO(root, "val", 32, 40)
    for i in range(3):
        meta = ds.coco.imgs[ds.ids[i]]
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=ds.ids[i]))
        assert len(anns) >= 5
        want = coco_masks(anns, meta["height"], meta["width"])
        assert all(np.array_equal(a, b) for a, b in zip(masks(anns, meta["height"], meta["width"]), want))
    image, instance, cls, ignore = ds[0]
    assert image.shape == (3, 32, 32) and instance.shape == cls.shape == (40, 40) and ignore.shape == (1, 40, 40)


def test_flop_count_of_the_reference_rows_matches_torch_counter(parts):
    """bench_steps' reference count = what torch counts in the transcription: the evaluation's
    two encoder forwards and 9 serial orders (stage 1's one forward, without the backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    from spot_fast.bench import flops
    cfg, encoder, _ = parts
    images = torch.randn(B, 3, cfg.encoder.image_size, cfg.encoder.image_size)
    model = SPOT(stage2(cfg)).eval()
    ref = transcription(model, FrozenEncoder.create(cfg.encoder, random_init=True), eval_orders="all").float().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ref(images)
    assert counter.get_total_flops() == flops.bench_steps(cfg, B)["eval"]["reference"]
    one = transcription(SPOT(cfg), FrozenEncoder.create(cfg.encoder, random_init=True), eval_orders="standard").float().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        one(images)
    assert counter.get_total_flops() == flops.spot_forward(cfg, B) + flops.encoder(cfg, B)
