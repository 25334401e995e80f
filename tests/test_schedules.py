"""The reference trainer's schedules: linear warm-up (numpy.linspace end points) then cosine."""
import math

import numpy as np
import pytest

from spot_fast.schedules import cosine_schedule, warmup_epochs


@pytest.mark.parametrize("epochs,iters,warm", [(5, 7, 0), (5, 7, 1), (3, 4, 2), (2, 1, 1)])
def test_cosine_schedule_matches_linspace_then_cosine(epochs, iters, warm):
    got = np.array(cosine_schedule(4e-4, 4e-7, epochs, iters, warm))
    n_warm = warm * iters
    ramp = np.linspace(0.0, 4e-4, n_warm)
    rest = np.arange(epochs * iters - n_warm)
    decay = 4e-7 + 0.5 * (4e-4 - 4e-7) * (1 + np.cos(np.pi * rest / len(rest)))
    assert got.shape == (epochs * iters,)
    np.testing.assert_allclose(got, np.concatenate([ramp, decay]), rtol=1e-12, atol=0)


def test_schedule_edges():
    s = cosine_schedule(1.0, 0.0, 2, 10, 1)
    assert s[0] == 0.0 and s[9] == 1.0 and s[10] == 1.0     # warm-up ends at the peak, decay starts there
    assert s[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert cosine_schedule(5e-3, 5e-3, 3, 4) == [5e-3] * 12  # constant CE weight (final = start)
    with pytest.raises(ValueError, match="warm-up"):
        cosine_schedule(1.0, 0.0, 2, 10, 3)


def test_warmup_epochs_as_the_reference_counts_them():
    assert warmup_epochs(10000, 118287, 64) == 5      # COCO: int(10000 / (118287 / 64))
    assert warmup_epochs(10000, 10582, 64) == 60      # VOC trainaug
