"""Slot Attention's attention step, 3 iterations: eager PyTorch vs torch.compile vs the fused Triton
kernel, forward and forward+backward; then the whole slot-attention loop (LayerNorm, q projection,
step, GRUCell, MLP) under eager, torch.compile, CUDA graphs, and the kernel with each.

    python benchmarks/bench_slot_attention.py                    # all shapes, fp32 (SPOT trains fp32)
    python benchmarks/bench_slot_attention.py --dtype bf16 --shapes coco --save

Step table: k, v (B, H, N, d) and q0 (B, H, K, d) are inputs; iteration t runs the step with
q = q0 + updates of t-1 (a stand-in for the GRU/MLP between iterations), the last one returns the
attention and logits, and the backward takes random gradients for updates, attention and logits.
GB/s counts the bytes a fused implementation must move (k, v, q, updates and gradients, each once
per iteration; attention and logits once) over the measured time, the same count for every column.
Targets on one H100 (the issue): forward+backward >= 2x eager and >= 1.3x torch.compile.

Without a GPU the script says the GPU figures are missing, times only the eager reference on the
CPU at a tiny shape and, under TRITON_INTERPRET=1, checks the kernel's output there (no timing: the
interpreter is ~400x slower than eager). --save writes JSON (hardware, versions, date, results) to
./bench-results/ (the current folder).
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from spot_fast.benchinfo import hardware, result_path, save_result, versions
from spot_fast.kernels.attention_step_ref import slot_attention_step_ref

ITERATIONS = 3


@dataclass(frozen=True)
class Shape:
    B: int      # batch
    N: int      # patches
    K: int      # slots
    S: int      # slot width
    H: int = 1  # heads (SPOT uses 1)


SHAPES = {
    "coco": Shape(64, 196, 7, 256),          # ViT-B/16 at 224 px, 7 slots
    "movi-e": Shape(64, 196, 24, 256),       # 24 slots
    "dinov2-518": Shape(64, 1369, 7, 256),   # DINOv2 ViT-B/14 at 518 px: 37 x 37 patches
    "tiny": Shape(4, 49, 5, 64),             # the CPU run
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- the step, three times -------------------------------------------------------------------

def three_iterations(step, k, q0, v):
    """The step ITERATIONS times; q of iteration t is q0 + updates of t - 1."""
    q = q0
    for t in range(ITERATIONS):
        updates, vis, logits = step(k, q, v, return_attn=t == ITERATIONS - 1)
        q = q0 + updates                                      # (B, H, K, d)
    return updates, vis, logits


def step_inputs(shape: Shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, N, K, S, H = shape.B, shape.N, shape.K, shape.S, shape.H
    d = S // H
    x = lambda *size: torch.randn(*size, generator=g).to(device=device, dtype=dtype)   # noqa: E731
    k = (x(B, N, S) * d ** -0.5).view(B, N, H, d).transpose(1, 2)   # (B, H, N, d), the model's layout
    v = x(B, N, S).view(B, N, H, d).transpose(1, 2)
    q0 = x(B, K, S).view(B, K, H, d).transpose(1, 2)                # (B, H, K, d)
    grads = (x(B, H, K, d), x(B, N, K), x(B, H, N, K))              # d updates, d attn, d logits
    return [t.requires_grad_() for t in (k, q0, v)], grads


def step_runner(fn, inputs, grads, backward: bool):
    k, q0, v = inputs
    if not backward:
        def run():
            with torch.no_grad():
                return fn(k, q0, v)
    else:
        def run():
            return torch.autograd.grad(fn(k, q0, v), (k, q0, v), grads)
    return run


def step_bytes(shape: Shape, esize: int, backward: bool) -> int:
    """Bytes a fused implementation moves for the 3 iterations (see the module docstring)."""
    B, N, K, S, H = shape.B, shape.N, shape.K, shape.S, shape.H
    kv, q, attn = B * N * S, B * K * S, B * N * K * (1 + H)
    fwd = ITERATIONS * (2 * kv + 2 * q) + attn                      # read k, v, q; write updates
    bwd = ITERATIONS * (4 * kv + 3 * q) + attn if backward else 0   # + dk, dv; du, dq; d attn
    return esize * (fwd + bwd)


# ---- the whole loop --------------------------------------------------------------------------

class SlotLoop(nn.Module):
    """Spec section 2, step 4: ITERATIONS x (LayerNorm, q projection, step, GRUCell, MLP residual)."""

    def __init__(self, S: int, H: int, step, mlp_hidden: int = 1024):
        super().__init__()
        self.H, self.step = H, step
        self.norm_slots = nn.LayerNorm(S)
        self.to_q = nn.Linear(S, S, bias=False)
        self.gru = nn.GRUCell(S, S)
        self.norm_mlp = nn.LayerNorm(S)
        self.mlp = nn.Sequential(nn.Linear(S, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, S))

    def forward(self, k, v, slots):
        """k, v: (B, H, N, d); slots: (B, K, S) -> final slots, last attention (B, N, K), logits."""
        B, K, S = slots.shape
        for t in range(ITERATIONS):
            q = self.to_q(self.norm_slots(slots)).view(B, K, self.H, -1).transpose(1, 2)   # (B, H, K, d)
            updates, vis, logits = self.step(k, q, v, return_attn=t == ITERATIONS - 1)
            updates = updates.transpose(1, 2).reshape(B * K, S)                          # heads concatenated
            slots = self.gru(updates, slots.reshape(B * K, S)).view(B, K, S)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, vis, logits


def loop_runners(shape: Shape, dtype, device) -> dict:
    """Zero-argument forward+backward callables for each loop variant (same weights and inputs)."""
    from spot_fast.kernels.attention_step_triton import slot_attention_step_triton

    (k, _, v), _ = step_inputs(shape, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    slots = torch.randn(shape.B, shape.K, shape.S, generator=g).to(device, dtype).requires_grad_()
    grads = [torch.randn(*size, generator=g).to(device, dtype) for size in
             [(shape.B, shape.K, shape.S), (shape.B, shape.N, shape.K), (shape.B, shape.H, shape.N, shape.K)]]
    base = SlotLoop(shape.S, shape.H, slot_attention_step_ref).to(device, dtype)
    inputs = (k, v, slots)

    def variant(step, how):
        module = copy.deepcopy(base)
        module.step = step
        module(*inputs)                                   # eager warm-up (autotunes the kernel)
        if how == "compile":
            module = torch.compile(module)
        elif how == "cuda-graph":
            module = torch.cuda.make_graphed_callables(module, inputs)
        wrt = [*inputs, *module.parameters()]
        return lambda: torch.autograd.grad(module(*inputs), wrt, grads)

    return {
        "eager": lambda: variant(slot_attention_step_ref, "eager"),
        "compile": lambda: variant(slot_attention_step_ref, "compile"),
        "cuda-graph": lambda: variant(slot_attention_step_ref, "cuda-graph"),
        "triton": lambda: variant(slot_attention_step_triton, "eager"),
        "triton+compile": lambda: variant(slot_attention_step_triton, "compile"),
        "triton+cuda-graph": lambda: variant(slot_attention_step_triton, "cuda-graph"),
    }


# ---- timing and reporting --------------------------------------------------------------------

def time_gpu(fn) -> float:
    """Median milliseconds over ~100 ms of calls after warm-up (triton's do_bench flushes L2)."""
    import triton.testing
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_cpu(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def bench_steps(shapes, dtype, compile_: bool, device="cuda", timer=None) -> list[dict]:
    from spot_fast.kernels.attention_step_triton import slot_attention_step_triton

    rows = []
    for name in shapes:
        shape = SHAPES[name]
        inputs, grads = step_inputs(shape, dtype, device)
        impls = {"eager": lambda *a: three_iterations(slot_attention_step_ref, *a),
                 "triton": lambda *a: three_iterations(slot_attention_step_triton, *a)}
        for backward in (False, True):
            if compile_:
                torch._dynamo.reset()
                impls["compile"] = torch.compile(lambda *a: three_iterations(slot_attention_step_ref, *a))
            ms = {impl: (timer or time_gpu)(step_runner(fn, inputs, grads, backward)) for impl, fn in impls.items()}
            nbytes = step_bytes(shape, inputs[0].element_size(), backward)
            row = {"shape": name, **asdict(shape), "pass": "fwd+bwd" if backward else "fwd", "ms": ms,
                   "gb_s": {impl: nbytes / (t * 1e-3) / 1e9 for impl, t in ms.items()}, "bytes": nbytes}
            print_step_row(row)
            rows.append(row)
    return rows


def bench_loop(shape_name: str, dtype, compile_: bool, device="cuda", timer=None) -> list[dict]:
    rows = []
    for variant, make in loop_runners(SHAPES[shape_name], dtype, device).items():
        if ("compile" in variant and not compile_) or ("cuda-graph" in variant and device != "cuda"):
            continue
        torch._dynamo.reset()
        try:
            ms = (timer or time_gpu)(make())
        except Exception as e:                                  # report, keep going
            print(f"  {variant:18s} FAILED: {type(e).__name__}: {str(e)[:200]}")
            rows.append({"shape": shape_name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        rows.append({"shape": shape_name, "variant": variant, "ms": ms})
        eager = rows[0].get("ms", float("nan"))
        print(f"  {variant:18s} {ms:9.3f} ms   {eager / ms:5.2f}x eager")
    return rows


def print_step_header(compile_: bool):
    cols = ["eager", "compile", "triton"] if compile_ else ["eager", "triton"]
    print(f"{'shape':11s} {'pass':8s} " + " ".join(f"{c + ' ms':>11s}" for c in cols)
          + f" {'vs eager':>9s}" + (f" {'vs compile':>11s}" if compile_ else "")
          + " " + " ".join(f"{c + ' GB/s':>12s}" for c in cols))


def print_step_row(row):
    ms, gb = row["ms"], row["gb_s"]
    cols = [c for c in ("eager", "compile", "triton") if c in ms]
    line = f"{row['shape']:11s} {row['pass']:8s} " + " ".join(f"{ms[c]:11.3f}" for c in cols)
    line += f" {ms['eager'] / ms['triton']:8.2f}x"
    if "compile" in ms:
        line += f" {ms['compile'] / ms['triton']:10.2f}x"
    print(line + " " + " ".join(f"{gb[c]:12.0f}" for c in cols))


# ---- CPU fallback ----------------------------------------------------------------------------

def cpu_run(dtype) -> dict:
    """No GPU: say so, time the eager reference on the CPU at the tiny shape, and (interpreter only)
    check the kernel's output there."""
    print("No CUDA device: the GPU figures (eager vs torch.compile vs Triton, and the loop) are MISSING.")
    print("Run benchmarks/gpu_check.sh on a GPU machine to fill them in.\n")
    torch.set_num_threads(1)                                  # tiny ops: threads only add noise
    shape = SHAPES["tiny"]
    inputs, grads = step_inputs(shape, dtype, "cpu")
    fwd = time_cpu(step_runner(lambda *a: three_iterations(slot_attention_step_ref, *a), inputs, grads, False))
    both = time_cpu(step_runner(lambda *a: three_iterations(slot_attention_step_ref, *a), inputs, grads, True))
    print(f"CPU eager reference (1 thread), shape tiny {asdict(shape)}, {ITERATIONS} iterations: "
          f"forward {fwd:.3f} ms, forward+backward {both:.3f} ms")
    result = {"cpu_eager_ms": {"fwd": fwd, "fwd+bwd": both}, "kernel_check": None}
    from spot_fast.kernels import attention_step_triton as sat
    if sat.INTERPRETING:
        ours = step_runner(lambda *a: three_iterations(sat.slot_attention_step_triton, *a), inputs, grads, True)()
        ref = step_runner(lambda *a: three_iterations(slot_attention_step_ref, *a), inputs, grads, True)()
        err = max((a - b).abs().max().item() for a, b in zip(ours, ref))
        print(f"Triton kernel under the interpreter (a correctness check, not a speed figure): "
              f"max |gradient difference| vs the reference {err:.2e}")
        result["kernel_check"] = {"interpreter": True, "max_abs_grad_diff": err}
    else:
        print("Triton kernel: not run (no GPU; set TRITON_INTERPRET=1 to check it on the CPU).")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["coco", "movi-e", "dinov2-518"], choices=list(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--loop-shape", default="coco", choices=list(SHAPES), help="shape of the whole-loop table")
    ap.add_argument("--no-loop", action="store_true", help="skip the whole-loop table")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns and variants")
    ap.add_argument("--save", action="store_true", help="write JSON to ./bench-results/")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    payload = {"hardware": hardware(), "versions": versions(), "args": vars(args), "iterations": ITERATIONS,
               "shapes": {n: asdict(SHAPES[n]) for n in args.shapes}}
    path = result_path("bench_slot_attention") if args.save else None

    if not torch.cuda.is_available():
        payload["cpu"] = cpu_run(dtype)
        payload["missing"] = "GPU figures: no CUDA device on this machine"
    else:
        print(f"{payload['hardware']['gpu']['name']}, torch {torch.__version__}, triton "
              f"{payload['versions']['triton']}, {args.dtype}, {ITERATIONS} iterations\n")
        print_step_header(not args.no_compile)
        payload["step"] = rows = bench_steps(args.shapes, dtype, not args.no_compile)
        for row in rows:
            if row["pass"] == "fwd+bwd" and "compile" in row["ms"]:
                ms = row["ms"]
                ok = ms["eager"] / ms["triton"] >= 2 and ms["compile"] / ms["triton"] >= 1.3
                print(f"target (fwd+bwd >= 2x eager, >= 1.3x compile) at {row['shape']}: {'met' if ok else 'NOT met'}")
        if args.save:
            save_result("bench_slot_attention", payload, path)   # partial results survive a later failure
        if not args.no_loop:
            print(f"\nWhole loop, forward+backward, shape {args.loop_shape} {asdict(SHAPES[args.loop_shape])}:")
            payload["loop"] = bench_loop(args.loop_shape, dtype, not args.no_compile)
    if args.save:
        print(f"saved {save_result('bench_slot_attention', payload, path)}")


if __name__ == "__main__":
    main()
