"""Scenes of real pixels with exact masks, for studies: photographs and textures that ship with
scikit-image, cut into shapes and laid on a background texture. An object's class is the texture it is cut
from, so telling classes apart needs the texture's real structure, not a colour or a drawn pattern.

Two presets, two regimes:
- `textures`: six distinct textures (three grey, three colour photographs) on a choice of three
  backgrounds, objects a fifth to half of the image wide;
- `textures-hard`: ten grey textures, each object's brightness and contrast jittered so that grey level
  tells nothing, smaller objects, a grey background of the same kind: a weak teacher at few labels.
scikit-image is a study dependency (`pip install scikit-image`), imported only by these sources.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .errors import BadInput


@dataclass(frozen=True)
class Preset:
    objects: tuple[str, ...]  # class 1.. in this order; class 0 is the background
    backgrounds: tuple[str, ...]
    radius: tuple[float, float]  # object size, a share of the image side
    per_image: tuple[int, int]  # objects per image, inclusive
    grey: bool  # every texture as grey levels
    jitter: float  # per-object brightness/contrast jitter (0: none)


PRESETS = {
    "textures": Preset(("brick", "grass", "gravel", "coffee", "chelsea", "rocket"),
                       ("moon", "hubble_deep_field", "page"), (0.12, 0.28), (1, 3), False, 0.0),
    "textures-hard": Preset(("brick", "grass", "gravel", "coins", "camera", "text", "cell", "clock", "page",
                             "astronaut"), ("moon",), (0.08, 0.2), (2, 4), True, 0.35),
}
SHAPES = ("disc", "square", "triangle", "blob")


@lru_cache(maxsize=None)
def _texture(name: str, grey: bool) -> np.ndarray:
    try:
        from skimage import data  # a study dependency: only these sources need it
    except ImportError:
        raise BadInput("--source textures needs scikit-image: pip install scikit-image") from None
    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.float32)
    if grey:
        image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    return image


def _patch(name: str, grey: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size view of a texture: a random crop at a random scale (0.15-0.5 of the texture's side
    per image side), so the same class shows at several scales."""
    texture = _texture(name, grey)
    h, w = texture.shape[:2]
    side = int(min(h, w) * rng.uniform(0.15, 0.5))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(texture[top:top + side, left:left + side].astype(np.uint8))
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32)


def shape_region(shape: str, size: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A size x size boolean region of this shape (SHAPES) and radius in px, placed at random."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(radius, size - radius, 2)
    if shape == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if shape == "square":
        return (abs(yy - cy) <= radius * 0.85) & (abs(xx - cx) <= radius * 0.85)
    if shape == "triangle":
        half_width = (yy - (cy - radius)) / 2
        return (yy >= cy - radius) & (yy <= cy + radius) & (abs(xx - cx) <= half_width)
    blob = np.zeros((size, size), bool)  # three overlapping discs
    for _ in range(3):
        dy, dx = rng.uniform(-0.5, 0.5, 2) * radius
        blob |= (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 <= (0.6 * radius) ** 2
    return blob


def make_sample(preset: Preset, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (HxWx3 uint8 image, HxW uint8 mask) scene; later objects cover earlier ones."""
    image = _patch(preset.backgrounds[rng.integers(len(preset.backgrounds))], preset.grey, size, rng)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(preset.per_image[0], preset.per_image[1] + 1)):
        cls = int(rng.integers(1, len(preset.objects) + 1))
        patch = _patch(preset.objects[cls - 1], preset.grey, size, rng)
        if preset.jitter:
            mean = patch.mean()
            patch = (patch - mean) * (1 + rng.uniform(-preset.jitter, preset.jitter)) \
                + mean * (1 + rng.uniform(-preset.jitter, preset.jitter))
        region = shape_region(SHAPES[rng.integers(len(SHAPES))], size, rng.uniform(*preset.radius) * size, rng)
        image = np.where(region[..., None], patch, image)
        mask[region] = cls
    return np.clip(image, 0, 255).astype(np.uint8), mask


def classes(preset: Preset) -> list[str]:
    return ["background", *preset.objects]
