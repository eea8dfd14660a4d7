"""The sample order of an epoch, and who reads which part of it: pure functions of the manifest's shard sizes
and a few integers, so every rank, loader worker and later attempt computes the same thing without talking.

The order does not depend on how many ranks or loader workers read it (the idea of Mosaic Streaming's
canonical order): an epoch is the shards in a seeded permutation, cut into blocks of `block` shards, each
block's samples shuffled among themselves. Global step g takes the next `global_batch` positions of it; the
ranks that exist now split that batch into equal contiguous shares, and each share into micro-batches. A
stream's position is therefore one number, the global step, and a run resumes at any world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import BadInput


@dataclass(frozen=True)
class Layout:
    """How one global batch is split: `world` ranks, each taking `micro_steps` micro-batches of `micro`."""

    global_batch: int
    world: int
    micro: int

    @property
    def share(self) -> int:
        return self.global_batch // self.world

    @property
    def micro_steps(self) -> int:
        return self.share // self.micro

    def positions(self, step_in_epoch: int, rank: int, micro_step: int) -> range:
        """Positions in the epoch's order of one micro-batch."""
        start = step_in_epoch * self.global_batch + rank * self.share + micro_step * self.micro
        return range(start, start + self.micro)


def layout(global_batch: int, world: int, micro_max: int, what: str) -> Layout:
    """Each rank takes global / world; micro-batches of at most `micro_max` that split it evenly (gradient
    accumulation over them). A global batch that the world does not divide is bad input naming both."""
    if global_batch % world:
        raise BadInput(f"{what}: global batch {global_batch} is not divisible by {world} workers")
    share = global_batch // world
    micro = next(m for m in range(min(micro_max, share), 0, -1) if share % m == 0)
    return Layout(global_batch, world, micro)


def shard_blocks(count: int, seed: int, epoch: int, block: int, shuffle: bool) -> list[list[int]]:
    """The epoch's shards (indices) in blocks of `block`, in the seeded permutation (train) or as listed."""
    shards = np.random.default_rng([seed, epoch]).permutation(count) if shuffle else np.arange(count)
    return [[int(s) for s in shards[b:b + block]] for b in range(0, count, block)]


def epoch_order(sizes: tuple[int, ...], seed: int, epoch: int, block: int, shuffle: bool) -> np.ndarray:
    """[(shard, index)] of every sample of the epoch, in order (int32, shape N x 2)."""
    return _epoch_order(tuple(sizes), seed, epoch, block, shuffle)


@lru_cache(maxsize=4)
def _epoch_order(sizes, seed, epoch, block, shuffle):
    parts = []
    for b, members in enumerate(shard_blocks(len(sizes), seed, epoch, block, shuffle)):
        pairs = np.concatenate([np.stack([np.full(sizes[s], s), np.arange(sizes[s])], 1) for s in members])
        if shuffle:
            pairs = pairs[np.random.default_rng([seed, epoch, b]).permutation(len(pairs))]
        parts.append(pairs)
    order = np.concatenate(parts).astype(np.int32)
    order.flags.writeable = False  # shared through the cache
    return order


def steps_per_epoch(total: int, global_batch: int) -> int:
    """Full global batches in an epoch; the rest of its samples wait for a later epoch (another few each time)."""
    return total // global_batch


def val_positions(total: int, world: int, rank: int) -> range:
    """Val: every sample exactly once, each rank a contiguous share."""
    per = -(-total // world)
    return range(min(total, rank * per), min(total, (rank + 1) * per))
