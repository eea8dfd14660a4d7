"""Reading a shard (a tar held in memory), or one sample's byte range of it, as webdataset's samples: what the
stream decodes and what `shards inspect --verify` counts."""
from __future__ import annotations

import io
import zlib
from typing import Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator


def tar_samples(tar_bytes: bytes, name: str = "") -> Iterator[dict]:
    """The samples of one shard, grouped by key as webdataset does."""
    files = tar_file_iterator(io.BytesIO(tar_bytes))
    return group_by_keys({**f, "__url__": name} for f in files)


def count_samples(tar_bytes: bytes) -> int:
    return sum(1 for _ in tar_samples(tar_bytes))


def payload_crc32(sample: dict) -> int:
    """A sample's checksum as the manifest records it: its fields' bytes in name order. The tar headers
    around them carry their own checksums, which tarfile checks as it parses."""
    crc = 0
    for name in sorted(k for k in sample if not k.startswith("__")):
        crc = zlib.crc32(sample[name], crc)
    return crc
