"""Images to pretrain a backbone on, of kinds no study set shows: exemplar classes (Dosovitskiy et al.,
"Discriminative unsupervised feature learning with exemplar convolutional neural networks", 2014). Each
class is one patch of a real image; its samples are that patch under random scale, shift, rotation, flip,
brightness, contrast and colour, so telling classes apart takes the patch's texture and structure, what a
segmenter's first layers need, and no labels.

The images are histology, retina fundus photographs, an MRI slice, shaded terrain relief, a photographed
gift box and a photographed motorcycle, from scikit-image's and matplotlib's bundled data: nothing is downloaded, and none of them (nor
their kind) is a class or background of the study sets (shards/textures.py, shards/synthetic.py). Pure
numpy and PIL; the same arguments give the same bytes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .errors import BadInput
from .textures import SHAPES, shape_region


def _skimage(name: str):
    try:
        from skimage import data  # a study dependency, as for shards/textures.py
    except ImportError:
        raise BadInput("exemplar pretraining needs scikit-image: pip install scikit-image") from None
    return getattr(data, name)()


def _sample(name: str):
    from matplotlib import cbook
    return cbook.get_sample_data(name)


def _mri() -> np.ndarray:
    with _sample("s1045.ima.gz") as f:  # 256 x 256 big-endian 16-bit, as matplotlib's own example reads it
        return np.frombuffer(f.read(), ">u2").reshape(256, 256).astype(np.float32)


def _terrain() -> np.ndarray:
    from matplotlib.colors import LightSource
    elevation = _sample("jacksboro_fault_dem.npz")["elevation"].astype(np.float32)
    return LightSource(azdeg=315, altdeg=45).hillshade(elevation, vert_exag=0.05) * 255


def _present() -> np.ndarray:
    with Image.open(_sample("Minduka_Present_Blue_Pack.png")) as image:
        return np.asarray(image.convert("RGB"))


def _retina() -> np.ndarray:
    image = _skimage("retina")
    side = image.shape[0]  # the fundus is a disc on black: its central square only
    return image[side * 3 // 10: side * 7 // 10, side * 3 // 10: side * 7 // 10]


SOURCES = {
    "immunohistochemistry": lambda: _skimage("immunohistochemistry"),
    "retina": _retina,
    "microaneurysms": lambda: _skimage("microaneurysms"),
    "mri": _mri,
    "terrain": _terrain,
    "present": _present,
    "motorcycle": lambda: _skimage("stereo_motorcycle")[0],  # the left view of the stereo pair
}


@lru_cache(maxsize=None)
def source_image(name: str) -> np.ndarray:
    """One source as H x W x 3 float32 in 0..255."""
    image = np.asarray(SOURCES[name](), np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    low, high = image.min(), image.max()
    return (image - low) * (255.0 / max(high - low, 1e-6))


def _view(image: np.ndarray, cy: float, cx: float, side: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """The patch at (cy, cx) of this side, rescaled by 0.7-1.4, shifted by up to a fifth of its side,
    rotated by up to 20 degrees, flipped half the time, then jittered in brightness, contrast and colour
    (a tenth of the views grey)."""
    h, w = image.shape[:2]
    side = side * rng.uniform(0.7, 1.4)
    cy, cx = cy + rng.uniform(-0.2, 0.2) * side, cx + rng.uniform(-0.2, 0.2) * side
    half = side * 0.75  # room for the rotation's corners
    box = [int(np.clip(v, 0, limit)) for v, limit in ((cx - half, w), (cy - half, h), (cx + half, w), (cy + half, h))]
    crop = Image.fromarray(image[box[1]:box[3], box[0]:box[2]].astype(np.uint8))
    crop = crop.rotate(rng.uniform(-20, 20), Image.BILINEAR)
    inner = (crop.width - side) / 2, (crop.height - side) / 2
    crop = crop.crop((int(max(inner[0], 0)), int(max(inner[1], 0)),
                      int(crop.width - max(inner[0], 0)), int(crop.height - max(inner[1], 0))))
    view = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32)
    if rng.random() < 0.5:
        view = view[:, ::-1]
    mean = view.mean()
    view = (view - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.7, 1.3)
    view = view * rng.uniform(0.9, 1.1, 3)
    if rng.random() < 0.1:
        view = np.repeat(view.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(view, 0, 255).astype(np.uint8)


def exemplar_set(classes: int, views: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`classes` exemplar classes of `views` samples each: (images N x size x size x 3 uint8, labels N),
    class by class. Classes take the sources in turn; a class's patch is 15-40% of its source's shorter
    side (at least 24 px), where the source is not flat (patches of near-constant pixels are drawn again)."""
    if classes < 1 or views < 1 or size < 8:
        raise BadInput(f"exemplar set: classes ({classes}) and views ({views}) must be >= 1, size ({size}) >= 8")
    rng = np.random.default_rng(seed)
    names = sorted(SOURCES)
    images = np.empty((classes * views, size, size, 3), np.uint8)
    for c in range(classes):
        image = source_image(names[c % len(names)])
        h, w = image.shape[:2]
        while True:
            side = max(24.0, min(h, w) * rng.uniform(0.15, 0.4))
            cy, cx = rng.uniform(side / 2, h - side / 2), rng.uniform(side / 2, w - side / 2)
            patch = image[int(cy - side / 2):int(cy + side / 2), int(cx - side / 2):int(cx + side / 2)]
            if patch.std() > 8:
                break
        for v in range(views):
            images[c * views + v] = _view(image, cy, cx, side, size, rng)
    return images, np.repeat(np.arange(classes), views)


def exemplar_scene(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene cut from an exemplar set, laid out as the study sets lay theirs (shards/textures.py): a view
    of one class as the background, one to three more views, each of any class (the background's may come
    again), cut into shapes 0.24 to 0.56 of the side across over it. The mask is each pixel's exemplar class:
    a dense task, telling textures apart at every pixel, which is what the segmenter's backbone is asked
    downstream; (image, mask int64)."""
    size = images.shape[1]
    index = rng.integers(len(labels))
    image, mask = images[index].copy(), np.full((size, size), labels[index], np.int64)
    for _ in range(rng.integers(1, 4)):
        index = rng.integers(len(labels))
        region = shape_region(SHAPES[rng.integers(len(SHAPES))], size, rng.uniform(0.12, 0.28) * size, rng)
        image[region], mask[region] = images[index][region], labels[index]
    return image, mask
