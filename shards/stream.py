"""manifest -> the epoch's order (shards/order.py) -> this rank's micro-batches of each global batch ->
fetch (ahead) -> verify -> decode -> augment -> collate, with equal batches on every rank and an exact
resume at any world size.

A loader worker fetches only the samples of its own micro-batches, by byte range (the manifest's per-sample
offsets; one concurrent `cat_ranges` call a micro-batch, the next ones while it decodes), so an epoch reads
each sample once over all ranks and loader workers. Shard sets built before offsets were recorded are read
whole, a shuffle block at a time, by every loader worker that needs them. With a node cache
(shards/node_cache.py), a remote shard is read whole once a node, in the background, and its samples by byte
range from local disk from then on. Each stage is its own small part: the turns below (positions), the fetch
(shards/fetch.py), the per-sample stages and the bad-sample handler (shards/samples.py); `_LoaderWorker`
composes them.

The order is a pure function of the manifest's shard sizes and (seed, epoch, shuffle block), not of the
ranks or loader workers that read it: global step g takes the next global batch of it, each rank its share,
in micro-batches. Loader workers take a rank's micro-batches in turn. The stream's state is the next global
step, the same number on every rank, so a checkpoint written by 4 ranks with 2 loader workers each resumes on
1 rank with none, or on 3, at the exact next sample.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import order
from .errors import BadInput
from .fetch import RangeFetch, ShardFetch, ShardStore
from .manifest import ShardInfo, read_manifest, shard_infos
from .samples import BadSample, BadSampleHandler, Unusable, collate, decode, skip_bad_sample, verify
from .storage import Storage, check_url, local_path


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
    def storage(self) -> Storage:
        return Storage(self.url, self.storage_options, self.retries)

    @property
    def remote(self) -> bool:
        return local_path(self.url) is None and not self.url.startswith("memory://")


def train_turns(plan: "_Plan", start_step: int, worker: int, workers: int) -> Iterator[tuple[int, int, int, range]]:
    """(global step, micro step, epoch, positions) of a loader worker's micro-batches: the m-th micro-batch from
    the start goes to worker m % workers, the order the DataLoader collects them in."""
    s, lay, per_epoch = plan.spec, plan.layout, plan.steps_per_epoch
    turn = 0
    for g in itertools.count(start_step):
        epoch, k = divmod(g, per_epoch)
        for j in range(lay.micro_steps):
            if turn % workers == worker:
                yield g, j, epoch, lay.positions(k, s.rank, j)
            turn += 1


def val_turns(plan: "_Plan", worker: int, workers: int) -> list[tuple[int, int, range]]:
    """(batch, 0, positions) of a loader worker's val batches: its rank's contiguous share, in batches."""
    s = plan.spec
    mine = order.val_positions(plan.total, s.world_size, s.rank)
    return [(b, 0, mine[b * s.batch_size:(b + 1) * s.batch_size])
            for b in range(plan.val_batches) if b % workers == worker]


def with_upcoming(turns: Iterable[tuple], count: int) -> Iterator[tuple[tuple, list[tuple[int, range]]]]:
    """Each turn with the (epoch, positions) of the `count` turns after it (what to fetch ahead)."""
    turns = iter(turns)
    window = deque(itertools.islice(turns, count + 1))
    while window:
        turn = window.popleft()
        yield turn, [(t[-2], t[-1]) for t in window]
        window.extend(itertools.islice(turns, 1))


class _LoaderWorker:
    """One loader worker of one rank, its stages composed: the positions of its turns -> fetch (shards/fetch.py)
    -> verify -> decode -> augment -> collate (shards/samples.py). A sample that fails a stage goes to the
    stream's bad-sample handler and is counted in the next batch's `skipped`."""

    def __init__(self, plan: "_Plan", worker: int, workers: int, start_step: int):
        self.plan, self.spec, self.worker, self.workers, self.start_step = plan, plan.spec, worker, workers, start_step
        self.store = ShardStore(plan, worker)
        ranged = self.spec.byte_ranges and all(info.ranged for info in plan.infos)
        self.fetch = (RangeFetch if ranged else ShardFetch)(plan, self.store)
        self.skipped = 0

    def _read(self, epoch: int, positions: range, upcoming: Iterable[tuple[int, range]] = ()) -> list[tuple]:
        """Decoded samples at these positions of the epoch's order; bad ones handled, left out and counted."""
        items = []
        for info, index, fetched in self.fetch(epoch, positions, upcoming):
            try:
                items.append(decode(verify(fetched, info, index), self.spec.split, self.plan.num_classes))
            except Unusable as e:
                self.plan.on_bad_sample(BadSample(info.name, e.sample, e.reason, e.reported))
                self.skipped += 1
        return items

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

    def _batch(self, items: list, size: int, epoch: int, tags: dict) -> dict:
        batch = {**collate(self.spec, items, size, epoch, tags), "worker": self.worker, "skipped": self.skipped}
        self.skipped = 0
        return batch

    def train_batches(self) -> Iterator[dict]:
        """Endless: micro-batch j of global step g, for the turns of this worker."""
        turns = train_turns(self.plan, self.start_step, self.worker, self.workers)
        for (g, j, epoch, positions), upcoming in with_upcoming(turns, self.spec.readahead):
            items = self._read(epoch, positions, upcoming)
            keys = [key for key, _, _ in items]
            yield self._batch(items or self._stand_in(epoch, positions.stop), len(positions), epoch,
                              {"step": g, "micro": j, "keys": keys})

    def val_batches(self) -> Iterator[dict]:
        """One pass: this rank's share in batches, padded to every rank's count with empty ones."""
        turns = val_turns(self.plan, self.worker, self.workers)
        for (b, _, part), upcoming in with_upcoming(turns, self.spec.readahead):
            items = self._read(0, part, [(e, p) for e, p in upcoming if len(p)]) if len(part) else []
            yield self._batch(items, self.spec.batch_size, 0, {"step": 0, "micro": b})

    def close(self) -> None:
        self.fetch.close()
        self.store.close()


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
        worker = _LoaderWorker(self.plan, info.id if info else 0, info.num_workers if info else 1, self.start_step)
        try:
            yield from (worker.train_batches() if self.plan.spec.train else worker.val_batches())
        finally:
            worker.close()


class _Plan:
    """What every loader worker of a stream knows: the split's shards and how its epochs and steps are cut.
    Holds no iteration state (forked loader workers take a copy: nothing here points back to the stream), and
    the handler of bad samples."""

    def __init__(self, spec: StreamSpec, manifest: dict, on_bad_sample: BadSampleHandler = skip_bad_sample):
        self.spec, self.on_bad_sample = spec, on_bad_sample
        self._blocks: tuple = (None, None)  # (epoch, its _Blocks): a memo, asked each micro-batch
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

    def epoch_blocks(self, epoch: int) -> _Blocks:
        memo = self._blocks  # read once: read-ahead threads may ask for another epoch meanwhile
        if memo[0] != epoch:
            memo = self._blocks = (epoch, self.blocks(epoch))
        return memo[1]


class ShardStream:
    """An endless (train) or one-pass (val) iterator of batches with `state_dict()`/`load_state_dict()`.

    Train batches are micro-batches: `layout.micro_steps` of them make this rank's share of one global step.
    Batches: {"image": Bx3xHxW float, "mask": BxHxW long (not for unlabeled), "keys", "epoch", "step",
    "micro", ...}; unlabeled batches of a shard set built with withheld masks also carry them as
    "withheld_mask". `skipped` accumulates the bad samples skipped so far; `on_bad_sample` decides what
    happens to each (shards/samples.py: the default logs and skips; a handler that raises stops the stream).
    """

    def __init__(self, spec: StreamSpec, manifest: Optional[dict] = None,
                 on_bad_sample: BadSampleHandler = skip_bad_sample):
        check_url(spec.url, spec.allow_pipe)
        if spec.split not in ("labeled", "unlabeled", "val"):
            raise BadInput(f"split {spec.split!r}: expected labeled, unlabeled or val")
        self.spec = spec
        self.manifest = manifest or read_manifest(spec.storage)
        self.plan = _Plan(spec, self.manifest, on_bad_sample)
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
