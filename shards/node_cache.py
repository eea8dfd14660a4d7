"""A node's copy of remote shards (Mosaic Streaming's local cache, the sample order untouched): each shard is
read whole once a node (one request), checked once against the manifest, and kept on local disk under a size
limit, where every rank and loader worker of the node reads its samples by byte range.

The node's processes share it through the file system alone: a download is claimed by creating its `.part`
file (a claim left by a dead process is taken over once it stops growing), published by an atomic rename,
and the least recently used shards are removed past the limit. A reader that finds a shard missing, claimed
or removed under it reads from the store as if there were no cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Callable, Optional

log = logging.getLogger("guidedmix.shards")
STALE_CLAIM_S = 60.0  # a `.part` file unchanged this long belongs to a process that died downloading it


class NodeCache:
    def __init__(self, root: str, limit_bytes: int):
        self.root, self.limit_bytes = root, limit_bytes
        os.makedirs(root, exist_ok=True)

    def path(self, name: str, sha256: str) -> str:
        """Named by content: a shard set rebuilt at the same URL never meets its old shards."""
        return os.path.join(self.root, f"{sha256[:32]}-{name.replace('/', '_')}")

    def find(self, name: str, sha256: str) -> Optional[str]:
        """The shard's local path if the node has it (marked as used now), else None."""
        path = self.path(name, sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def fill(self, name: str, sha256: str, download: Callable[[str], None]) -> Optional[str]:
        """`download(local_path)` the shard into the cache unless another process of the node is doing so;
        its path once published, None where another process holds the claim. The shard's checksum is computed
        here, once a node: a mismatch is a warning (each sample is still checked against its own checksum as
        it is read)."""
        path = self.path(name, sha256)
        part = path + ".part"
        if not self._claim(part):
            return None
        if os.path.exists(path):  # published by another process between our look and our claim
            _remove(part)
            return path
        try:
            download(part)  # its failures to read the store are the caller's (FileNotFoundError is not one)
            if _file_sha256(part) != sha256:
                log.warning("shard %s: checksum differs from the manifest; reading what is readable", name)
            os.replace(part, path)
        except FileNotFoundError:  # our claim was taken over as stale: the other download publishes
            return None
        except BaseException:
            _remove(part)
            raise
        self._evict(keep=path)
        return path

    def _claim(self, part: str) -> bool:
        for _ in range(2):
            try:
                os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                try:
                    if time.time() - os.stat(part).st_mtime < STALE_CLAIM_S:
                        return False
                except FileNotFoundError:
                    continue  # published or given up meanwhile: claim again
                _remove(part)
        return False

    def _evict(self, keep: str) -> None:
        """Least recently used shards out until the cache fits its limit (never the one just published). A
        process still reading a removed shard keeps its open file; one about to open it reads from the store."""
        entries = []
        with os.scandir(self.root) as it:
            for entry in it:
                if not entry.name.endswith(".part"):
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit_bytes:
                break
            if path != keep:
                _remove(path)
                total -= size


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
