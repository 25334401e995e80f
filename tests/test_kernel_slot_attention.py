"""The fused slot-attention kernel against its PyTorch reference, forward and backward.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors; with
TRITON_INTERPRET=0 and a GPU the same tests run on CUDA (benchmarks/gpu_check.sh does that). Tests
marked `gpu` need CUDA (bf16 on tensor cores, autotuning, CUDA graphs, inductor).
"""
from __future__ import annotations

import pytest
import torch

from spot_fast.kernels.slot_attention import slot_attention_step, slot_attention_step_ref
from spot_fast.kernels import slot_attention_triton as sat
from spot_fast.kernels.slot_attention_triton import slot_attention_step_triton

DEVICE = "cuda" if torch.cuda.is_available() and not sat.INTERPRETING else "cpu"

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


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    """One fixed launch config: autotuning would compile and time every config for each new shape."""
    monkeypatch.setenv("SPOT_FAST_AUTOTUNE", "0")
    monkeypatch.delenv("SPOT_FAST_NO_TRITON", raising=False)


def make_inputs(B, H, N, K, S, dtype=torch.float32, seed=0, layout="model"):
    """k, q, v as the model makes them: k, v are (B, N, H, d) views transposed to (B, H, N, d)."""
    g = torch.Generator().manual_seed(seed)
    d = S // H
    k = torch.randn(B, N, S, generator=g, dtype=torch.float64) * d ** -0.5 * 3.0
    v = torch.randn(B, N, S, generator=g, dtype=torch.float64)
    q = torch.randn(B, K, S, generator=g, dtype=torch.float64)
    k, v = (t.view(B, N, H, d).transpose(1, 2) for t in (k, v))          # (B, H, N, d), strided
    q = q.view(B, K, H, d).transpose(1, 2)                                # (B, H, K, d)
    if layout == "contiguous":
        k, q, v = k.contiguous(), q.contiguous(), v.contiguous()
    return [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (k, q, v)]


def output_grads(outs, seed=1, which=("u", "vis", "logits")):
    g = torch.Generator().manual_seed(seed)
    names = ("u", "vis", "logits")
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) if n in which and o is not None
            else None for n, o in zip(names, outs)]


def run_grads(step, k, q, v, return_attn, grads):
    outs = step(k, q, v, return_attn=return_attn)
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
    dk, dq, dv = torch.autograd.grad([o for o, _ in pairs], (k, q, v), [g for _, g in pairs],
                                     allow_unused=True, materialize_grads=True)
    return outs, (dk, dq, dv)


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,N,K,S", CASES)
def test_forward_matches_reference(B, H, N, K, S):
    k, q, v = make_inputs(B, H, N, K, S)
    with torch.no_grad():
        ours = slot_attention_step_triton(k, q, v, return_attn=True)
        ref = slot_attention_step_ref(k, q, v, return_attn=True)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert_close(o, r)


def test_forward_without_attention_returns_nones():
    k, q, v = make_inputs(2, 1, 37, 7, 64, layout="contiguous")
    with torch.no_grad():
        u, vis, logits = slot_attention_step_triton(k, q, v)
        ref = slot_attention_step_ref(k, q, v)[0]
    assert vis is None and logits is None
    assert_close(u, ref)


def test_deterministic():
    k, q, v = make_inputs(2, 2, 150, 3, 64)
    a = slot_attention_step_triton(k, q, v, return_attn=True)
    b = slot_attention_step_triton(k, q, v, return_attn=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_several_splits_are_exercised():
    assert sat._split(2, 150, torch.device("cpu"))[1] == 3   # CASES' (2, 1, 150, ...) case on CPU


# ---- backward --------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,N,K,S", CASES)
def test_backward_matches_reference(B, H, N, K, S):
    k, q, v = make_inputs(B, H, N, K, S)
    grads = output_grads(slot_attention_step_ref(k, q, v, return_attn=True))
    ours, d_ours = run_grads(slot_attention_step_triton, k, q, v, True, grads)
    _, d_ref = run_grads(slot_attention_step_ref, k, q, v, True, grads)
    for name, o, r in zip("kqv", d_ours, d_ref):
        assert o.shape == r.shape, name
        assert_close(o, r)


@pytest.mark.parametrize("which", [("u",), ("u", "vis"), ("u", "logits"), ("vis",), ("logits",)])
def test_backward_with_some_outputs_unused(which):
    """None gradients (an output the loss does not use) are skipped, not materialised."""
    k, q, v = make_inputs(1, 2, 45, 3, 64)
    grads = output_grads(slot_attention_step_ref(k, q, v, return_attn=True), which=which)
    _, d_ours = run_grads(slot_attention_step_triton, k, q, v, True, grads)
    _, d_ref = run_grads(slot_attention_step_ref, k, q, v, True, grads)
    for o, r in zip(d_ours, d_ref):
        assert_close(o, r)


def test_backward_without_attention_outputs():
    k, q, v = make_inputs(2, 1, 37, 7, 64, layout="contiguous")
    grads = output_grads(slot_attention_step_ref(k, q, v))
    _, d_ours = run_grads(slot_attention_step_triton, k, q, v, False, grads)
    _, d_ref = run_grads(slot_attention_step_ref, k, q, v, False, grads)
    for o, r in zip(d_ours, d_ref):
        assert_close(o, r)


def test_gradcheck_fp64():
    k, q, v = make_inputs(1, 2, 21, 3, 16, dtype=torch.float64)
    fn = lambda k, q, v: slot_attention_step_triton(k, q, v, return_attn=True)   # noqa: E731
    assert torch.autograd.gradcheck(fn, (k, q, v), fast_mode=True)


# ---- through the slot-attention loop ---------------------------------------------------------

@pytest.mark.parametrize("truncate", ["none", "fixed-point", "bi-level"])
def test_three_iterations_match_reference(monkeypatch, truncate):
    """The model's SlotAttention (3 iterations, GRU, MLP) with the kernel swapped in for the step."""
    import spot_fast.slot_attention as model_sa
    from spot_fast.config import SlotAttentionConfig

    cfg = SlotAttentionConfig(num_slots=5, slot_size=64, mlp_hidden=96, num_heads=2, truncate=truncate)
    torch.manual_seed(0)
    module = model_sa.SlotAttention(cfg, input_dim=48).to(DEVICE)
    features = torch.randn(2, 37, 48, device=DEVICE)
    noise = torch.randn(2, 5, 64, device=DEVICE)

    def run(step):
        monkeypatch.setattr(model_sa, "slot_attention_step",
                            lambda k, q, v, return_attn=False, use_kernel=True: step(k, q, v, return_attn))
        module.zero_grad()
        out = module(features, noise)
        loss = out.slots.square().sum() + out.attn.square().sum() + out.logits.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return (out.slots.detach(), out.attn.detach(), out.logits.detach()), grads

    ours, g_ours = run(slot_attention_step_triton)
    ref, g_ref = run(slot_attention_step_ref)
    for o, r in zip(ours, ref):
        assert_close(o, r)
    assert g_ours.keys() == g_ref.keys()
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp_min(1.0)
        assert_close(g_ours[name] / scale, g_ref[name] / scale)


# ---- bf16: the kernel's error is at most twice PyTorch's own -----------------------------------

@pytest.mark.parametrize("B,H,N,K,S", [(2, 1, 150, 7, 256), (1, 2, 45, 24, 64)])
def test_bf16_error_within_twice_pytorch(B, H, N, K, S):
    """err(kernel bf16 vs fp32 reference) <= 2 * err(PyTorch bf16 vs fp32 reference) + atol."""
    k, q, v = make_inputs(B, H, N, K, S, dtype=torch.bfloat16)
    k32, q32, v32 = (t.detach().float().requires_grad_() for t in (k, q, v))
    grads = output_grads(slot_attention_step_ref(k32, q32, v32, return_attn=True))
    exact, d_exact = run_grads(slot_attention_step_ref, k32, q32, v32, True, grads)
    g16 = [g.bfloat16() for g in grads]
    ours, d_ours = run_grads(slot_attention_step_triton, k, q, v, True, g16)
    torch_, d_torch = run_grads(slot_attention_step_ref, k, q, v, True, g16)
    for name, e, o, t in zip(["updates", "attn_vis", "logits", "dk", "dq", "dv"],
                             [*exact, *d_exact], [*ours, *d_ours], [*torch_, *d_torch]):
        err = (o.float() - e).abs().max().item()
        err_pt = (t.float() - e).abs().max().item()
        atol = 1e-3 * e.abs().max().item()
        assert err <= 2 * err_pt + atol, f"{name}: kernel {err:.3g} vs PyTorch {err_pt:.3g}"


# ---- torch.compile, dispatcher, errors -------------------------------------------------------

def test_torch_compile_traces_the_custom_ops():
    """Dynamo traces the autograd.Function (no graph break); the kernels run as opaque custom ops."""
    torch._dynamo.reset()
    k, q, v = make_inputs(1, 2, 20, 3, 16)
    grads = output_grads(slot_attention_step_ref(k, q, v, return_attn=True))
    fn = torch.compile(slot_attention_step_triton, backend="aot_eager", fullgraph=True)
    ours, d_ours = run_grads(lambda *a, return_attn: fn(*a, return_attn=return_attn), k, q, v, True, grads)
    ref, d_ref = run_grads(slot_attention_step_ref, k, q, v, True, grads)
    for o, r in zip([*ours, *d_ours], [*ref, *d_ref]):
        assert_close(o, r)


def test_custom_op_fakes_match_the_kernels():
    k, q, v = make_inputs(2, 2, 70, 3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.library.opcheck(sat._forward_op, (k, q, v, True, 1e-8),
                              test_utils=("test_schema", "test_faketensor"))


def test_dispatcher_uses_reference_on_cpu_or_when_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr(sat, "slot_attention_step_triton", lambda *a, **kw: calls.append(1))
    k, q, v = make_inputs(1, 1, 20, 3, 16)
    monkeypatch.setenv("SPOT_FAST_NO_TRITON", "1")
    slot_attention_step(k, q, v)
    slot_attention_step(k.cpu(), q.cpu(), v.cpu())
    assert calls == []


def test_unsupported_inputs_raise_a_clear_error():
    k, q, v = make_inputs(1, 1, 20, 3, 512)          # H*d = 512 > MAX_WIDTH
    assert not sat.supported(k, q, v)
    with pytest.raises(ValueError, match="falls back to the reference"):
        slot_attention_step_triton(k, q, v)


# ---- GPU only --------------------------------------------------------------------------------

@pytest.mark.gpu
def test_dispatcher_picks_kernel_on_cuda(monkeypatch):
    calls = []
    real = sat.slot_attention_step_triton
    monkeypatch.setattr(sat, "slot_attention_step_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k, q, v = (t.cuda() for t in make_inputs(1, 1, 20, 3, 16))
    slot_attention_step(k, q, v)
    assert calls == [1]
    big = [t.cuda() for t in make_inputs(1, 1, 20, 3, 512)]          # unsupported: reference
    slot_attention_step(*big)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [7, 24])
def test_autotuned_at_benchmark_shape(monkeypatch, dtype, K):
    """COCO / MOVi-E shapes with autotuning on (what training and the benchmark run)."""
    monkeypatch.setenv("SPOT_FAST_AUTOTUNE", "1")
    k, q, v = (t.cuda() for t in make_inputs(64, 1, 196, K, 256))
    k32, q32, v32 = (t.detach().float().requires_grad_() for t in (k, q, v))
    grads = output_grads(slot_attention_step_ref(k32, q32, v32, return_attn=True))
    exact, d_exact = run_grads(slot_attention_step_ref, k32, q32, v32, True, grads)
    ours, d_ours = run_grads(slot_attention_step_triton, k.to(dtype), q.to(dtype), v.to(dtype), True,
                             [g.to(dtype) for g in grads])
    torch_, d_torch = run_grads(slot_attention_step_ref, k.to(dtype), q.to(dtype), v.to(dtype), True,
                                [g.to(dtype) for g in grads])
    for e, o, t in zip([*exact, *d_exact], [*ours, *d_ours], [*torch_, *d_torch]):
        err, err_pt = (o.float() - e).abs().max().item(), (t.float() - e).abs().max().item()
        assert err <= 2 * err_pt + 1e-5 * e.abs().max().item()


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    k, q, v = (t.detach().cuda().requires_grad_() for t in make_inputs(8, 1, 196, 7, 256))
    grads = output_grads(slot_attention_step_ref(k, q, v, return_attn=True))

    def step():
        outs = slot_attention_step_triton(k, q, v, return_attn=True)
        return torch.autograd.grad(outs, (k, q, v), grads)

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
    _, d_ref = run_grads(slot_attention_step_ref, k, q, v, True, grads)
    for o, r in zip(static, d_ref):
        assert_close(o, r)


@pytest.mark.gpu
def test_inductor_compile_with_kernel():
    torch._dynamo.reset()
    k, q, v = (t.cuda() for t in make_inputs(4, 2, 100, 7, 128))
    grads = output_grads(slot_attention_step_ref(k, q, v, return_attn=True))
    fn = torch.compile(lambda k, q, v, return_attn: slot_attention_step_triton(k, q, v, return_attn),
                       fullgraph=True)
    ours, d_ours = run_grads(fn, k, q, v, True, grads)
    ref, d_ref = run_grads(slot_attention_step_ref, k, q, v, True, grads)
    for o, r in zip([*ours, *d_ours], [*ref, *d_ref]):
        assert_close(o, r)

