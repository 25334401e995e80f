"""Registers and spills of the fused kernels per launch config, compiled for a GPU without one.

    TRITON_INTERPRET=0 python benchmarks/tools/attention_step_registers.py [--all-configs]

A developer tool: it lives beside the benchmarks, outside the installed package.

Compiles `_fwd_kernel` and `_bwd_kernel` of attention_step_triton.py for sm_90 (Triton's bundled
ptxas; no GPU needed) at the COCO and MOVi-E step shapes (H = 1, head_dim 256, K = 7 and 24), fp32
and bf16, and prints ptxas's register and spill counts: what the launch configs in
attention_step_triton.py were picked from. Needs TRITON_INTERPRET off (the interpreter replaces
the kernels with Python functions that cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spot_fast.kernels import attention_step_triton as sat

TARGET = GPUTarget("cuda", 90, 32)
HEAD_DIM = 256
_PTR = {"fp32": "*fp32", "bf16": "*bf16"}
_TL = {"fp32": tl.float32, "bf16": tl.bfloat16}
_SAVED = ("acc_ptr", "col_ptr", "p_ptr", "u_ptr", "dq_ptr")        # fp32 whatever the inputs


def _constants(dtype: str, K: int) -> dict:
    """The constexprs both kernels share, as `attention_step_triton._forward/_backward` set them."""
    dt = _TL[dtype]
    wide = tl.float64 if dt == tl.float32 else dt
    return dict(H=1, K=K, DH=HEAD_DIM, J_PAD=sat._pad(K), C_PAD=sat._pad(HEAD_DIM), DT=dt, WIDE_DT=wide,
                WIDE_ACC=tl.float64 if wide == tl.float64 else tl.float32, PREC=sat.FP32_DOT,
                EPS=sat.EPSILON)


def compile_counts(kernel, dtype: str, constants: dict, config: tuple[int, int, int]) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of `kernel` compiled for TARGET."""
    block_n, warps, stages = config
    constants = dict(constants, BLOCK_N=block_n)
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _SAVED else _PTR[dtype]
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature,
                       constexprs={(kernel.arg_names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET.arch}a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spills


def report(all_configs: bool) -> list[dict]:
    """One row per (pass, dtype, K, config): registers and spill bytes."""
    if sat.INTERPRETING:
        raise SystemExit("attention_step_registers: set TRITON_INTERPRET=0 (the interpreter's kernels "
                         "cannot be compiled)")
    passes = [("fwd", sat._fwd_kernel, sat._FWD_CONFIGS if all_configs else [sat._FWD_DEFAULT],
               lambda K: dict(K_PAD=sat._pad(K), RETURN_ATTN=True, SAVE_P=True)),
              ("bwd", sat._bwd_kernel, sat._BWD_CONFIGS if all_configs else [sat._BWD_DEFAULT],
               lambda K: dict(HAS_DVIS=True, HAS_DLOGITS=True))]
    rows = []
    for name, kernel, configs, extra in passes:
        for dtype in _TL:
            for K in (7, 24):
                for config in configs:
                    registers, spills = compile_counts(kernel, dtype, dict(_constants(dtype, K), **extra(K)),
                                                       config)
                    rows.append(dict(kernel=name, dtype=dtype, K=K, config=config, registers=registers,
                                     spill_bytes=spills))
                    print(f"{name} {dtype} K={K:2d} (BLOCK_N, warps, stages)={config}: "
                          f"{registers} registers, {spills} bytes spilled", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not only the defaults")
    report(ap.parse_args().all_configs)


if __name__ == "__main__":
    main()
