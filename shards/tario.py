"""Reading a shard (a tar held in memory) as webdataset's samples: what the stream decodes and what
`shards inspect --verify` counts."""
from __future__ import annotations

import io
from typing import Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator


def tar_samples(tar_bytes: bytes, name: str = "") -> Iterator[dict]:
    """The samples of one shard, grouped by key as webdataset does."""
    files = tar_file_iterator(io.BytesIO(tar_bytes))
    return group_by_keys({**f, "__url__": name} for f in files)


def count_samples(tar_bytes: bytes) -> int:
    return sum(1 for _ in tar_samples(tar_bytes))
