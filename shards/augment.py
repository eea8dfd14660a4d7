"""Joint image/mask augmentation (numpy + PIL), deterministic given a numpy Generator.

Train: random scale, crop with ignore-padding, horizontal flip, photometric distortion (image only).
Every function takes an HxWx3 uint8 image and an HxW uint8 mask (or None for unlabeled images).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from .manifest import IGNORE

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def rescale(image, mask, scale: float):
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


def pad_to(image, mask, height: int, width: int):
    h, w = image.shape[:2]
    if h >= height and w >= width:
        return image, mask
    ph, pw = max(0, height - h), max(0, width - w)
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    image[h:, :] = MEAN.astype(np.uint8)  # padding normalises to zero
    image[:, w:] = MEAN.astype(np.uint8)
    if mask is not None:
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
    return image, mask


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image.astype(np.float32)
    if rng.random() < 0.5:  # brightness
        out += rng.uniform(-32, 32)
    if rng.random() < 0.5:  # contrast
        out = (out - out.mean()) * rng.uniform(0.5, 1.5) + out.mean()
    if rng.random() < 0.5:  # saturation
        grey = out.mean(axis=2, keepdims=True)
        out = (out - grey) * rng.uniform(0.5, 1.5) + grey
    return np.clip(out, 0, 255).astype(np.uint8)


def train_augment(image, mask: Optional[np.ndarray], rng: np.random.Generator, crop: int,
                  scale_min: float, scale_max: float, flip: bool, jitter: bool):
    image, mask = rescale(image, mask, rng.uniform(scale_min, scale_max))
    image, mask = pad_to(image, mask, crop, crop)
    h, w = image.shape[:2]
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    image = image[top:top + crop, left:left + crop]
    mask = None if mask is None else mask[top:top + crop, left:left + crop]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    if jitter:
        image = photometric(image, rng)
    return image, mask


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float32."""
    return torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(mask, dtype=np.int64))
