"""Test setup. Without a GPU the Triton kernels run on Triton's CPU interpreter: TRITON_INTERPRET=1
must be set before triton is first imported, so it is set here (importing torch and asking for CUDA
does not import triton). With a GPU it is left alone, so the kernel tests (the `gpu`-marked ones
included) run compiled on CUDA; an explicit TRITON_INTERPRET in the environment always wins."""
import os
from pathlib import Path

import pytest
import torch

INTERPRET_FROM_ENV = os.environ.get("TRITON_INTERPRET")    # what the environment asked for, if anything
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the spec folder (golden numbers, permutations): `shared/` beside the repo, or $SPOT_FAST_SHARED
SHARED = Path(os.environ.get("SPOT_FAST_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
GOLDEN_PATH = SHARED / "spec" / "golden" / "spot_tiny.pt"
PERMUTATIONS_PATH = SHARED / "spec" / "permutations.json"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def interpret_from_env() -> str | None:
    """TRITON_INTERPRET as the environment gave it before this file's default (None: unset)."""
    return INTERPRET_FROM_ENV


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN_PATH.is_file():
        pytest.fail(f"golden file missing: {GOLDEN_PATH} (the shared/ folder must sit beside the repo, "
                    f"or set SPOT_FAST_SHARED)")
    return torch.load(GOLDEN_PATH, weights_only=True)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the rest of a test module, as the subprocesses run it
    (OMP_NUM_THREADS=1): in-process results have the same bits as the subprocess builds and runs
    they are compared with, and a shared 2-core box is not oversubscribed. Module-scoped, so that
    module-scoped fixtures (caches built once per module) run single-threaded too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
