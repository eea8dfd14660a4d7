"""manifest -> shard list -> split by rank and loader worker -> deterministic shuffle -> decode ->
augment -> batches, with equal batch counts on every rank and an exact resume.

The plan of an epoch is a pure function of the manifest's shard sizes and (seed, epoch, world, workers):
every rank computes the same plan, so each knows how many batches every other rank will yield without
talking to it. Each loader worker tags its batches with (worker, epoch, index); the consumer keeps the
last tag per worker as the stream's state, and a restored stream restarts every worker right after it.
"""
from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import augment
from .errors import BadInput, StorageFailure
from .manifest import WITHHELD, ShardInfo, read_manifest, shard_infos
from .storage import check_url, describe_error, filesystem, join, with_retries
from .tario import tar_samples

log = logging.getLogger("guidedmix.shards")
IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """Plain values only: the data layer knows nothing of configs, models or Ray. Keywords only: adjacent
    floats and flags must not be swapped by a reordered call."""

    url: str
    split: str  # labeled | unlabeled | val
    batch_size: int
    retries: int  # of every shard read (the config's data.retries: one default, there)
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    loader_workers: int = 0
    crop_size: int = 64
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    photometric: bool = True
    shuffle_buffer: int = 256
    storage_options: dict = field(default_factory=dict)
    allow_pipe: bool = False
    readahead: int = 1  # shards each loader worker fetches ahead of the one it decodes

    @property
    def train(self) -> bool:
        return self.split != "val"


@dataclass(frozen=True)
class SlotPlan:
    """What one loader worker of one rank reads in one epoch."""

    shards: tuple[str, ...]
    stride: int  # keep every stride-th sample of the concatenated shards ...
    offset: int  # ... starting at this one (stride 1: whole shards)
    samples: int
    batches: int


def plan_epoch(infos: list[ShardInfo], seed: int, epoch: int, world: int, workers: int, batch: int,
               train: bool) -> list[list[SlotPlan]]:
    """[rank][worker] plans. Train: every rank gets the same number of full batches (the smallest rank's
    count; the rest of that epoch's samples are dropped, a different few each epoch). Val: every sample
    exactly once, ranks padded to the same batch count with empty batches."""
    slots = world * max(workers, 1)
    order = list(range(len(infos)))
    if train:
        order = list(np.random.default_rng([seed, epoch]).permutation(len(infos)))
    names = tuple(infos[i].name for i in order)
    sizes = [infos[i].samples for i in order]
    strided = _strided(names, sizes, slots)
    plans = strided
    if len(infos) >= slots:
        whole = _whole_shards(names, sizes, slots)
        # whole shards read each byte once; take them unless they would waste a quarter of the batches
        if not train or _train_batches(whole, world, batch) >= 0.75 * _train_batches(strided, world, batch):
            plans = whole
    per_rank = [plans[r * max(workers, 1):(r + 1) * max(workers, 1)] for r in range(world)]
    if train:
        caps = [[p.samples // batch for p in rank] for rank in per_rank]
        target = min(sum(c) for c in caps)
        counts = [_trim(c, target) for c in caps]
    else:
        counts = [[-(-p.samples // batch) for p in rank] for rank in per_rank]
        target = max(sum(c) for c in counts)
        for c in counts:
            c[0] += target - sum(c)  # padding batches go to worker 0
    return [[replace(p, batches=n) for p, n in zip(rank, c)] for rank, c in zip(per_rank, counts)]


def _whole_shards(names, sizes, slots) -> list[SlotPlan]:
    """Whole shards, each to the slot with the fewest samples so far (deterministic)."""
    owned: list[list[int]] = [[] for _ in range(slots)]
    load = [0] * slots
    for i in range(len(names)):
        slot = load.index(min(load))
        owned[slot].append(i)
        load[slot] += sizes[i]
    return [SlotPlan(tuple(names[i] for i in idx), 1, 0, load[s], 0) for s, idx in enumerate(owned)]


def _strided(names, sizes, slots) -> list[SlotPlan]:
    """Every slot reads all shards and keeps every slots-th sample: balanced to one sample."""
    total = sum(sizes)
    return [SlotPlan(names, slots, s, len(range(s, total, slots)), 0) for s in range(slots)]


def _train_batches(plans: list[SlotPlan], world: int, batch: int) -> int:
    per = len(plans) // world
    return min(sum(p.samples // batch for p in plans[r * per:(r + 1) * per]) for r in range(world))


def _trim(caps: list[int], target: int) -> list[int]:
    caps = list(caps)
    while sum(caps) > target:
        caps[caps.index(max(caps))] -= 1
    return caps


def read_ahead(names: Iterable[str], fetch: Callable[[str], bytes], depth: int) -> Iterator[tuple[str, bytes]]:
    """(name, fetch(name)) in order, with up to `depth` fetches running ahead in a thread while the consumer
    decodes: a remote store's latency is paid while the CPU works. At most depth + 1 shards are held."""
    if depth <= 0:
        yield from ((name, fetch(name)) for name in names)
        return
    names = iter(names)
    pool = ThreadPoolExecutor(1, thread_name_prefix="shard-read-ahead")
    try:
        pending = deque((name, pool.submit(fetch, name)) for name in islice(names, depth))
        while pending:
            name, future = pending.popleft()
            following = next(names, None)
            if following is not None:
                pending.append((following, pool.submit(fetch, following)))
            yield name, future.result()
    finally:  # also when the consumer stops early: fetches not started are dropped
        pool.shutdown(wait=False, cancel_futures=True)


class _Worker:
    """One loader worker's view: reads its slot's shards and yields tagged batches."""

    def __init__(self, spec: StreamSpec, infos: list[ShardInfo], num_classes: int, worker: int,
                 start: tuple[int, int]):
        self.spec, self.infos, self.num_classes, self.worker = spec, infos, num_classes, worker
        self.start_epoch, self.start_index = start
        self.by_name = {info.name: info for info in infos}
        self.skipped = 0
        self.verified: set[str] = set()

    def _shard_bytes(self, name: str) -> bytes:
        url = join(self.spec.url, name)
        try:
            fs, path = filesystem(url, self.spec.storage_options)
            return with_retries(lambda: fs.cat_file(path), url, self.spec.retries)
        except FileNotFoundError:
            raise BadInput(f"{url}: shard listed in the manifest is missing") from None
        except OSError as e:  # what with_retries does not retry: refused, a folder where a file should be
            raise StorageFailure(describe_error(url, e)) from None

    def _verify_once(self, name: str, data: bytes) -> None:
        """The checksum of a shard's first read by this worker in this run; later epochs trust it (hashing
        every read costs as much as reading a local disk)."""
        if name in self.verified:
            return
        self.verified.add(name)
        if hashlib.sha256(data).hexdigest() != self.by_name[name].sha256:
            log.warning("shard %s: checksum differs from the manifest; reading what is readable", name)

    def _raw(self, plan: SlotPlan) -> Iterator[tuple[str, dict]]:
        position = 0
        for name, data in read_ahead(plan.shards, self._shard_bytes, self.spec.readahead):
            self._verify_once(name, data)
            expected = self.by_name[name]
            read, last_key = 0, None
            try:
                for sample in tar_samples(data, name):
                    read, last_key = read + 1, sample.get("__key__")
                    if position % plan.stride == plan.offset:
                        yield name, sample
                    position += 1
            except (tarfile.TarError, ValueError, EOFError) as e:
                log.warning("shard %s: unreadable after key %s (%s)", name, last_key, e)
            if read < expected.samples:  # a truncated tar ends early without an error
                self.skipped += expected.samples - read
                log.warning("shard %s: unreadable past sample %d of %d (last good key %s), %d skipped",
                            name, read, expected.samples, last_key, expected.samples - read)
                position += expected.samples - read  # keep later shards' strided positions as planned

    def _shuffled(self, plan: SlotPlan, epoch: int) -> Iterator[tuple[str, dict]]:
        if not self.spec.train:
            yield from self._raw(plan)
            return
        rng = np.random.default_rng([self.spec.seed, epoch, self.spec.rank, self.worker, 1])
        buffer: list = []
        for item in self._raw(plan):
            buffer.append(item)
            if len(buffer) >= self.spec.shuffle_buffer:
                yield buffer.pop(rng.integers(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, shard: str, sample: dict):
        key = sample.get("__key__", "?")
        try:
            ext = next(e for e in IMAGE_EXTS if e in sample)
            image = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
            # unlabeled images have no mask; a study's shard set keeps their true one apart, to score pseudo masks
            mask_name = "mask.png" if self.spec.split != "unlabeled" else WITHHELD
            mask = None
            if mask_name in sample or self.spec.split != "unlabeled":
                mask = np.asarray(Image.open(io.BytesIO(sample[mask_name])))
                if mask.ndim != 2 or mask.shape != image.shape[:2]:
                    raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
                bad = mask[(mask >= self.num_classes) & (mask != augment.IGNORE)]
                if bad.size:
                    raise ValueError(f"class id {int(bad[0])} beyond the {self.num_classes} classes")
            return key, image, mask
        except Exception as e:
            self.skipped += 1
            log.warning("shard %s key %s: corrupt sample skipped (%s)", shard, key, str(e)[:120])
            return None

    def _samples(self, plan: SlotPlan, epoch: int) -> Iterator[tuple]:
        """Decoded samples of the slot; passes again over the slot if corrupt ones left it short."""
        while True:
            produced = 0
            for shard, sample in self._shuffled(plan, epoch):
                decoded = self._decode(shard, sample)
                if decoded is not None:
                    produced += 1
                    yield decoded
            if produced == 0 or not self.spec.train:
                return

    def _prepare(self, epoch: int, key: str, image, mask):
        spec = self.spec
        if spec.train:
            rng = np.random.default_rng([spec.seed, epoch, zlib.crc32(key.encode())])
            image, mask = augment.train_augment(image, mask, rng, spec.crop_size, spec.scale_min,
                                                spec.scale_max, spec.flip, spec.photometric)
        return augment.to_tensor(image), None if mask is None else augment.mask_tensor(mask)

    def _collate(self, items: list, epoch: int, index: int) -> dict:
        size = self.spec.batch_size
        if items:
            height = max(t.shape[1] for _, t, _ in items)
            width = max(t.shape[2] for _, t, _ in items)
        else:
            height = width = self.spec.crop_size
        images = torch.zeros(size, 3, height, width)
        masks = torch.full((size, height, width), augment.IGNORE, dtype=torch.long)
        for i, (_, image, mask) in enumerate(items):  # val: pad to the batch's largest image, ignored
            images[i, :, :image.shape[1], :image.shape[2]] = image
            if mask is not None:
                masks[i, :mask.shape[0], :mask.shape[1]] = mask
        batch = {"image": images, "keys": [k for k, _, _ in items], "worker": self.worker,
                 "epoch": epoch, "index": index, "skipped": self.skipped}
        if self.spec.split != "unlabeled":
            batch["mask"] = masks
        elif any(mask is not None for _, _, mask in items):
            batch["withheld_mask"] = masks  # never a training target: scores pseudo masks
        self.skipped = 0
        return batch

    def epochs(self, plans_of_epoch) -> Iterator[dict]:
        epoch = self.start_epoch
        while True:
            plan = plans_of_epoch(epoch)[self.spec.rank][self.worker]
            skip = self.start_index if epoch == self.start_epoch else 0
            samples = self._samples(plan, epoch)
            for index in range(plan.batches):
                items = []
                for _ in range(self.spec.batch_size):
                    item = next(samples, None)
                    if item is None:
                        break
                    items.append(item)
                if self.spec.train and len(items) < self.spec.batch_size:
                    raise BadInput(f"{self.spec.url}: split {self.spec.split} has no readable samples "
                                   f"for rank {self.spec.rank} worker {self.worker}")
                if index < skip:
                    continue  # resuming: these batches were consumed before the stop
                yield self._collate([(k, *self._prepare(epoch, k, im, m)) for k, im, m in items], epoch, index)
            if not self.spec.train:
                return
            epoch += 1


class _Dataset(IterableDataset):
    def __init__(self, stream: "ShardStream", starts: list[tuple[int, int]]):
        self.stream, self.starts = stream, starts

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        w = _Worker(self.stream.spec, self.stream.infos, self.stream.num_classes, worker, self.starts[worker])
        yield from w.epochs(self.stream.plan)


class ShardStream:
    """An endless (train) or one-pass (val) iterator of batches with `state_dict()`/`load_state_dict()`.

    Batches: {"image": Bx3xHxW float, "mask": BxHxW long (not for unlabeled), "keys", "epoch", ...};
    unlabeled batches of a shard set built with withheld masks also carry them as "withheld_mask".
    `skipped` accumulates the corrupt samples and shards skipped so far.
    """

    def __init__(self, spec: StreamSpec, manifest: Optional[dict] = None):
        check_url(spec.url, spec.allow_pipe)
        if spec.split not in ("labeled", "unlabeled", "val"):
            raise BadInput(f"split {spec.split!r}: expected labeled, unlabeled or val")
        self.spec = spec
        self.manifest = manifest or read_manifest(spec.url, spec.storage_options, spec.retries)
        self.infos = shard_infos(self.manifest, spec.split)
        self.num_classes = len(self.manifest["classes"])
        if not self.infos:
            raise BadInput(f"{spec.url}: split {spec.split} has no samples")
        self.workers = max(spec.loader_workers, 1)
        first = self.plan(0)
        if spec.train and sum(p.batches for p in first[spec.rank]) == 0:
            raise BadInput(f"{spec.url}: split {spec.split} has {self.manifest['splits'][spec.split]['samples']} "
                           f"samples, too few for {spec.world_size} ranks x {self.workers} loader workers "
                           f"x batch {spec.batch_size}")
        self.positions = [(0, -1)] * self.workers  # last (epoch, index) consumed from each worker
        self.skipped = 0
        self._iter: Optional[Iterator] = None

    def plan(self, epoch: int) -> list[list[SlotPlan]]:
        s = self.spec
        return plan_epoch(self.infos, s.seed, epoch, s.world_size, s.loader_workers, s.batch_size, s.train)

    def batches_per_epoch(self) -> int:
        return sum(p.batches for p in self.plan(0)[self.spec.rank])

    def state_dict(self) -> dict:
        return {"positions": [list(p) for p in self.positions], "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        positions = [tuple(p) for p in state["positions"]]
        if len(positions) != self.workers:
            raise BadInput(f"stream state has {len(positions)} loader workers, the config {self.workers}")
        self.positions, self.skipped, self._iter = positions, state.get("skipped", 0), None

    def _loader(self) -> Iterator[dict]:
        # Each worker restarts at the batch after its last consumed one (index -1: the epoch's first).
        starts = [(e, i + 1) for e, i in self.positions]
        dataset = _Dataset(self, starts)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.spec.loader_workers,
                               persistent_workers=False, prefetch_factor=2 if self.spec.loader_workers else None))

    def close(self) -> None:
        """Stop the loader workers now (else they stop when the stream is collected); iterating again starts
        them anew at the saved positions."""
        self._iter = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._loader()
        batch = next(self._iter)
        self.positions[batch["worker"]] = (batch["epoch"], batch["index"])
        self.skipped += batch["skipped"]
        return batch
