"""The fetch stage of a loader worker: the bytes of the samples at positions of an epoch's order, behind one
interface (`fetch(epoch, positions, upcoming)` -> one `samples.Fetched` a position), two ways:

- `RangeFetch`: each sample by byte range (the manifest's offsets), one concurrent call a micro-batch, runs of
  neighbours as one range; the worker's next micro-batches fetched while it decodes.
- `ShardFetch`: whole shards (shard sets built before offsets were recorded), a shuffle block at a time and the
  next blocks ahead, each shard's hash checked once a worker.

Both read through a `ShardStore`: the store, retried, or the node's copy of a shard (shards/node_cache.py).
"""
from __future__ import annotations

import hashlib
import logging
import tarfile
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Optional

from .errors import BadInput, StorageFailure
from .manifest import ShardInfo
from .node_cache import NodeCache
from .samples import Fetched
from .storage import describe_error
from .tario import tar_samples

if TYPE_CHECKING:
    from .stream import _Plan

log = logging.getLogger("guidedmix.shards")


class ReadAhead:
    """What a loader worker will read (shards, or micro-batches' byte ranges), fetched in background threads
    ahead of its use and held until released: fetches run while the worker decodes."""

    def __init__(self, fetch: Callable[[Hashable], object], threads: int):
        self.fetch = fetch
        self.pool = ThreadPoolExecutor(max(1, min(threads, 4)), thread_name_prefix="read-ahead")
        self.held: OrderedDict[Hashable, Future] = OrderedDict()

    def want(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            if key not in self.held:
                self.held[key] = self.pool.submit(self.fetch, key)

    def get(self, key: Hashable):
        self.want([key])
        return self.held[key].result()

    def retain(self, keys: Iterable[Hashable]) -> None:
        keep = set(keys)
        for key in [k for k in self.held if k not in keep]:
            self.held.pop(key).cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.held.clear()


class ShardStore:
    """A loader worker's access to the split's shards: the store (retried; a missing shard is bad input), or
    with a node cache, the node's copy, which it has downloaded in the background ahead of use."""

    def __init__(self, plan: "_Plan", worker: int):
        spec = self.spec = plan.spec
        self.by_name = {info.name: info for info in plan.infos}
        self.node_cache = self._open_node_cache(worker) if spec.node_cache and spec.remote else None
        self.downloads = ThreadPoolExecutor(2, thread_name_prefix="node-cache") if self.node_cache else None
        self._downloading: set[str] = set()  # shards this worker asked the node cache for (failed ones stay)
        self._sizes: dict[str, int] = {}  # each shard's stored size, asked once

    def _open_node_cache(self, worker: int) -> Optional[NodeCache]:
        try:
            return NodeCache(self.spec.node_cache, self.spec.node_cache_bytes)
        except OSError as e:  # the folder is on each node: the driver could not check it
            if worker == 0:
                log.warning("data.node_cache %s: unusable on this node (%s); shards are read from the store",
                            self.spec.node_cache, e.strerror or e)
            return None

    def call(self, name: str, operation: Callable[[object, str], object]):
        """`operation(fs, path)` on a shard, retried; a missing shard is bad input, not a storage outage."""
        shard = self.spec.storage.at(name)
        try:
            return shard.call(operation)
        except FileNotFoundError:
            raise BadInput(f"{shard.url}: shard listed in the manifest is missing") from None
        except OSError as e:  # what with_retries does not retry: refused, a folder where a file should be
            raise StorageFailure(describe_error(shard.url, e)) from None

    def whole(self, name: str) -> tuple[bytes, bool]:
        """A shard's bytes, and whether they were checked already (the node's copy is, as it was cached)."""
        info = self.by_name[name]
        if self.node_cache is not None:
            local = self.node_cache.find(name, info.sha256) or self._fill(info)
            if local is not None:
                try:
                    with open(local, "rb") as f:
                        return f.read(), True
                except FileNotFoundError:  # removed from the cache meanwhile
                    pass
        return self.call(name, lambda fs, path: fs.cat_file(path)), False

    def _fill(self, info: ShardInfo) -> Optional[str]:
        """The shard downloaded into the node cache (see NodeCache.fill)."""
        return self.node_cache.fill(info.name, info.sha256,
                                    lambda part: self.call(info.name, lambda fs, path: fs.get_file(path, part)))

    def local_copy(self, name: str) -> Optional[str]:
        """The node's copy of a shard; None while it has none, and then this worker starts downloading it in
        the background (once: a download that failed is not tried again by this worker)."""
        if self.node_cache is None:
            return None
        info = self.by_name[name]
        local = self.node_cache.find(name, info.sha256)
        if local is None and name not in self._downloading:
            self._downloading.add(name)
            self.downloads.submit(self._cache_in_background, info)
        return local

    def _cache_in_background(self, info: ShardInfo) -> None:
        try:
            if self._fill(info) is None:
                self._downloading.discard(info.name)  # another process of the node has it: look again later
        except Exception as e:  # reads go on from the store; a failing store fails them there
            log.warning("shard %s: not cached on this node (%s)", info.name, str(e)[:200])

    def size(self, name: str) -> int:
        """A shard's size in storage: a sample whose range ends past it was cut off (not asked for)."""
        if name not in self._sizes:
            info = self.by_name[name]
            self._sizes[name] = self.call(name, lambda fs, path: fs.size(path))
            if self._sizes[name] < info.offsets[-1]:
                readable = sum(1 for end in info.offsets[1:] if end <= self._sizes[name])
                log.warning("shard %s: unreadable past sample %d of %d (the object is %d of %d bytes), the rest "
                            "skipped", name, readable, info.samples, self._sizes[name], info.offsets[-1])
        return self._sizes[name]

    def ranges(self, shards: list[ShardInfo], starts: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges of shards: from the node's copies where it has them, the rest from the store in one
        concurrent call."""
        pieces: list[Optional[bytes]] = [None] * len(shards)
        for name in dict.fromkeys(info.name for info in shards):  # each shard looked up and opened once
            local = self.local_copy(name)
            if local is None:
                continue
            try:
                with open(local, "rb") as f:
                    for i in (i for i, info in enumerate(shards) if info.name == name):
                        f.seek(starts[i])
                        pieces[i] = f.read(ends[i] - starts[i])
            except FileNotFoundError:  # removed from the cache between the look and the open
                pass
        far = [i for i, piece in enumerate(pieces) if piece is None]
        if far:
            names = list(dict.fromkeys(shards[i].name for i in far))  # a failure names every shard asked
            paths = {name: self.spec.storage.at(name).filesystem()[1] for name in names}  # once a shard
            fetched = self.call(names[0] if len(names) == 1 else "{" + ",".join(names) + "}",
                                lambda fs, _: fs.cat_ranges([paths[shards[i].name] for i in far],
                                                            [starts[i] for i in far], [ends[i] for i in far],
                                                            on_error="raise"))
            for i, piece in zip(far, fetched):
                pieces[i] = piece
        return pieces

    def close(self) -> None:
        if self.downloads is not None:
            self.downloads.shutdown(wait=False, cancel_futures=True)


class RangeFetch:
    """Samples by byte range: a micro-batch's positions and the worker's `upcoming` ones, each fetched once, in
    the background; with a node cache, the next block's shards downloaded before any worker reaches them."""

    def __init__(self, plan: "_Plan", store: ShardStore):
        self.plan, self.store = plan, store
        self.ahead = ReadAhead(self.ranges_of, plan.spec.readahead + 1)
        self._cached_ahead_of: tuple = (None, None)  # (epoch, block) whose next block's shards were asked for

    def __call__(self, epoch: int, positions: range, upcoming: Iterable[tuple[int, range]] = ()
                 ) -> list[tuple[ShardInfo, int, Fetched]]:
        keys = [(epoch, positions.start, positions.stop)] + [(e, p.start, p.stop) for e, p in upcoming]
        self.ahead.want(keys)
        self.ahead.retain(keys)
        return self.ahead.get(keys[0])

    def ranges_of(self, key: tuple[int, int, int]) -> list[tuple[ShardInfo, int, Fetched]]:
        """(shard, index, tar bytes or None: cut off) at positions [start, stop) of an epoch's order, fetched
        in one concurrent call of byte ranges, one a run of neighbours (`sample_run`)."""
        epoch, start, stop = key
        if self.store.node_cache is not None:
            self._cache_ahead(epoch, start)
        found: list[tuple[ShardInfo, int, Fetched]] = []
        runs: list[list[int]] = []  # slots of neighbours in the order and in their shard: one range
        for shard, index in self.plan.order(epoch)[start:stop]:
            info, index = self.plan.infos[shard], int(index)
            found.append((info, index, None))
            if info.offsets[index + 1] > self.store.size(info.name):
                continue
            last = found[runs[-1][-1]] if runs else None
            if last is not None and last[0] is info and last[1] + 1 == index:
                runs[-1].append(len(found) - 1)
            else:
                runs.append([len(found) - 1])
        if not runs:
            return found
        firsts = [found[run[0]] for run in runs]
        starts = [info.offsets[index] for info, index, _ in firsts]
        ends = [found[run[-1]][0].offsets[found[run[-1]][1] + 1] for run in runs]
        pieces = self.store.ranges([info for info, _, _ in firsts], starts, ends)
        for run, piece, first in zip(runs, pieces, starts):
            for slot in run:
                info, index, _ = found[slot]
                found[slot] = (info, index, piece[info.offsets[index] - first:info.offsets[index + 1] - first])
        return found

    def _cache_ahead(self, epoch: int, position: int) -> None:
        """Have the node download the shards of the block after the one `position` falls in."""
        blocks = self.plan.epoch_blocks(epoch)
        block = blocks.of(position)
        if self._cached_ahead_of != (epoch, block):
            self._cached_ahead_of = (epoch, block)
            for name in blocks.ahead(block, self.plan.spec.shuffle_block):
                self.store.local_copy(name)

    def close(self) -> None:
        self.ahead.close()


class ShardFetch:
    """Samples of whole shards: the shards of the blocks the positions fall in, and the next `readahead` ones,
    in the background; each shard's hash checked at its first read by this worker (later epochs trust it:
    hashing every read costs as much as reading a local disk)."""

    def __init__(self, plan: "_Plan", store: ShardStore):
        self.plan, self.store = plan, store
        self.ahead = ReadAhead(self.samples_of, plan.spec.readahead + 1)
        self.verified: set[str] = set()

    def __call__(self, epoch: int, positions: range, upcoming: Iterable[tuple[int, range]] = ()
                 ) -> list[tuple[ShardInfo, int, Fetched]]:
        blocks = self.plan.epoch_blocks(epoch)
        first, last = blocks.of(positions.start), blocks.of(positions.stop - 1)
        needed = [name for b in range(first, last + 1) for name in blocks.shards[b]]
        ahead = blocks.ahead(last, self.plan.spec.readahead)
        self.ahead.want(needed + ahead)
        self.ahead.retain(needed + ahead)
        found = []
        for shard, index in self.plan.order(epoch)[positions.start:positions.stop]:
            info = self.plan.infos[shard]
            samples = self.ahead.get(info.name)
            found.append((info, int(index), samples[index] if index < len(samples) else None))
        return found

    def samples_of(self, name: str) -> list[dict]:
        """A shard's samples in order; a truncated or unreadable tail is missing (its positions are skipped)."""
        data, checked = self.store.whole(name)
        if not (checked or name in self.verified):
            if hashlib.sha256(data).hexdigest() != self.store.by_name[name].sha256:
                log.warning("shard %s: checksum differs from the manifest; reading what is readable", name)
        self.verified.add(name)
        samples: list[dict] = []
        try:
            samples.extend(tar_samples(data, name))
        except (tarfile.TarError, ValueError, EOFError) as e:
            log.warning("shard %s: unreadable after key %s (%s)", name,
                        samples[-1].get("__key__") if samples else None, e)
        expected = self.store.by_name[name].samples
        if len(samples) < expected:
            log.warning("shard %s: unreadable past sample %d of %d (last good key %s), %d skipped", name,
                        len(samples), expected, samples[-1].get("__key__") if samples else None,
                        expected - len(samples))
        return samples

    def close(self) -> None:
        self.ahead.close()
