"""The drawing of the synthetic dataset's scenes: shape outlines, their rasterisation, object
textures and backgrounds, each a pure function of the random generator it is given."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

TEXTURES = ("flat", "stripes", "checker")          # object textures, in the order drawn from
BACKGROUNDS = ("gradient", "blobs", "stripes", "flat")  # background kinds; the default draws the first 3


# --- shapes -------------------------------------------------------------------------------------

def _regular(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced in angle, starting at `angle`."""
    n = len(radii)
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n),
             cy + r * math.sin(angle + 2 * math.pi * k / n)) for k, r in enumerate(radii)]


def shape_polygon(category_id: int, cx: float, cy: float, r: float,
                  rng: np.random.Generator) -> list[tuple[float, float]]:
    """Polygon of one shape of circumradius `r`; every shape contains the disc of radius 0.38 r."""
    angle = rng.uniform(0, 2 * math.pi)
    if category_id == 1:
        return _regular(cx, cy, [r] * 32, 0.0)
    if category_id == 2:
        half_w, half_h = r, r * rng.uniform(0.5, 1.0)
        cos, sin = math.cos(angle), math.sin(angle)
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        scale = r / math.hypot(half_w, half_h)  # keep the circumradius at r
        return [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in corners]
    if category_id == 3:
        return _regular(cx, cy, [r] * 3, angle)
    if category_id == 4:
        return _regular(cx, cy, [r] * 5, angle)
    return _regular(cx, cy, [r, 0.45 * r] * 5, angle)


def rasterise(polygon: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """(H, W) bool mask of a polygon."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


# --- textures -----------------------------------------------------------------------------------

def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20, 235, size=3).astype(np.float32)


def _stripes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1]: a sinusoid along a random direction."""
    theta, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period
    return 0.5 + 0.5 * np.sin(phase)


def _blobs(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) in [0, 1]: smooth noise, a small random grid upsampled bicubically."""
    grid = (rng.uniform(0, 255, size=(rng.integers(3, 7), rng.integers(3, 7)))).astype(np.uint8)
    big = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255


def background(rng: np.random.Generator, height: int, width: int,
               kinds: tuple[str, ...] = BACKGROUNDS[:3]) -> np.ndarray:
    """(H, W, 3) float32 background: gradient, smooth noise or stripes between two colours, or flat."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = BACKGROUNDS.index(kinds[rng.integers(len(kinds))])
    if kind == 0:
        theta = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        weight = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:
        weight = _blobs(rng, height, width)
    elif kind == 2:
        weight = _stripes(rng, yy, xx)
    else:
        weight = np.zeros((height, width), dtype=np.float32)
    a, b = _colour(rng), _colour(rng)
    return a * (1 - weight[..., None]) + b * weight[..., None]


def texture(rng: np.random.Generator, height: int, width: int,
            kinds: tuple[str, ...] = TEXTURES) -> np.ndarray:
    """(H, W, 3) float32 object texture: flat, striped or checkered."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = _colour(rng), _colour(rng)
    kind = TEXTURES.index(kinds[rng.integers(len(kinds))])
    if kind == 0:
        weight = np.zeros((height, width), dtype=np.float32)
    elif kind == 1:
        weight = _stripes(rng, yy, xx)
    else:
        cell = int(rng.integers(3, 9))
        weight = ((yy // cell + xx // cell) % 2).astype(np.float32)
    return a * (1 - 0.6 * weight[..., None]) + b * (0.6 * weight[..., None])
