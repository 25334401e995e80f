"""The fused slot-attention kernel against an fp64 reference, forward and backward.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (conftest.py sets it then) on CPU tensors;
with a GPU the interpreter stays off and the same tests run on CUDA (benchmarks/gpu_check.sh too). Tests
marked `gpu` need CUDA (bf16 on tensor cores, autotuning, CUDA graphs, inductor, determinism).

Every kernel-vs-reference comparison uses the flash-attention rule (`assert_within_fp32_error`):
the kernel's greatest error against the fp64 reference is at most twice PyTorch fp32's own, plus a
floor that scales with the problem. fp32 results differ in their last bits between CPUs, so no
test compares two fp32 results with a fixed tolerance.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spot_fast.kernels import attention_step_triton as sat
from spot_fast.kernels.attention_step import slot_attention_step, slot_attention_step_ref
from spot_fast.kernels.attention_step_triton import slot_attention_step_triton

DEVICE = "cuda" if torch.cuda.is_available() and not sat.INTERPRETING else "cpu"
NAMES = ("updates", "attn_vis", "logits", "dk", "dq", "dv")

# (B, H, N, K, S): N never a multiple of the block; every K in {1, 3, 7, 11, 24}, S in {16, 64, 256},
# 1 and 2 heads; (2, 2, 150, ...) and (1, 1, 130, ...) walk 3 splits of 64 patches each on the CPU.
CASES = [
    (2, 1, 37, 7, 64),
    (1, 2, 20, 1, 16),
    (2, 2, 150, 3, 64),
    (1, 1, 130, 11, 256),
    (2, 1, 19, 24, 16),
    (1, 2, 45, 24, 64),
    (1, 2, 33, 11, 256),
]
SPREADS = (3, 30, 100)   # std of the logits: ~3 at initialisation, tens once slots are confident


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    """One fixed launch config: autotuning would compile and time every config for each new shape."""
    monkeypatch.setenv("SPOT_FAST_AUTOTUNE", "0")
    monkeypatch.delenv("SPOT_FAST_NO_TRITON", raising=False)


def make_inputs(B, H, N, K, S, dtype=torch.float32, seed=0, layout="model", spread=3.0):
    """k, q, v as the model makes them: k, v are (B, N, H, head_dim) views transposed to
    (B, H, N, head_dim). The logits k.q have standard deviation `spread` (k ~ N(0, spread^2 / d))."""
    g = torch.Generator().manual_seed(seed)
    d = S // H
    k = torch.randn(B, N, S, generator=g, dtype=torch.float64) * d ** -0.5 * spread
    v = torch.randn(B, N, S, generator=g, dtype=torch.float64)
    q = torch.randn(B, K, S, generator=g, dtype=torch.float64)
    k, v = (t.view(B, N, H, d).transpose(1, 2) for t in (k, v))          # (B, H, N, d), strided
    q = q.view(B, K, H, d).transpose(1, 2)                                # (B, H, K, d)
    if layout == "contiguous":
        k, q, v = k.contiguous(), q.contiguous(), v.contiguous()
    return [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (k, q, v)]


def output_grads(k, q, return_attn=True, seed=1, which=("u", "vis", "logits")):
    """fp64 gradients for (updates, attn_vis, logits); None for the outputs not in `which`."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, d = k.shape
    K = q.shape[2]
    shapes = {"u": (B, H, K, d), "vis": (B, N, K), "logits": (B, H, N, K)}
    return [torch.randn(shapes[n], generator=g, dtype=torch.float64).to(k.device)
            if n in which and (return_attn or n == "u") else None for n in ("u", "vis", "logits")]


def run_grads(step, k, q, v, return_attn, grads):
    """(updates, attn_vis, logits, dk, dq, dv) of `step` on leaf copies of k, q, v; the gradients
    are cast to the outputs' dtype."""
    k, q, v = (t.detach().requires_grad_() for t in (k, q, v))
    outs = step(k, q, v, return_attn=return_attn)
    pairs = [(o, g.to(o)) for o, g in zip(outs, grads) if o is not None and g is not None]
    dk, dq, dv = torch.autograd.grad([o for o, _ in pairs], (k, q, v), [g for _, g in pairs],
                                     allow_unused=True, materialize_grads=True)
    return [o.detach() if o is not None else None for o in outs] + [dk, dq, dv]


def rounded_once(t: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """fp64 copy of t with each entry moved by up to one fp32 rounding (relative 2^-24)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.device) * 2 - 1
    return t.detach().double() * (1 + 2.0 ** -24 * r)


def max_err(a, exact):
    return (a.double() - exact).abs().max().item()


def assert_within_fp32_error(ours, torch32, exact, rounded, names=NAMES):
    """The flash-attention rule, per output: err(ours) <= 2 err(PyTorch fp32) + floor, errors taken
    against the fp64 reference `exact` (greatest absolute difference). The floor is twice what one
    fp32 rounding of the inputs does to the exact result (`rounded`: the fp64 reference on
    `rounded_once` inputs): it scales with each output's size and conditioning, which grows with
    the logit spread."""
    for name, o, t, e, r in zip(names, ours, torch32, exact, rounded):
        if e is None:
            assert o is None, name
            continue
        assert o.shape == e.shape and o.dtype == t.dtype, name
        err, err_pt, floor = max_err(o, e), max_err(t, e), 2 * max_err(r, e)
        assert err <= 2 * err_pt + floor, f"{name}: kernel {err:.3g} vs PyTorch fp32 {err_pt:.3g} (floor {floor:.3g})"


def check_step(k, q, v, return_attn=True, which=("u", "vis", "logits"), step=slot_attention_step_triton):
    """`step` on fp32 k, q, v against the fp64 reference, outputs and gradients, by the rule."""
    grads = output_grads(k, q, return_attn, which=which)
    exact = run_grads(slot_attention_step_ref, *(t.double() for t in (k, q, v)), return_attn, grads)
    rounded = run_grads(slot_attention_step_ref, *(rounded_once(t, seed=2 + i) for i, t in enumerate((k, q, v))),
                        return_attn, grads)
    torch32 = run_grads(slot_attention_step_ref, k, q, v, return_attn, grads)
    ours = run_grads(step, k, q, v, return_attn, grads)
    assert_within_fp32_error(ours, torch32, exact, rounded)


# ---- forward and backward against fp64 ---------------------------------------------------------

@pytest.mark.parametrize("B,H,N,K,S", CASES)
def test_matches_fp64_reference(B, H, N, K, S):
    """Outputs and dk, dq, dv (through updates, attn_vis and logits) at the awkward sizes."""
    check_step(*make_inputs(B, H, N, K, S))


@pytest.mark.parametrize("spread", SPREADS[1:])
@pytest.mark.parametrize("B,H,N,K,S", [(2, 1, 37, 7, 64), (1, 2, 45, 24, 64), (1, 1, 130, 11, 256)])
def test_confident_slots(B, H, N, K, S, spread):
    """Large logits (nearly one-hot attention), where a backward that does not use the forward's
    exact softmax loses accuracy (header of attention_step_triton.py). Spread 3 is
    `test_matches_fp64_reference`, which covers these shapes too."""
    check_step(*make_inputs(B, H, N, K, S, spread=spread))


def test_without_attention_outputs():
    check_step(*make_inputs(2, 1, 37, 7, 64, layout="contiguous"), return_attn=False)


@pytest.mark.parametrize("which", [("u",), ("u", "vis"), ("u", "logits"), ("vis",), ("logits",)])
def test_backward_with_some_outputs_unused(which):
    """None gradients (an output the loss does not use) are skipped, not materialised."""
    check_step(*make_inputs(1, 2, 45, 3, 64, spread=30), which=which)


@pytest.mark.parametrize("fwd_block,bwd_block", [(16, 32), (32, 16)])
def test_backward_does_not_depend_on_block_sizes(monkeypatch, fwd_block, bwd_block):
    """Autotuning picks the forward's and the backward's BLOCK_N independently; with confident
    slots the gradients must stay exact whatever pair it picks."""
    monkeypatch.setattr(sat, "_FWD_DEFAULT", (fwd_block, 8, 1))
    monkeypatch.setattr(sat, "_BWD_DEFAULT", (bwd_block, 8, 1))
    check_step(*make_inputs(1, 2, 45, 24, 64, spread=100))


def test_softmax_saved_only_for_gradients(monkeypatch):
    """The forward writes p (B, N, H*K) for the backward only when a gradient can be asked for."""
    saved = []
    real = sat._forward
    monkeypatch.setattr(sat, "_forward", lambda *a, **kw: saved.append(a[4]) or real(*a, **kw))
    k, q, v = make_inputs(2, 1, 37, 7, 64)
    with torch.no_grad():
        slot_attention_step_triton(k, q, v)
    slot_attention_step_triton(k.detach(), q.detach(), v.detach())
    slot_attention_step_triton(k, q, v)
    assert saved == [False, False, True]
    *_, p = real(k.detach(), q.detach(), v.detach(), False, True)
    assert p.shape == (2, 37, 7)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 37, device=p.device), rtol=0, atol=1e-6)


def test_interpreter_only_without_a_gpu(interpret_from_env):
    """On a GPU machine the kernel tests run compiled on CUDA (test_deterministic is meaningful only
    there); without one they run on the interpreter. An explicit TRITON_INTERPRET is obeyed."""
    if interpret_from_env is None:
        want = not torch.cuda.is_available()
    else:
        want = interpret_from_env.lower() in ("1", "true", "on", "yes")
    assert sat.INTERPRETING == want
    assert (DEVICE == "cuda") == (torch.cuda.is_available() and not want)


def test_several_splits_are_exercised():
    assert sat._split(2, 150, torch.device("cpu"))[1] == 3   # CASES' (2, 2, 150, ...) case on CPU


def test_gradcheck_fp64():
    k, q, v = make_inputs(1, 2, 21, 3, 16, dtype=torch.float64)
    fn = lambda k, q, v: slot_attention_step_triton(k, q, v, return_attn=True)   # noqa: E731
    assert torch.autograd.gradcheck(fn, (k, q, v), fast_mode=True)


# ---- through the slot-attention loop ---------------------------------------------------------

@pytest.mark.parametrize("truncate", ["none", "fixed-point", "bi-level"])
def test_three_iterations_match_reference(monkeypatch, truncate):
    """The model's SlotAttention (3 iterations, GRU, MLP) with the kernel swapped in for the step,
    against the same module in fp64 with the reference step (outputs and parameter gradients)."""
    import copy

    import spot_fast.slot_attention as model_sa
    from spot_fast.config import SlotAttentionConfig

    cfg = SlotAttentionConfig(num_slots=5, slot_size=64, mlp_hidden=96, num_heads=2, truncate=truncate)
    torch.manual_seed(0)
    module = model_sa.SlotAttention(cfg, input_dim=48).to(DEVICE)
    features = torch.randn(2, 37, 48, device=DEVICE)
    noise = torch.randn(2, 5, 64, device=DEVICE)

    def run(step, module, features, noise):
        monkeypatch.setattr(model_sa, "slot_attention_step",
                            lambda k, q, v, return_attn=False, use_kernel=False: step(k, q, v, return_attn))
        module.zero_grad()
        out = module(features, noise)
        loss = out.slots.square().sum() + out.attn.square().sum() + out.logits.square().mean()
        loss.backward()
        return [out.slots.detach(), out.attn.detach(), out.logits.detach()] + [
            p.grad.clone() for p in module.parameters() if p.grad is not None]

    exact = run(slot_attention_step_ref, copy.deepcopy(module).double(), features.double(), noise.double())
    module_rounded = copy.deepcopy(module).double()
    with torch.no_grad():
        for i, p in enumerate(module_rounded.parameters()):
            p.copy_(rounded_once(p, seed=10 + i))
    rounded = run(slot_attention_step_ref, module_rounded, rounded_once(features), rounded_once(noise, seed=3))
    torch32 = run(slot_attention_step_ref, module, features, noise)
    ours = run(slot_attention_step_triton, module, features, noise)
    names = ["slots", "attn", "logits"] + [n for n, p in module.named_parameters() if p.grad is not None]
    assert len(ours) == len(exact) == len(names)
    assert_within_fp32_error(ours, torch32, exact, rounded, names)


# ---- bf16 ------------------------------------------------------------------------------------

def test_bf16_results_are_fp32_maths_rounded_to_nearest():
    """What the CPU can check of the 16-bit path. Under the interpreter the kernel upcasts bf16
    operands and computes in fp32 (no tensor cores), so every bf16 output and gradient must be the
    fp32 reference on the same bf16 inputs, rounded to nearest: within half a bf16 ulp (2^-8
    relative) plus fp32-level noise. Truncation (what the interpreter's casts do unaided) is off by
    up to a whole ulp and fails. The GPU's bf16 accuracy is `test_bf16_error_within_twice_pytorch`."""
    if DEVICE == "cuda":
        pytest.skip("on CUDA the products run on tensor cores: see test_bf16_error_within_twice_pytorch")
    k, q, v = make_inputs(2, 2, 150, 7, 64, dtype=torch.bfloat16)
    grads = [g.bfloat16().double() for g in output_grads(k, q)]           # bf16-exact gradients
    fp32 = run_grads(slot_attention_step_ref, *(t.float() for t in (k, q, v)), True, grads)
    ours = run_grads(slot_attention_step_triton, k, q, v, True, grads)
    for name, o, e in zip(NAMES, ours, fp32):
        assert o.dtype == torch.bfloat16, name
        bound = 2.0 ** -8 * e.abs() * (1 + 1e-4) + 1e-6 * e.abs().max()
        assert ((o.float() - e).abs() <= bound).all(), name


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,K,S", [(2, 1, 150, 7, 256), (1, 2, 45, 24, 64), (64, 1, 196, 7, 256),
                                       (64, 1, 196, 24, 256)])
def test_bf16_error_within_twice_pytorch(monkeypatch, B, H, N, K, S):
    """On tensor cores, autotuned: err(kernel bf16) <= 2 * err(PyTorch bf16) + atol, both against
    the fp32 reference on the same bf16 inputs and gradients."""
    monkeypatch.setenv("SPOT_FAST_AUTOTUNE", "1")
    k, q, v = make_inputs(B, H, N, K, S, dtype=torch.bfloat16, spread=30)
    grads = [g.bfloat16().double() for g in output_grads(k, q)]          # bf16-exact gradients
    exact = run_grads(slot_attention_step_ref, *(t.float() for t in (k, q, v)), True, grads)
    ours = run_grads(slot_attention_step_triton, k, q, v, True, grads)
    torch16 = run_grads(slot_attention_step_ref, k, q, v, True, grads)
    for name, e, o, t in zip(NAMES, exact, ours, torch16):
        err, err_pt = max_err(o, e), max_err(t, e)
        assert err <= 2 * err_pt + 1e-3 * e.abs().max().item(), f"{name}: kernel {err:.3g} vs PyTorch {err_pt:.3g}"


# ---- torch.compile, custom ops, import, dispatcher, errors -------------------------------------

def test_torch_compile_traces_the_custom_ops():
    """Dynamo traces the autograd.Function (no graph break); the kernels run as opaque custom ops."""
    torch._dynamo.reset()
    fn = torch.compile(slot_attention_step_triton, backend="aot_eager", fullgraph=True)
    check_step(*make_inputs(1, 2, 20, 3, 16), step=lambda *a, return_attn: fn(*a, return_attn=return_attn))


def test_custom_op_fakes_match_the_kernels():
    """opcheck of both custom ops (schema and fake tensors), the backward fed the forward's outputs."""
    k, q, v = (t.detach() for t in make_inputs(2, 2, 70, 3, 16, dtype=torch.bfloat16))
    torch.library.opcheck(sat._forward_op, (k, q, v, True, True, 1e-8),
                          test_utils=("test_schema", "test_faketensor"))
    _, updates_acc, vis, logits, colsum, p = sat._forward(k, q, v, True, True)
    du = torch.randn(updates_acc.shape, dtype=k.dtype, device=k.device)
    for dvis, dlogits in [(torch.randn_like(vis), torch.randn_like(logits)), (None, None)]:
        torch.library.opcheck(sat._backward_op, (k, q, v, updates_acc, colsum, p, du, dvis, dlogits, 1e-8),
                              test_utils=("test_schema", "test_faketensor"))


IMPORT_CHECK = """
import sys
{prelude}
import torch
import spot_fast.slot_attention
from spot_fast.kernels import attention_step
print(attention_step.fused is not None, sys.modules.get("triton") is not None,
      hasattr(torch.ops.spot_fast, "slot_attention_fwd"), hasattr(torch.ops.spot_fast, "slot_attention_bwd"))
"""


@pytest.mark.parametrize("triton_installed", [True, False])
def test_kernel_registered_at_import(triton_installed):
    """Importing the model imports Triton and registers the custom ops (never first inside a
    torch.compile trace); without Triton the import still succeeds and nothing is registered."""
    prelude = "" if triton_installed else "sys.modules['triton'] = None   # import triton fails"
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK.format(prelude=prelude)], check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(triton_installed)] * 4


@pytest.mark.slow
def test_compiles_for_sm90_without_spills_at_coco():
    """The kernels as a GPU would build them (no GPU needed): both default configs compile for
    sm_90, fp32 and bf16, K = 7 and 24, and at the COCO shape (K = 7) nothing spills."""
    import os

    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "tools" / "attention_step_registers.py")], env=env,
                         capture_output=True, text=True)
    if out.returncode and "ptxas" in out.stderr:
        pytest.skip("Triton's bundled ptxas is not available")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if "registers" in line]
    assert len(rows) == 8
    assert all(line.endswith(" 0 bytes spilled") for line in rows if "K= 7" in line), out.stdout


def test_dispatcher_uses_reference_on_cpu_or_when_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr(sat, "slot_attention_step_triton", lambda *a, **kw: calls.append(1))
    k, q, v = make_inputs(1, 1, 20, 3, 16)
    monkeypatch.setenv("SPOT_FAST_NO_TRITON", "1")
    slot_attention_step(k, q, v, use_kernel=True)
    monkeypatch.delenv("SPOT_FAST_NO_TRITON")
    slot_attention_step(k.cpu(), q.cpu(), v.cpu(), use_kernel=True)
    assert calls == []


def test_unsupported_inputs_raise_a_clear_error():
    k, q, v = make_inputs(1, 1, 20, 3, 512)          # H*d = 512 > MAX_WIDTH
    assert not sat.supported(k, q, v)
    with pytest.raises(ValueError, match="falls back to the reference"):
        slot_attention_step_triton(k, q, v)


# ---- GPU only --------------------------------------------------------------------------------

@pytest.mark.gpu
def test_dispatcher_picks_kernel_on_cuda_only_when_asked(monkeypatch):
    calls = []
    real = sat.slot_attention_step_triton
    monkeypatch.setattr(sat, "slot_attention_step_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k, q, v = (t.cuda() for t in make_inputs(1, 1, 20, 3, 16))
    slot_attention_step(k, q, v)                                     # opt-in: default is the reference
    assert calls == []
    slot_attention_step(k, q, v, use_kernel=True)
    assert calls == [1]
    big = [t.cuda() for t in make_inputs(1, 1, 20, 3, 512)]          # unsupported: reference
    slot_attention_step(*big, use_kernel=True)
    assert calls == [1]


@pytest.mark.gpu
def test_deterministic():
    """Two runs give identical bits (the splits are summed in a fixed order, no atomics). Only a
    GPU can show otherwise: the interpreter runs the programs one after another."""
    k, q, v = make_inputs(8, 2, 300, 7, 128, spread=30)
    grads = output_grads(k, q)
    a = run_grads(slot_attention_step_triton, k, q, v, True, grads)
    b = run_grads(slot_attention_step_triton, k, q, v, True, grads)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


@pytest.mark.gpu
@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("K", [7, 24])
def test_autotuned_at_benchmark_shape(monkeypatch, K, spread):
    """COCO / MOVi-E shapes, fp32, with autotuning on (what training and the benchmark run)."""
    monkeypatch.setenv("SPOT_FAST_AUTOTUNE", "1")
    check_step(*make_inputs(64, 1, 196, K, 256, spread=spread))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    k, q, v = make_inputs(8, 1, 196, 7, 256, spread=30)
    grads = [g.float() for g in output_grads(k, q)]

    def step():
        outs = slot_attention_step_triton(k, q, v, return_attn=True)
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, (k, q, v), grads))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                                # warm up (compiles the kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    eager = run_grads(slot_attention_step_triton, k, q, v, True, grads)
    for name, x, y in zip(NAMES, static, eager):
        assert torch.equal(x, y), name                       # the same kernels, replayed


@pytest.mark.gpu
def test_inductor_compile_with_kernel():
    torch._dynamo.reset()
    fn = torch.compile(lambda k, q, v, return_attn: slot_attention_step_triton(k, q, v, return_attn),
                       fullgraph=True)
    check_step(*make_inputs(4, 2, 100, 7, 128, spread=30), step=fn)
