"""A synthetic segmentation set whose classes need shape and texture, not colour, to tell apart.

Every object gets a random colour; its class is the pair (shape, texture). A model that only looks at
colour cannot beat predicting background, so the set rewards real spatial features, as real data does.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("disc", "square", "triangle")
TEXTURES = ("plain", "stripes")
CLASSES = ["background"] + [f"{s}-{t}" for s in SHAPES for t in TEXTURES]  # 7 classes


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    radius = rng.uniform(0.12, 0.28) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    if shape == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if shape == "square":
        return (abs(yy - cy) <= radius * 0.85) & (abs(xx - cx) <= radius * 0.85)
    # upward triangle: below the apex, inside the two slanted edges
    top, bottom = cy - radius, cy + radius
    half_width = (yy - top) / (2 * radius) * radius
    return (yy >= top) & (yy <= bottom) & (abs(xx - cx) <= half_width)


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if texture == "plain":
        return np.ones((size, size))
    period = rng.integers(4, 7)
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi)
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
    return np.where((phase % 1.0) < 0.5, 1.0, 0.35)


def make_sample(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (HxWx3 uint8 image, HxW uint8 mask) pair with 1-3 objects on a noisy background."""
    bg = rng.uniform(40, 200, 3)
    image = bg + rng.normal(0, 12, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, len(CLASSES)))
        shape, texture = CLASSES[cls].split("-")
        region = _shape_mask(shape, size, rng)
        colour = rng.uniform(30, 230, 3)
        shade = _texture(texture, size, rng)[..., None]
        image = np.where(region[..., None], colour * shade + rng.normal(0, 8, (size, size, 3)), image)
        mask[region] = cls
    return np.clip(image, 0, 255).astype(np.uint8), mask
