"""The stages a fetched sample goes through, each a small function of plain values: verify (its bytes against
the manifest) -> decode (image and mask) -> augment -> collate (a batch); and what happens to a sample that
fails one of them: a handler decides (the default logs it and skips it; the stream counts what it skipped and
fills its place in the batch with a readable sample of the same batch)."""
from __future__ import annotations

import io
import logging
import tarfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from . import augment
from .manifest import IGNORE, MASK, WITHHELD, ShardInfo
from .tario import payload_crc32, tar_samples

if TYPE_CHECKING:
    from .stream import StreamSpec

log = logging.getLogger("guidedmix.shards")
IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot be trained on: where it is, and why."""

    shard: str
    sample: str  # "key K", or "sample N" (its index in the shard) where the key cannot be read
    reason: str
    reported: bool = False  # the fetch warned about its shard already (a cut-off end)


# what to do with a bad sample: return (skip it) or raise (stop the stream)
BadSampleHandler = Callable[[BadSample], None]


def skip_bad_sample(bad: BadSample) -> None:
    """The default handler: one warning a sample (not again for a shard's cut-off end), and skip it."""
    if not bad.reported:
        log.warning("shard %s %s: %s, skipped", bad.shard, bad.sample, bad.reason)


class Unusable(Exception):
    def __init__(self, reason: str, sample: str = "", reported: bool = False):
        super().__init__(reason)
        self.reason, self.sample, self.reported = reason, sample, reported


# What a fetch gives for one position of the order: one sample's tar bytes (a byte range), the sample as read
# from its whole shard, or None (the shard's readable part ends before it; the fetch warned once a shard).
Fetched = Union[bytes, dict, None]


def verify(fetched: Fetched, info: ShardInfo, index: int) -> dict:
    """The sample, once its bytes read as one tar sample whose checksum is the manifest's (a byte range; a
    whole shard's hash is checked once as it is fetched)."""
    if fetched is None:
        raise Unusable("past the readable end of the shard", f"sample {index}", reported=True)
    if isinstance(fetched, dict):
        return fetched
    try:
        sample = next(iter(tar_samples(fetched, info.name)))
    except (tarfile.TarError, ValueError, EOFError, StopIteration) as e:
        raise Unusable(f"unreadable ({e})", f"sample {index}") from None
    if payload_crc32(sample) != info.crc32[index]:
        raise Unusable("checksum differs from the manifest", f"key {sample.get('__key__')}")
    return sample


def decode(sample: dict, split: str, num_classes: int) -> tuple[str, np.ndarray, Optional[np.ndarray]]:
    """(key, H x W x 3 uint8 image, H x W uint8 mask or None). Unlabeled samples have no mask; a study's shard
    set keeps their true one apart (`WITHHELD`), to score pseudo masks."""
    key = sample.get("__key__", "?")
    try:
        ext = next(e for e in IMAGE_EXTS if e in sample)
        image = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
        mask_name = MASK if split != "unlabeled" else WITHHELD
        mask = None
        if mask_name in sample or split != "unlabeled":
            mask = np.asarray(Image.open(io.BytesIO(sample[mask_name])))
            if mask.ndim != 2 or mask.shape != image.shape[:2]:
                raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
            bad = mask[(mask >= num_classes) & (mask != IGNORE)]
            if bad.size:
                raise ValueError(f"class id {int(bad[0])} beyond the {num_classes} classes")
        return key, image, mask
    except Exception as e:
        raise Unusable(f"corrupt sample ({str(e)[:120]})", f"key {key}") from None


def augmented(spec: "StreamSpec", epoch: int, key: str, image, mask) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Train: the sample's augmentation, drawn from (seed, epoch, key) alone, so any worker at any world size
    draws the same; val: as stored. As tensors."""
    if spec.train:
        rng = np.random.default_rng([spec.seed, epoch, zlib.crc32(key.encode())])
        image, mask = augment.train_augment(image, mask, rng, spec.crop_size, spec.scale_min,
                                            spec.scale_max, spec.flip, spec.photometric)
    return augment.to_tensor(image), None if mask is None else augment.mask_tensor(mask)


def collate(spec: "StreamSpec", items: list, size: int, epoch: int, tags: dict) -> dict:
    """A batch of `size` from decoded (key, image, mask) items; `tags` may name the batch's consumed keys
    (train: stand-ins are not), else the items' keys."""
    tags = {"keys": [k for k, _, _ in items], **tags}
    if spec.train and items:  # bad samples' places: the batch's readable ones again (equal sizes)
        items = [items[i % len(items)] for i in range(size)]
    prepared = [(k, *augmented(spec, epoch, k, im, m)) for k, im, m in items]
    if prepared:
        height = max(t.shape[1] for _, t, _ in prepared)
        width = max(t.shape[2] for _, t, _ in prepared)
    else:
        height = width = spec.crop_size
    images = torch.zeros(size, 3, height, width)
    masks = torch.full((size, height, width), IGNORE, dtype=torch.long)
    for i, (_, image, mask) in enumerate(prepared):  # val: pad to the batch's largest image, ignored
        images[i, :, :image.shape[1], :image.shape[2]] = image
        if mask is not None:
            masks[i, :mask.shape[0], :mask.shape[1]] = mask
    batch = {"image": images, "epoch": epoch, **tags}
    if spec.split != "unlabeled":
        batch["mask"] = masks
    elif any(mask is not None for _, _, mask in prepared):
        batch["withheld_mask"] = masks  # never a training target: scores pseudo masks
    return batch
