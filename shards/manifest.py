"""manifest.json: what a shard set holds. Written last by the builder, read first by every reader."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .errors import BadInput
from .storage import describe_error, filesystem, join, with_retries

MANIFEST = "manifest.json"
FORMAT = "guidedmix-shards/1"
SPLITS = ("labeled", "unlabeled", "val")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    sha256: str


def _shards_of(manifest: dict, split: str) -> list[ShardInfo]:
    return [ShardInfo(**s) for s in manifest["splits"][split]["shards"]]


def read_manifest(url: str, storage_options: dict | None = None, retries: int = 3) -> dict:
    path = join(url, MANIFEST)
    try:
        fs, p = filesystem(path, storage_options)
        text = with_retries(lambda: fs.cat_file(p), path, retries)
    except FileNotFoundError:
        raise BadInput(f"{path}: no manifest (not a shard set, or its build did not finish)") from None
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(describe_error(path, e)) from None
    try:
        manifest = json.loads(text)
        assert manifest.get("format") == FORMAT
        for split in SPLITS:
            _shards_of(manifest, split)
    except Exception:
        raise BadInput(f"{path}: not a {FORMAT} manifest") from None
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
