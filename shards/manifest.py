"""manifest.json: what a shard set holds. Written last by the builder, read first by every reader."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .errors import BadInput, StorageFailure
from .storage import describe_error, filesystem, join, with_retries

MANIFEST = "manifest.json"
FORMAT = "guidedmix-shards/1"
WITHHELD = "withheld.png"  # an unlabeled image's true mask in a study's shard set, to score pseudo masks only
SPLITS = ("labeled", "unlabeled", "val")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    sha256: str


def _shards_of(manifest: dict, split: str) -> list[ShardInfo]:
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


def read_manifest(url: str, storage_options: dict | None = None, retries: int = 3) -> dict:
    path = join(url, MANIFEST)
    try:
        fs, p = filesystem(path, storage_options)
        text = with_retries(lambda: fs.cat_file(p), path, retries)
    except FileNotFoundError:
        raise BadInput(f"{path}: no manifest (not a shard set, or its build did not finish)") from None
    except (BadInput, StorageFailure):
        raise
    except Exception as e:
        raise BadInput(describe_error(path, e)) from None
    try:
        manifest = json.loads(text)
        assert manifest.get("format") == FORMAT
        infos = [info for split in SPLITS for info in _shards_of(manifest, split)]
        assert isinstance(manifest["classes"], list) and manifest["classes"]
    except Exception:
        raise BadInput(f"{path}: not a {FORMAT} manifest") from None
    for info in infos:
        _check_shard(info, path)
    return manifest


def shards(manifest: dict, split: str) -> list[ShardInfo]:
    return _shards_of(manifest, split)


def summary(manifest: dict) -> dict:
    return {
        "source": manifest["source"],
        "classes": len(manifest["classes"]),
        "ignore_index": manifest["ignore_index"],
        "splits": {s: {"samples": manifest["splits"][s]["samples"], "shards": len(manifest["splits"][s]["shards"])}
                   for s in SPLITS},
    }


def verify(url: str, manifest: dict, storage_options: dict | None = None) -> list[str]:
    """Read every shard; return one line per problem (missing, wrong checksum, wrong sample count)."""
    from .stream import count_samples  # reading tars is the stream's job

    problems = []
    for split in SPLITS:
        for shard in shards(manifest, split):
            path = join(url, shard.name)
            try:
                fs, p = filesystem(path, storage_options)
                data = fs.cat_file(p)
            except Exception as e:
                problems.append(describe_error(path, e))
                continue
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                problems.append(f"{path}: sha256 mismatch")
            elif count_samples(data) != shard.samples:
                problems.append(f"{path}: sample count differs from the manifest")
    return problems
