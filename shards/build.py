"""Dataset layout -> labeled / unlabeled / val WebDataset shards + manifest.json on any fsspec URL."""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from . import sources
from .errors import BadInput
from .manifest import FORMAT, IGNORE, MANIFEST, MASK, WITHHELD
from .tario import payload_crc32
from .storage import check_url, describe_error, filesystem, join

VERSION = 1


def parse_labeled(text: str) -> float | int:
    """`--labeled` is a count (92, 1464) or a fraction of train (0.0625, 1/16)."""
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise BadInput(f"--labeled {text!r}: expected a count, a fraction like 0.0625, or 1/16") from None
    if value <= 0:
        raise BadInput(f"--labeled {text!r}: must be positive")
    if value < 1:
        return value
    if value != int(value):
        raise BadInput(f"--labeled {text!r}: a count must be whole")
    return int(value)


def split_labeled(train: list[sources.Item], labeled: float | int, seed: int,
                  labeled_list: Optional[list[str]] = None, candidates: Optional[int] = None):
    """Pick the labeled items of train (by seed, or exactly the listed ids); the rest are unlabeled.
    `candidates` limits the draw to the first N items of train (VOC's fine set inside the Aug pool)."""
    if labeled_list is not None:
        by_key = {it.key: it for it in train}
        missing = [k for k in labeled_list if sources.sample_key(k) not in by_key]
        if missing:
            raise BadInput(f"--labeled-list: id {missing[0]!r} is not in the train set")
        chosen = {sources.sample_key(k) for k in labeled_list}
    else:
        pool = train[: candidates or len(train)]
        count = labeled if isinstance(labeled, int) else max(1, round(labeled * len(train)))
        if count > len(pool):
            raise BadInput(f"--labeled {count}: only {len(pool)} train images can be labeled")
        order = np.random.default_rng(seed).permutation(len(pool))
        chosen = {pool[i].key for i in order[:count]}
    return [it for it in train if it.key in chosen], [it for it in train if it.key not in chosen]


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it on the way to storage."""

    def __init__(self, target):
        self.target, self.sha, self.size = target, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.target.write(data)


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_split(fs, base: str, split: str, items: list[sources.Item], with_masks: bool,
                 per_shard: int, source_name: str, bar: tqdm, withhold_masks: bool = False) -> list[dict]:
    shards = []
    for index in range(math.ceil(len(items) / per_shard)):
        name = f"{split}-{index:06d}.tar"
        chunk = items[index * per_shard:(index + 1) * per_shard]
        offsets, crcs = [0], []
        with fs.open(join(base, name), "wb") as raw:
            hashing = _HashingWriter(raw)
            with wds.TarWriter(hashing, mtime=0) as tar:  # fixed mtime: byte-reproducible shards
                for item in chunk:
                    image, ext = item.load_image()
                    sample = {"__key__": item.key, ext: image}
                    if with_masks:
                        mask = item.load_mask()
                        sample[MASK] = _png(mask)
                        height, width = mask.shape
                    else:
                        if item.load_mask is not None:
                            mask = item.load_mask()  # unlabeled train images: still check their masks
                            if withhold_masks:  # never `mask.png`: training cannot mistake it for a label
                                sample[WITHHELD] = _png(mask)
                        width, height = Image.open(io.BytesIO(image)).size
                    sample["json"] = json.dumps({"id": item.key, "size": [height, width],
                                                 "source": source_name}).encode()
                    tar.write(sample)
                    offsets.append(tar.tarstream.offset)  # the archive's position: where the next sample starts
                    crcs.append(payload_crc32(sample))
                    bar.update(1)
        shards.append({"name": name, "samples": len(chunk), "sha256": hashing.sha.hexdigest(),
                       "offsets": offsets, "crc32": crcs})
    return shards


def build(source: sources.Source, out: str, labeled: float | int, *, seed: int = 0,
          labeled_list: Optional[list[str]] = None, samples_per_shard: int = 256,
          storage_options: Optional[dict] = None, overwrite: bool = False,
          args: Optional[dict] = None, progress: bool = True, withhold_masks: bool = False,
          shuffle: bool = False) -> dict:
    """Write the shard set; `withhold_masks` (studies) keeps each unlabeled image's true mask beside it as
    `withheld.png`, which training never learns from but uses to score its pseudo masks. `shuffle` writes the
    train splits in a seeded random order, so that neighbours in a shard (a run of `data.sample_run`) are
    not alike the way a source's own order makes them (Cityscapes by city, video frames)."""
    check_url(out)
    if samples_per_shard < 1:
        raise BadInput("--samples-per-shard: must be at least 1")
    fs, base = filesystem(out, storage_options)
    try:
        if fs.exists(join(base, MANIFEST)) and not overwrite:
            raise BadInput(f"{out}: already holds a shard set (pass --overwrite to replace it)")
        if fs.exists(join(base, MANIFEST)):
            fs.rm(join(base, MANIFEST))  # a half-rebuilt set must not look complete
        fs.makedirs(base, exist_ok=True)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(describe_error(out, e)) from None
    lab, unlab = split_labeled(source.train, labeled, seed, labeled_list, source.labeled_pool)
    unlab = unlab + source.extra
    if shuffle:
        rng = np.random.default_rng([seed, 1])
        lab, unlab = [[items[i] for i in rng.permutation(len(items))] for items in (lab, unlab)]
    plan = [("labeled", lab, True), ("unlabeled", unlab, False), ("val", source.val, True)]
    splits = {}
    with tqdm(total=sum(len(p[1]) for p in plan), desc=f"shards -> {out}", unit="img",
              disable=not progress, mininterval=1.0) as bar:
        for split, items, with_masks in plan:
            try:
                written = _write_split(fs, base, split, items, with_masks, samples_per_shard, source.name, bar,
                                       withhold_masks)
            except BadInput:
                raise
            except Exception as e:
                raise BadInput(describe_error(out, e)) from None
            splits[split] = {"samples": len(items), "shards": written}
    manifest = {
        "format": FORMAT, "version": VERSION, "source": source.name, "classes": source.classes,
        "ignore_index": IGNORE, "splits": splits, "seed": seed, "withheld_masks": withhold_masks,
        "shuffled": shuffle,
        "args": args or {}, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    with fs.open(join(base, MANIFEST), "w") as f:  # last: only a complete build has a manifest
        json.dump(manifest, f, indent=1)
    return manifest


def read_list(path: str) -> list[str]:
    if not os.path.exists(path):
        raise BadInput(f"--labeled-list {path}: not found")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]
