"""manifest.json: what a shard set holds. Written last by the builder, read first by every reader."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

from .errors import BadInput, StorageFailure
from .storage import Storage, describe_error, join
from .tario import count_samples

MANIFEST = "manifest.json"
FORMAT = "guidedmix-shards/1"
MASK = "mask.png"  # a labeled or val sample's mask
WITHHELD = "withheld.png"  # an unlabeled image's true mask in a study's shard set, to score pseudo masks only
SPLITS = ("labeled", "unlabeled", "val")
IGNORE = 255  # a mask's pixels of no class: the format's `ignore_index`, the one every reader uses


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    sha256: str
    # where each sample's tar members start, and the shard's end (samples + 1 byte offsets), and each
    # sample's payload_crc32: a reader fetches only the samples it needs. Absent in shard sets built before.
    offsets: Optional[list[int]] = None
    crc32: Optional[list[int]] = None

    @property
    def ranged(self) -> bool:
        return self.offsets is not None


def shard_infos(manifest: dict, split: str) -> list[ShardInfo]:
    return [ShardInfo(**s) for s in manifest["splits"][split]["shards"]]


def _check_shard(info: ShardInfo, path: str) -> None:
    """Shard names are paths inside the shard set: nothing absolute, no scheme, no way up and out of it."""
    name = info.name
    if (not isinstance(name, str) or name.startswith("/") or "\\" in name or ":" in name
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise BadInput(f"{path}: shard name {name!r} is not a path inside the shard set")
    if not isinstance(info.samples, int) or isinstance(info.samples, bool) or info.samples < 0:
        raise BadInput(f"{path}: shard {name}: samples must be a count")
    if not isinstance(info.sha256, str):
        raise BadInput(f"{path}: shard {name}: sha256 must be a string")
    if info.ranged:
        offsets, crcs = info.offsets, info.crc32
        if (not isinstance(offsets, list) or len(offsets) != info.samples + 1 or not isinstance(crcs, list)
                or len(crcs) != info.samples or not all(isinstance(o, int) for o in offsets + crcs)
                or any(b <= a for a, b in zip(offsets, offsets[1:])) or (offsets and offsets[0] < 0)):
            raise BadInput(f"{path}: shard {name}: offsets must be samples + 1 increasing byte offsets, "
                           "crc32 one checksum a sample")


def read_manifest(storage: Storage) -> dict:
    """The manifest of the shard set at `storage`, checked."""
    path = join(storage.url, MANIFEST)
    try:
        text = storage.at(MANIFEST).read()
    except FileNotFoundError:
        raise BadInput(f"{path}: no manifest (not a shard set, or its build did not finish)") from None
    except (BadInput, StorageFailure):
        raise
    except Exception as e:
        raise BadInput(describe_error(path, e)) from None
    not_ours = BadInput(f"{path}: not a {FORMAT} manifest")
    try:
        manifest = json.loads(text)
        infos = [info for split in SPLITS for info in shard_infos(manifest, split)]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise not_ours from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("classes"), list) or not manifest["classes"]:
        raise not_ours
    if manifest.get("ignore_index", IGNORE) != IGNORE:
        raise BadInput(f"{path}: ignore_index {manifest['ignore_index']!r}: masks must mark pixels of no class {IGNORE}")
    for info in infos:
        _check_shard(info, path)
    return manifest


def summary(manifest: dict) -> dict:
    return {
        "source": manifest["source"],
        "classes": len(manifest["classes"]),
        "ignore_index": manifest["ignore_index"],
        "splits": {s: {"samples": manifest["splits"][s]["samples"], "shards": len(manifest["splits"][s]["shards"])}
                   for s in SPLITS},
    }


def verify(storage: Storage, manifest: dict) -> list[str]:
    """Read every shard; return one line per problem (missing, wrong checksum, wrong sample count)."""
    problems = []
    for split in SPLITS:
        for shard in shard_infos(manifest, split):
            path = join(storage.url, shard.name)
            try:
                data = storage.at(shard.name).read()
            except (OSError, StorageFailure) as e:
                problems.append(describe_error(path, e))
                continue
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                problems.append(f"{path}: sha256 mismatch")
            elif count_samples(data) != shard.samples:
                problems.append(f"{path}: sample count differs from the manifest")
    return problems
