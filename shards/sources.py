"""Dataset layouts on disk -> samples: (key, encoded image bytes and extension, class-id mask or None).

Each source knows its classes and three pools: `train` (masks known), `val` (masks known) and `extra`
(images without masks, always unlabeled). Masks come back as HxW uint8 arrays of class ids, 255 = ignore.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image

from . import synthetic, textures
from .manifest import IGNORE
from .errors import BadInput


@dataclass
class Item:
    key: str  # unique, no dots (webdataset splits keys at the first dot)
    load_image: Callable[[], tuple[bytes, str]]
    load_mask: Optional[Callable[[], np.ndarray]]


@dataclass
class Source:
    name: str
    classes: list[str]
    train: list[Item]
    val: list[Item]
    extra: list[Item]
    labeled_pool: Optional[int] = None  # labeled ids are drawn from the first N of train (VOC: fine set)


def sample_key(name: str) -> str:
    return name.replace(".", "_").replace("/", "_")


def _read_file_image(path: str) -> Callable[[], tuple[bytes, str]]:
    def load() -> tuple[bytes, str]:
        with open(path, "rb") as f:
            data = f.read()
        try:
            Image.open(io.BytesIO(data)).verify()
        except Exception:
            raise BadInput(f"{path}: unreadable image") from None
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        return data, "jpg" if ext == "jpeg" else ext

    return load


def _read_mask(path: str, num_classes: int, lut: Optional[np.ndarray] = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            mask = np.array(Image.open(path))
        except Exception:
            raise BadInput(f"{path}: unreadable mask") from None
        if mask.ndim != 2:
            raise BadInput(f"{path}: mask must have one channel (or a palette), got shape {mask.shape}")
        if lut is not None:
            mask = lut[mask]
        mask = mask.astype(np.uint8)
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE)])
        if bad.size:
            raise BadInput(f"{path}: class id {int(bad[0])} beyond the {num_classes} classes")
        return mask

    return load


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise BadInput(f"{path}: missing ({what})")
    return path


def _list_file(path: str) -> list[str]:
    with open(_need(path, "image list")) as f:
        return [line.split()[0] for line in f if line.strip()]


VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def voc(root: str) -> Source:
    """VOCdevkit/VOC2012. With SegmentationClassAug present, the train pool is the 10,582-image
    augmented set (every Aug mask not in val); labeled ids are then still drawn from train.txt."""
    jpeg = _need(os.path.join(root, "JPEGImages"), "VOC JPEGImages folder")
    seg = _need(os.path.join(root, "SegmentationClass"), "VOC SegmentationClass folder")
    lists = os.path.join(root, "ImageSets", "Segmentation")
    train_ids, val_ids = _list_file(os.path.join(lists, "train.txt")), _list_file(os.path.join(lists, "val.txt"))
    aug = os.path.join(root, "SegmentationClassAug")
    pool = list(train_ids)
    if os.path.isdir(aug):
        val_set, fine = set(val_ids), set(train_ids)
        pool += sorted(n[:-4] for n in os.listdir(aug) if n.endswith(".png") and n[:-4] not in val_set | fine)

    def item(name: str) -> Item:
        mask = os.path.join(seg, name + ".png")
        if not os.path.exists(mask):
            mask = os.path.join(aug, name + ".png")
        return Item(sample_key(name), _read_file_image(_need(os.path.join(jpeg, name + ".jpg"), "VOC image")),
                    _read_mask(_need(mask, "VOC mask"), len(VOC_CLASSES)))

    return Source("voc", VOC_CLASSES, [item(n) for n in pool], [item(n) for n in val_ids], [],
                  labeled_pool=len(train_ids))


# Cityscapes labelIds -> the 19 train ids (cityscapesScripts' labels.py); everything else is ignored.
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
_CITYSCAPES_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CITYSCAPES_LUT = np.full(256, IGNORE, np.uint8)
CITYSCAPES_LUT[_CITYSCAPES_IDS] = np.arange(19)


def cityscapes(root: str) -> Source:
    def split(name: str) -> list[Item]:
        img_root = _need(os.path.join(root, "leftImg8bit", name), "Cityscapes leftImg8bit split")
        gt_root = _need(os.path.join(root, "gtFine", name), "Cityscapes gtFine split")
        items = []
        for city in sorted(os.listdir(img_root)):
            for fname in sorted(os.listdir(os.path.join(img_root, city))):
                if not fname.endswith("_leftImg8bit.png"):
                    continue
                stem = fname[: -len("_leftImg8bit.png")]
                gt = _need(os.path.join(gt_root, city, stem + "_gtFine_labelIds.png"), "Cityscapes label")
                items.append(Item(sample_key(stem), _read_file_image(os.path.join(img_root, city, fname)),
                                  _read_mask(gt, 19, CITYSCAPES_LUT)))
        return items

    return Source("cityscapes", CITYSCAPES_CLASSES, split("train"), split("val"), [])


CONTEXT_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood"]
# PASCAL-Context 59: masks in SegmentationClassContext hold 0 = background (the 400+ rare classes) and
# 1..59; as usual for the 59-class setting, 0 becomes ignore (255) and 1..59 become train ids 0..58.
CONTEXT_LUT = np.full(256, IGNORE, np.uint8)
CONTEXT_LUT[1:60] = np.arange(59)


def context(root: str) -> Source:
    jpeg = _need(os.path.join(root, "JPEGImages"), "PASCAL-Context JPEGImages folder")
    seg = _need(os.path.join(root, "SegmentationClassContext"), "PASCAL-Context masks folder")
    lists = os.path.join(root, "ImageSets", "SegmentationContext")

    def item(name: str) -> Item:
        return Item(sample_key(name), _read_file_image(_need(os.path.join(jpeg, name + ".jpg"), "image")),
                    _read_mask(_need(os.path.join(seg, name + ".png"), "mask"), 59, CONTEXT_LUT))

    return Source("context", CONTEXT_CLASSES, [item(n) for n in _list_file(os.path.join(lists, "train.txt"))],
                  [item(n) for n in _list_file(os.path.join(lists, "val.txt"))], [])


_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def folder(root: str) -> Source:
    """ROOT/classes.txt, ROOT/{train,val}/{images,masks}, optional ROOT/unlabeled (the README's "Train on your
    own data")."""
    with open(_need(os.path.join(root, "classes.txt"), "class list")) as f:
        classes = [line.strip() for line in f if line.strip()]
    if not classes:
        raise BadInput(f"{os.path.join(root, 'classes.txt')}: no classes")

    def images(path: str) -> dict[str, str]:
        return {os.path.splitext(n)[0]: os.path.join(path, n) for n in sorted(os.listdir(path))
                if n.lower().endswith(_IMAGE_EXTS)}

    def split(name: str) -> list[Item]:
        imgs = images(_need(os.path.join(root, name, "images"), f"{name} images folder"))
        masks = _need(os.path.join(root, name, "masks"), f"{name} masks folder")
        return [Item(sample_key(stem), _read_file_image(path),
                     _read_mask(_need(os.path.join(masks, stem + ".png"), "mask"), len(classes)))
                for stem, path in imgs.items()]

    extra_dir = os.path.join(root, "unlabeled")
    extra = [Item(sample_key("extra_" + stem), _read_file_image(path), None)
             for stem, path in (images(extra_dir).items() if os.path.isdir(extra_dir) else [])]
    return Source("folder", classes, split("train"), split("val"), extra)


def _encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _generated(name: str, classes: list[str], make, train: int, val: int, seed: int) -> Source:
    """A source drawn by `make(rng)` -> (image, mask): deterministic per (seed, split, index), so an image and
    its mask agree when loaded apart."""
    def item(split: str, index: int) -> Item:
        def sample():
            return make(np.random.default_rng([seed, 0 if split == "train" else 1, index]))

        return Item(f"{split}{index:06d}", lambda: (_encode_png(sample()[0]), "png"), lambda: sample()[1])

    return Source(name, classes, [item("train", i) for i in range(train)], [item("val", i) for i in range(val)], [])


def synthetic_source(train: int, val: int, size: int, seed: int) -> Source:
    return _generated("synthetic", list(synthetic.CLASSES), lambda rng: synthetic.make_sample(size, rng),
                      train, val, seed)


def texture_source(preset: str, train: int, val: int, size: int, seed: int) -> Source:
    """Real pixels: scikit-image's textures and photographs cut into shapes (shards/textures.py)."""
    chosen = textures.PRESETS[preset]
    return _generated(preset, textures.classes(chosen), lambda rng: textures.make_sample(chosen, size, rng),
                      train, val, seed)


def open_source(name: str, root: Optional[str], *, synthetic_train: int = 1200, synthetic_val: int = 240,
                synthetic_size: int = 64, seed: int = 0) -> Source:
    if name == "synthetic":
        return synthetic_source(synthetic_train, synthetic_val, synthetic_size, seed)
    if name in textures.PRESETS:
        return texture_source(name, synthetic_train, synthetic_val, synthetic_size, seed)
    if not root:
        raise BadInput(f"--root is required for source {name}")
    if not os.path.isdir(root):
        raise BadInput(f"{root}: dataset root not found")
    return {"voc": voc, "cityscapes": cityscapes, "context": context, "folder": folder}[name](root)
