"""manifest -> the epoch's order (shards/order.py) -> this rank's micro-batches of each global batch ->
fetch (ahead) -> verify -> decode -> augment -> collate, with equal batches on every rank and an exact
resume at any world size.

A loader worker fetches only the samples of its own micro-batches, by byte range (the manifest's per-sample
offsets; one concurrent `cat_ranges` call a micro-batch, the next ones while it decodes), so an epoch reads
each sample once over all ranks and loader workers. Shard sets built before offsets were recorded are read
whole, a shuffle block at a time, by every loader worker that needs them. With a node cache
(shards/node_cache.py), a remote shard is read whole once a node, in the background, and its samples by byte
range from local disk from then on.

The order is a pure function of the manifest's shard sizes and (seed, epoch, shuffle block), not of the
ranks or loader workers that read it: global step g takes the next global batch of it, each rank its share,
in micro-batches. Loader workers take a rank's micro-batches in turn. The stream's state is the next global
step, the same number on every rank, so a checkpoint written by 4 ranks with 2 loader workers each resumes on
1 rank with none, or on 3, at the exact next sample.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import tarfile
import zlib
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import augment, order
from .errors import BadInput, StorageFailure
from .manifest import IGNORE, MASK, WITHHELD, ShardInfo, read_manifest, shard_infos
from .node_cache import NodeCache
from .storage import check_url, describe_error, filesystem, join, local_path, with_retries
from .tario import payload_crc32, tar_samples

log = logging.getLogger("guidedmix.shards")
IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """Plain values only: the data layer knows nothing of configs, models or Ray. Keywords only: adjacent
    floats and flags must not be swapped by a reordered call."""

    url: str
    split: str  # labeled | unlabeled | val
    batch_size: int  # train: the most one micro-batch holds; val: a batch
    retries: int  # of every shard read (the config's data.retries: one default, there)
    # train: samples per optimiser step over all ranks (None: batch_size x world_size); fixed across resizes
    global_batch: Optional[int] = None
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    loader_workers: int = 0
    crop_size: int = 64
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    photometric: bool = True
    shuffle_block: int = 4  # shards whose samples are shuffled together (memory: about twice that a worker)
    sample_run: int = 1  # train: samples shuffled in runs of this many neighbours of one shard (shards/order.py)
    storage_options: dict = field(default_factory=dict)
    allow_pipe: bool = False
    # what each loader worker fetches ahead of what it decodes: its next micro-batches (byte-range reads),
    # or shards (shard sets without offsets)
    readahead: int = 1
    byte_ranges: bool = True  # where the manifest has offsets; else whole shards
    # a folder on this node's disk for its copy of remote shards (None: none), and its size limit
    node_cache: Optional[str] = None
    node_cache_bytes: int = 0
    # batches in page-locked memory, from which a GPU copies without the host waiting (`non_blocking`)
    pin_memory: bool = False

    @property
    def train(self) -> bool:
        return self.split != "val"

    @property
    def remote(self) -> bool:
        return local_path(self.url) is None and not self.url.startswith("memory://")


class _ReadAhead:
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


class _Worker:
    """One loader worker of one rank: the micro-batches (train) or batches (val) that are its turn, read from
    the shards they need, fetched ahead."""

    def __init__(self, plan: "_Plan", worker: int, workers: int, start_step: int):
        self.spec, self.infos, self.num_classes = plan.spec, plan.infos, plan.num_classes
        self.plan, self.worker, self.workers, self.start_step = plan, worker, workers, start_step
        self.by_name = {info.name: info for info in self.infos}
        self.skipped = 0
        self.verified: set[str] = set()
        self.ranged = self.spec.byte_ranges and all(info.ranged for info in self.infos)
        self.cache = _ReadAhead(self._ranges_of if self.ranged else self._samples_of, self.spec.readahead + 1)
        self._blocks: tuple = (None, None)  # (epoch, its _Blocks)
        self._sizes: dict[str, int] = {}  # ranged reads: each shard's stored size, asked once
        self.node_cache = self._open_node_cache() if self.spec.node_cache and self.spec.remote else None
        self.downloads = ThreadPoolExecutor(2, thread_name_prefix="node-cache") if self.node_cache else None
        self._downloading: set[str] = set()  # shards this worker asked the node cache for (failed ones stay)
        self._cached_ahead_of: tuple = (None, None)  # (epoch, block) whose next block's shards were asked for

    def _open_node_cache(self) -> Optional[NodeCache]:
        try:
            return NodeCache(self.spec.node_cache, self.spec.node_cache_bytes)
        except OSError as e:  # the folder is on each node: the driver could not check it
            if self.worker == 0:
                log.warning("data.node_cache %s: unusable on this node (%s); shards are read from the store",
                            self.spec.node_cache, e.strerror or e)
            return None

    def _storage(self, name: str, operation: Callable[[object, str], object]):
        """`operation(fs, path)` on a shard, retried; a missing shard is bad input, not a storage outage."""
        url = join(self.spec.url, name)
        try:
            fs, path = filesystem(url, self.spec.storage_options)
            return with_retries(lambda: operation(fs, path), url, self.spec.retries)
        except FileNotFoundError:
            raise BadInput(f"{url}: shard listed in the manifest is missing") from None
        except OSError as e:  # what with_retries does not retry: refused, a folder where a file should be
            raise StorageFailure(describe_error(url, e)) from None

    def _shard_bytes(self, name: str) -> bytes:
        info = self.by_name[name]
        if self.node_cache is not None:
            local = self.node_cache.find(name, info.sha256) or self._fill(info)
            if local is not None:
                try:
                    with open(local, "rb") as f:
                        data = f.read()
                    self.verified.add(name)  # checked once a node, as it was cached
                    return data
                except FileNotFoundError:  # removed from the cache meanwhile
                    pass
        return self._storage(name, lambda fs, path: fs.cat_file(path))

    def _fill(self, info: ShardInfo) -> Optional[str]:
        """The shard downloaded into the node cache (see NodeCache.fill)."""
        return self.node_cache.fill(info.name, info.sha256,
                                    lambda part: self._storage(info.name, lambda fs, path: fs.get_file(path, part)))

    def _cached(self, info: ShardInfo) -> Optional[str]:
        """The node's copy of a shard; None while it has none, and then this worker starts downloading it in
        the background (once: a download that failed is not tried again by this worker)."""
        if self.node_cache is None:
            return None
        local = self.node_cache.find(info.name, info.sha256)
        if local is None and info.name not in self._downloading:
            self._downloading.add(info.name)
            self.downloads.submit(self._cache_in_background, info)
        return local

    def _cache_ahead(self, epoch: int, position: int) -> None:
        """Have the node download the shards of the block after the one `position` falls in, so that they are
        on disk before any of its workers reaches them."""
        blocks = self._epoch_blocks(epoch)
        block = blocks.of(position)
        if self._cached_ahead_of != (epoch, block):
            self._cached_ahead_of = (epoch, block)
            for name in blocks.ahead(block, self.spec.shuffle_block):
                self._cached(self.by_name[name])

    def _cache_in_background(self, info: ShardInfo) -> None:
        try:
            if self._fill(info) is None:
                self._downloading.discard(info.name)  # another process of the node has it: look again later
        except Exception as e:  # reads go on from the store; a failing store fails them there
            log.warning("shard %s: not cached on this node (%s)", info.name, str(e)[:200])

    def _stored_size(self, name: str) -> int:
        """A shard's size in storage: a sample whose range ends past it was cut off (not asked for)."""
        if name not in self._sizes:
            self._sizes[name] = self._storage(name, lambda fs, path: fs.size(path))
            if self._sizes[name] < self.by_name[name].offsets[-1]:
                readable = sum(1 for end in self.by_name[name].offsets[1:] if end <= self._sizes[name])
                log.warning("shard %s: unreadable past sample %d of %d (the object is %d of %d bytes), the rest "
                            "skipped", name, readable, self.by_name[name].samples, self._sizes[name],
                            self.by_name[name].offsets[-1])
        return self._sizes[name]

    def _ranges_of(self, key: tuple[int, int, int]) -> list[tuple[str, Optional[dict]]]:
        """(shard, sample or None) at positions [start, stop) of an epoch's order, fetched in one concurrent
        call of byte ranges, one a run of neighbours (`sample_run`); a sample cut off or whose checksum differs
        from the manifest's is None."""
        epoch, start, stop = key
        if self.node_cache is not None:
            self._cache_ahead(epoch, start)
        found: list[tuple[str, Optional[dict]]] = []
        wanted = []
        for shard, index in self.plan.order(epoch)[start:stop]:
            info = self.infos[shard]
            found.append((info.name, None))
            if info.offsets[index + 1] <= self._stored_size(info.name):
                wanted.append((len(found) - 1, info, int(index)))
        if not wanted:
            return found
        runs: list[list[tuple]] = []  # neighbours in the order and in their shard: one range
        for slot, info, index in wanted:
            if runs and runs[-1][-1][1] is info and runs[-1][-1][2] + 1 == index:
                runs[-1].append((slot, info, index))
            else:
                runs.append([(slot, info, index)])
        starts = [run[0][1].offsets[run[0][2]] for run in runs]
        ends = [run[-1][1].offsets[run[-1][2] + 1] for run in runs]
        pieces = self._fetch([run[0][1] for run in runs], starts, ends)
        for run, piece, first in zip(runs, pieces, starts):
            for slot, info, index in run:
                found[slot] = (info.name, self._sample_in(piece[info.offsets[index] - first:
                                                                info.offsets[index + 1] - first], info, index))
        return found

    def _fetch(self, shards: list[ShardInfo], starts: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges of shards: from the node's copies where it has them, the rest from the store in one
        concurrent call."""
        pieces: list[Optional[bytes]] = [None] * len(shards)
        for name in dict.fromkeys(info.name for info in shards):  # each shard looked up and opened once
            local = self._cached(self.by_name[name])
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
            paths = {name: filesystem(join(self.spec.url, name), self.spec.storage_options)[1]
                     for name in names}  # a URL resolved once a shard, not a sample
            fetched = self._storage(names[0] if len(names) == 1 else "{" + ",".join(names) + "}",
                                    lambda fs, _: fs.cat_ranges([paths[shards[i].name] for i in far],
                                                                [starts[i] for i in far], [ends[i] for i in far],
                                                                on_error="raise"))
            for i, piece in zip(far, fetched):
                pieces[i] = piece
        return pieces

    @staticmethod
    def _sample_in(piece: bytes, info: ShardInfo, index: int) -> Optional[dict]:
        """One sample's tar bytes read, checked against the manifest's checksum; None where they are not."""
        try:
            sample = next(iter(tar_samples(piece, info.name)))
        except (tarfile.TarError, ValueError, EOFError, StopIteration) as e:
            log.warning("shard %s sample %d: unreadable, skipped (%s)", info.name, index, e)
            return None
        if payload_crc32(sample) != info.crc32[index]:
            log.warning("shard %s key %s: checksum differs from the manifest, sample skipped", info.name,
                        sample.get("__key__"))
            return None
        return sample

    def _verify_once(self, name: str, data: bytes) -> None:
        """The checksum of a shard's first read by this worker in this run; later epochs trust it (hashing
        every read costs as much as reading a local disk)."""
        if name in self.verified:
            return
        self.verified.add(name)
        if hashlib.sha256(data).hexdigest() != self.by_name[name].sha256:
            log.warning("shard %s: checksum differs from the manifest; reading what is readable", name)

    def _samples_of(self, name: str) -> list[dict]:
        """A shard's samples in order; a truncated or unreadable tail is missing (its positions are skipped)."""
        data = self._shard_bytes(name)
        self._verify_once(name, data)
        samples: list[dict] = []
        try:
            samples.extend(tar_samples(data, name))
        except (tarfile.TarError, ValueError, EOFError) as e:
            log.warning("shard %s: unreadable after key %s (%s)", name,
                        samples[-1].get("__key__") if samples else None, e)
        expected = self.by_name[name].samples
        if len(samples) < expected:
            log.warning("shard %s: unreadable past sample %d of %d (last good key %s), %d skipped", name,
                        len(samples), expected, samples[-1].get("__key__") if samples else None,
                        expected - len(samples))
        return samples

    def _decode(self, shard: str, sample: dict):
        key = sample.get("__key__", "?")
        try:
            ext = next(e for e in IMAGE_EXTS if e in sample)
            image = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
            # unlabeled images have no mask; a study's shard set keeps their true one apart, to score pseudo masks
            mask_name = MASK if self.spec.split != "unlabeled" else WITHHELD
            mask = None
            if mask_name in sample or self.spec.split != "unlabeled":
                mask = np.asarray(Image.open(io.BytesIO(sample[mask_name])))
                if mask.ndim != 2 or mask.shape != image.shape[:2]:
                    raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
                bad = mask[(mask >= self.num_classes) & (mask != IGNORE)]
                if bad.size:
                    raise ValueError(f"class id {int(bad[0])} beyond the {self.num_classes} classes")
            return key, image, mask
        except Exception as e:
            log.warning("shard %s key %s: corrupt sample skipped (%s)", shard, key, str(e)[:120])
            return None

    def _read(self, epoch: int, positions: range, upcoming: Iterable[tuple[int, range]] = ()) -> list[tuple]:
        """Decoded samples at these positions of the epoch's order; unreadable ones left out and counted.
        Fetched ahead: the `upcoming` (epoch, positions) of this worker (byte ranges), or the shards of the
        blocks the positions fall in and the next ones (whole shards)."""
        if self.ranged:
            keys = [(epoch, positions.start, positions.stop)] + [(e, p.start, p.stop) for e, p in upcoming]
            self.cache.want(keys)
            self.cache.retain(keys)
            found = self.cache.get(keys[0])
        else:
            found = self._whole_shard_samples(epoch, positions)
        items = []
        for name, sample in found:
            decoded = None if sample is None else self._decode(name, sample)
            if decoded is None:
                self.skipped += 1
            else:
                items.append(decoded)
        return items

    def _epoch_blocks(self, epoch: int) -> "_Blocks":
        if self._blocks[0] != epoch:
            self._blocks = (epoch, self.plan.blocks(epoch))
        return self._blocks[1]

    def _whole_shard_samples(self, epoch: int, positions: range) -> list[tuple[str, Optional[dict]]]:
        blocks = self._epoch_blocks(epoch)
        first, last = blocks.of(positions.start), blocks.of(positions.stop - 1)
        needed = [name for b in range(first, last + 1) for name in blocks.shards[b]]
        ahead = blocks.ahead(last, self.spec.readahead)
        self.cache.want(needed + ahead)
        self.cache.retain(needed + ahead)
        found = []
        for shard, index in self.plan.order(epoch)[positions.start:positions.stop]:
            name = self.infos[shard].name
            samples = self.cache.get(name)
            found.append((name, samples[index] if index < len(samples) else None))  # None: past a cut-off end
        return found

    def _stand_in(self, epoch: int, after: int) -> list[tuple]:
        """A micro-batch of only unreadable samples takes the next readable one of the epoch's order (not
        counted as consumed: its own place in the order stays), so every rank still steps."""
        total = len(self.plan.order(epoch))
        for offset in range(total):
            position = (after + offset) % total
            found = self._read(epoch, range(position, position + 1))
            if found:
                return found
        raise BadInput(f"{self.spec.url}: split {self.spec.split} has no readable samples")

    def _prepare(self, epoch: int, key: str, image, mask):
        spec = self.spec
        if spec.train:
            rng = np.random.default_rng([spec.seed, epoch, zlib.crc32(key.encode())])
            image, mask = augment.train_augment(image, mask, rng, spec.crop_size, spec.scale_min,
                                                spec.scale_max, spec.flip, spec.photometric)
        return augment.to_tensor(image), None if mask is None else augment.mask_tensor(mask)

    def _collate(self, items: list, size: int, epoch: int, tags: dict) -> dict:
        """`tags` may name the batch's consumed keys (train: stand-ins are not); else the items' keys."""
        tags = {"keys": [k for k, _, _ in items], **tags}
        if self.spec.train and items:  # corrupt samples' places: the batch's readable ones again (equal sizes)
            items = [items[i % len(items)] for i in range(size)]
        prepared = [(k, *self._prepare(epoch, k, im, m)) for k, im, m in items]
        if prepared:
            height = max(t.shape[1] for _, t, _ in prepared)
            width = max(t.shape[2] for _, t, _ in prepared)
        else:
            height = width = self.spec.crop_size
        images = torch.zeros(size, 3, height, width)
        masks = torch.full((size, height, width), IGNORE, dtype=torch.long)
        for i, (_, image, mask) in enumerate(prepared):  # val: pad to the batch's largest image, ignored
            images[i, :, :image.shape[1], :image.shape[2]] = image
            if mask is not None:
                masks[i, :mask.shape[0], :mask.shape[1]] = mask
        batch = {"image": images, "worker": self.worker, "epoch": epoch, "skipped": self.skipped, **tags}
        if self.spec.split != "unlabeled":
            batch["mask"] = masks
        elif any(mask is not None for _, _, mask in prepared):
            batch["withheld_mask"] = masks  # never a training target: scores pseudo masks
        self.skipped = 0
        return batch

    def _turns(self) -> Iterator[tuple[int, int, int, range]]:
        """(global step, micro step, epoch, positions) of this worker's micro-batches: the m-th micro-batch
        from the start goes to worker m % workers, the order the DataLoader collects them in."""
        s, lay, per_epoch = self.spec, self.plan.layout, self.plan.steps_per_epoch
        turn = 0
        for g in itertools.count(self.start_step):
            epoch, k = divmod(g, per_epoch)
            for j in range(lay.micro_steps):
                if turn % self.workers == self.worker:
                    yield g, j, epoch, lay.positions(k, s.rank, j)
                turn += 1

    def _with_upcoming(self, turns: Iterable[tuple]) -> Iterator[tuple[tuple, list[tuple[int, range]]]]:
        """Each turn with the (epoch, positions) of the `readahead` turns after it."""
        turns = iter(turns)
        window = deque(itertools.islice(turns, self.spec.readahead + 1))
        while window:
            turn = window.popleft()
            yield turn, [(t[-2], t[-1]) for t in window]
            window.extend(itertools.islice(turns, 1))

    def train_batches(self) -> Iterator[dict]:
        """Endless: micro-batch j of global step g, for the turns of this worker."""
        for (g, j, epoch, positions), upcoming in self._with_upcoming(self._turns()):
            items = self._read(epoch, positions, upcoming)
            keys = [key for key, _, _ in items]
            yield self._collate(items or self._stand_in(epoch, positions.stop), len(positions), epoch,
                                {"step": g, "micro": j, "keys": keys})

    def val_batches(self) -> Iterator[dict]:
        """One pass: this rank's contiguous share in batches, padded to every rank's count with empty ones."""
        s = self.spec
        mine = order.val_positions(self.plan.total, s.world_size, s.rank)
        turns = [(b, 0, mine[b * s.batch_size:(b + 1) * s.batch_size])
                 for b in range(self.plan.val_batches) if b % self.workers == self.worker]
        for (b, _, part), upcoming in self._with_upcoming(turns):
            items = self._read(0, part, [(e, p) for e, p in upcoming if len(p)]) if len(part) else []
            yield self._collate(items, s.batch_size, 0, {"step": 0, "micro": b})

    def close(self) -> None:
        self.cache.close()
        if self.downloads is not None:
            self.downloads.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class _Blocks:
    """An epoch's blocks: the shards of each and the first position of each in the epoch's order."""

    shards: list[list[str]]
    starts: np.ndarray

    def of(self, position: int) -> int:
        return int(np.searchsorted(self.starts, position, side="right")) - 1

    def ahead(self, block: int, count: int) -> list[str]:
        following = [name for b in range(block + 1, len(self.shards)) for name in self.shards[b]]
        return following[:count]


class _Dataset(IterableDataset):
    def __init__(self, plan: "_Plan", start_step: int):
        self.plan, self.start_step = plan, start_step

    def __iter__(self):
        info = get_worker_info()
        worker = _Worker(self.plan, info.id if info else 0, info.num_workers if info else 1, self.start_step)
        try:
            yield from (worker.train_batches() if self.plan.spec.train else worker.val_batches())
        finally:
            worker.close()


class _Plan:
    """What every loader worker of a stream knows: the split's shards and how its epochs and steps are cut.
    Holds no iteration state (forked loader workers take a copy: nothing here points back to the stream)."""

    def __init__(self, spec: StreamSpec, manifest: dict):
        self.spec = spec
        self.infos: list[ShardInfo] = shard_infos(manifest, spec.split)
        self.num_classes = len(manifest["classes"])
        self.sizes = tuple(info.samples for info in self.infos)
        self.total = sum(self.sizes)
        if not self.total:
            raise BadInput(f"{spec.url}: split {spec.split} has no samples")
        if spec.train:
            global_batch = spec.global_batch or spec.batch_size * spec.world_size
            self.layout = order.layout(global_batch, spec.world_size, spec.batch_size, f"split {spec.split}")
            self.steps_per_epoch = order.steps_per_epoch(self.total, global_batch)
            if not self.steps_per_epoch:
                raise BadInput(f"{spec.url}: split {spec.split} has {self.total} samples, fewer than the global "
                               f"batch of {global_batch}")
        else:
            self.val_batches = -(-len(order.val_positions(self.total, spec.world_size, 0)) // spec.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        s = self.spec
        return order.epoch_order(self.sizes, s.seed, epoch if s.train else 0, s.shuffle_block, s.train, s.sample_run)

    def blocks(self, epoch: int) -> _Blocks:
        s = self.spec
        members = order.shard_blocks(len(self.infos), s.seed, epoch if s.train else 0, s.shuffle_block, s.train)
        starts = np.cumsum([0] + [sum(self.sizes[i] for i in m) for m in members[:-1]])
        return _Blocks([[self.infos[i].name for i in m] for m in members], starts)


class ShardStream:
    """An endless (train) or one-pass (val) iterator of batches with `state_dict()`/`load_state_dict()`.

    Train batches are micro-batches: `layout.micro_steps` of them make this rank's share of one global step.
    Batches: {"image": Bx3xHxW float, "mask": BxHxW long (not for unlabeled), "keys", "epoch", "step",
    "micro", ...}; unlabeled batches of a shard set built with withheld masks also carry them as
    "withheld_mask". `skipped` accumulates the corrupt samples and shards skipped so far.
    """

    def __init__(self, spec: StreamSpec, manifest: Optional[dict] = None):
        check_url(spec.url, spec.allow_pipe)
        if spec.split not in ("labeled", "unlabeled", "val"):
            raise BadInput(f"split {spec.split!r}: expected labeled, unlabeled or val")
        self.spec = spec
        self.manifest = manifest or read_manifest(spec.url, spec.storage_options, spec.retries)
        self.plan = _Plan(spec, self.manifest)
        self.infos = self.plan.infos
        self.layout = self.plan.layout if spec.train else None
        self.next_step = 0  # train: the first global step not yet wholly consumed
        self.skipped = 0
        self._iter: Optional[Iterator] = None

    def batches_per_epoch(self) -> int:
        """Train: this rank's micro-batches in an epoch; val: its batches."""
        if self.spec.train:
            return self.plan.steps_per_epoch * self.layout.micro_steps
        return self.plan.val_batches

    def state_dict(self) -> dict:
        return {"step": self.next_step, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if "step" not in state:
            raise BadInput("stream state: written by an older version of this program (no global step)")
        self.next_step, self.skipped, self._iter = int(state["step"]), state.get("skipped", 0), None

    def _loader(self) -> Iterator[dict]:
        workers = self.spec.loader_workers
        return iter(DataLoader(_Dataset(self.plan, self.next_step), batch_size=None, num_workers=workers,
                               pin_memory=self.spec.pin_memory, persistent_workers=False,
                               prefetch_factor=2 if workers else None))

    def close(self) -> None:
        """Stop the loader workers now (else they stop when the stream is collected); iterating again starts
        them anew at the saved position."""
        self._iter = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._loader()
        batch = next(self._iter)
        if self.spec.train and batch["micro"] == self.layout.micro_steps - 1:
            self.next_step = batch["step"] + 1
        self.skipped += batch["skipped"]
        return batch
