"""The 9 patch orders of SPOT's autoregressive decoder, for any square h x h grid.

`orders[p][i]` is the raster index of the patch decoded at sequence position i.
"""
from __future__ import annotations

import torch

ORDER_NAMES = (
    "raster",              # 0 rows top-down, each left to right
    "top_left_columns",    # 1 columns left to right, each top-down
    "top_right_columns",   # 2 columns right to left, each top-down
    "right_top_rows",      # 3 rows top-down, each right to left
    "bottom_right_columns",  # 4 columns right to left, each bottom-up
    "reversed_raster",     # 5 the raster order backwards
    "bottom_left_columns",  # 6 columns left to right, each bottom-up
    "left_bottom_rows",    # 7 rows bottom-up, each left to right
    "spiral_center_out",   # 8 a spiral from the centre out, ending at the top-right corner
)


def _spiral_from_top_right(h: int) -> list[int]:
    """Walk the grid's rings from the outside in: start at the top-right corner, go down the
    right column, left along the bottom row, up the left column, right along the top row."""
    out: list[int] = []
    top, bottom, left, right = 0, h - 1, 0, h - 1
    while top <= bottom and left <= right:
        out += [r * h + right for r in range(top, bottom + 1)]
        right -= 1
        if left > right:
            break
        out += [bottom * h + c for c in range(right, left - 1, -1)]
        bottom -= 1
        if top > bottom:
            break
        out += [r * h + left for r in range(bottom, top - 1, -1)]
        left += 1
        if left > right:
            break
        out += [top * h + c for c in range(left, right + 1)]
        top += 1
    return out


def patch_orders(h: int) -> torch.Tensor:
    """(9, h*h) int64: the 9 orders of an h x h grid, in SPOT's order."""
    rows, cols = range(h), range(h)
    rrows, rcols = range(h - 1, -1, -1), range(h - 1, -1, -1)
    orders = [
        [r * h + c for r in rows for c in cols],
        [r * h + c for c in cols for r in rows],
        [r * h + c for c in rcols for r in rows],
        [r * h + c for r in rows for c in rcols],
        [r * h + c for c in rcols for r in rrows],
        [r * h + c for r in rrows for c in rcols],
        [r * h + c for c in cols for r in rrows],
        [r * h + c for r in rrows for c in cols],
        _spiral_from_top_right(h)[::-1],
    ]
    return torch.tensor(orders, dtype=torch.long)


def inverse_orders(orders: torch.Tensor) -> torch.Tensor:
    """inv[p][raster index] = sequence position of that patch under order p."""
    return torch.argsort(orders, dim=-1)
