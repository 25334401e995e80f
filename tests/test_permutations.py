import json

import pytest
import torch

from spot_fast.permutations import ORDER_NAMES, inverse_orders, patch_orders

from conftest import PERMUTATIONS_PATH


def _spec():
    return json.loads(PERMUTATIONS_PATH.read_text())


def test_names_match_spec():
    assert list(ORDER_NAMES) == _spec()["names"]


@pytest.mark.parametrize("grid", sorted(int(g) for g in json.loads(PERMUTATIONS_PATH.read_text())["grids"]))
def test_orders_equal_spec_file(grid):
    expected = torch.tensor(_spec()["grids"][str(grid)])
    assert torch.equal(patch_orders(grid), expected)


@pytest.mark.parametrize("grid", [1, 2, 5, 6, 9, 14])
def test_every_order_is_a_permutation(grid):
    orders = patch_orders(grid)
    assert orders.shape == (9, grid * grid)
    for o in orders:
        assert torch.equal(o.sort().values, torch.arange(grid * grid))
    inv = inverse_orders(orders)
    assert torch.equal(torch.gather(orders, 1, inv), torch.arange(grid * grid).expand(9, -1))
