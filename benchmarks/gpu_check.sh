#!/usr/bin/env bash
# One pass on a GPU machine (about 12 minutes in the worst case; every step has a timeout): the fused slot-attention kernel's tests on
# CUDA, then its benchmark, the cache benchmark and `spot-fast bench` (eager, then with
# torch.compile). Run from anywhere:
#     bash benchmarks/gpu_check.sh
# JSON results go to ./bench-results/ (the benchmarks' default folder) and, when $OUT is set, are
# copied there at the end; with $OUT set the whole log is also written to $OUT/gpu_check.log.
# Each step has its own timeout, and a failed step does not stop the later ones.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
# Triton reads TRITON_INTERPRET as a boolean: "0" is off (tests/conftest.py only sets it if unset).
export TRITON_INTERPRET=0
set -x

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0))' || exit 1

# spot-fast itself: an editable install without fetching anything; if pip cannot, links inside this
# (throwaway) checkout, since the package maps kernels/ and cli/ into spot_fast/ and the repo root
# comes first on sys.path for `python -m`.
if ! $PY -c 'import spot_fast.kernels.attention_step' 2>/dev/null; then
    $PY -m pip install -q -e . --no-deps --no-build-isolation \
    || { [ -e spot_fast/kernels ] || ln -s ../kernels spot_fast/kernels; \
         [ -e spot_fast/cli ] || ln -s ../cli spot_fast/cli; }
fi
$PY -c 'import spot_fast.kernels.attention_step_triton as m; print("kernel module", m.__file__)' || exit 1
$PY -c 'import pytest' || echo "pytest missing: the test steps below will fail"

# GPU-marked tests first (bf16 on tensor cores, autotuning at benchmark shapes, CUDA graphs,
# inductor), then the rest of the file, which runs on CUDA too now that the interpreter is off.
timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu -rs ${OUT:+--junitxml=$OUT/kernel_tests_gpu.xml} tests/test_kernel_attention_step.py
timeout 80 $PY -m pytest -q -p no:cacheprovider -m "not gpu and not slow" ${OUT:+--junitxml=$OUT/kernel_tests_cuda.xml} tests/test_kernel_attention_step.py

# The benchmark: fp32 (SPOT trains in fp32) at the three shapes plus the whole loop; it saves JSON
# after the step table, so a timeout in the loop part still leaves the step figures.
timeout 100 $PY benchmarks/bench_slot_attention.py --save
timeout 40 $PY benchmarks/bench_slot_attention.py --dtype bf16 --shapes coco --no-loop --save

if [ -f benchmarks/bench_cache.py ]; then
    timeout 30 $PY benchmarks/bench_cache.py --images 500 --no-cold --save
fi

# spot-fast bench (COCO shapes, batch 64, bf16 fast rows): the reference rows are the reference's
# step (its 4-worker loader decoding JPEGs and masks, DINO's ViT, serial decoding); the fast rows
# read a cache the bench builds first (GPU encoder). Eager first (no compile time), then compiled.
timeout 240 $PY benchmarks/bench_train.py --sections stage1,stage2,eval --compile off --repeats 5 ${OUT:+--out $OUT}
timeout 200 $PY benchmarks/bench_train.py --sections stage1,eval --compile on --repeats 5 ${OUT:+--out $OUT}
set +x
if [ -n "${OUT:-}" ] && ls bench-results/*.json >/dev/null 2>&1; then
    cp bench-results/*.json "$OUT"/
fi
echo "gpu_check done"
