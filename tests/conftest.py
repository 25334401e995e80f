"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
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
def golden():
    if not GOLDEN_PATH.is_file():
        pytest.fail(f"golden file missing: {GOLDEN_PATH} (the shared/ folder must sit beside the repo)")
    return torch.load(GOLDEN_PATH, weights_only=True)
