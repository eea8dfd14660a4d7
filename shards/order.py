"""The sample order of an epoch, and who reads which part of it: pure functions of the manifest's shard sizes
and a few integers, so every rank, loader worker and later attempt computes the same thing without talking.

The order does not depend on how many ranks or loader workers read it (the idea of Mosaic Streaming's
canonical order): an epoch is the shards in a seeded permutation, cut into blocks of `block` shards, each
block's samples shuffled among themselves, alone or in runs of `run` neighbours of one shard (a run is one
read from a remote store). Global step g takes the next `global_batch` positions of it; the
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
    """How one global batch is split: `world` ranks, each taking a contiguous share in `micro_steps`
    micro-batches of at most `micro` (shares differ by one sample where the world does not divide the batch)."""

    global_batch: int
    world: int
    micro_steps: int

    @property
    def micro(self) -> int:
        return -(-(-(-self.global_batch // self.world)) // self.micro_steps)

    @property
    def even(self) -> bool:
        """Every rank's micro-batches the same as at any other world size that divides the batch this way."""
        return self.global_batch % (self.world * self.micro_steps) == 0

    def positions(self, step_in_epoch: int, rank: int, micro_step: int) -> range:
        """Positions in the epoch's order of one micro-batch."""
        first, last = rank * self.global_batch // self.world, (rank + 1) * self.global_batch // self.world
        share = last - first
        start = step_in_epoch * self.global_batch + first
        return range(start + micro_step * share // self.micro_steps,
                     start + (micro_step + 1) * share // self.micro_steps)


def layout(global_batch: int, world: int, micro_max: int, what: str) -> Layout:
    """Each rank takes global / world (rounded down or up where the world does not divide it), in the fewest
    micro-batches of at most `micro_max` that split it evenly where they can (gradient accumulation over them)."""
    if global_batch < world:
        raise BadInput(f"{what}: global batch {global_batch} is smaller than {world} workers")
    share = -(-global_batch // world)
    steps = -(-share // micro_max)
    if global_batch % world == 0:  # the same micro-batches as every other world size that divides the batch
        steps = next(n for n in range(steps, share + 1) if share % n == 0)
    return Layout(global_batch, world, steps)


def shard_blocks(count: int, seed: int, epoch: int, block: int, shuffle: bool) -> list[list[int]]:
    """The epoch's shards (indices) in blocks of `block`, in the seeded permutation (train) or as listed."""
    shards = np.random.default_rng([seed, epoch]).permutation(count) if shuffle else np.arange(count)
    return [[int(s) for s in shards[b:b + block]] for b in range(0, count, block)]


def epoch_order(sizes: tuple[int, ...], seed: int, epoch: int, block: int, shuffle: bool, run: int = 1) -> np.ndarray:
    """[(shard, index)] of every sample of the epoch, in order (int32, shape N x 2). Shuffled, a block's
    samples move in runs of `run` neighbours of one shard (cut at multiples of `run` in each shard); run 1
    places every sample on its own, the order the studies ran on."""
    return _epoch_order(tuple(sizes), seed, epoch, block, shuffle, run)


@lru_cache(maxsize=4)
def _epoch_order(sizes, seed, epoch, block, shuffle, run):
    parts = []
    for b, members in enumerate(shard_blocks(len(sizes), seed, epoch, block, shuffle)):
        pairs = np.concatenate([np.stack([np.full(sizes[s], s), np.arange(sizes[s])], 1) for s in members])
        if shuffle:
            firsts = np.cumsum([0] + [sizes[s] for s in members[:-1]])
            starts = np.concatenate([first + np.arange(0, sizes[s], run) for s, first in zip(members, firsts)])
            ends = np.append(starts[1:], len(pairs))
            runs = np.random.default_rng([seed, epoch, b]).permutation(len(starts))
            # each run's positions in turn (run 1: the permutation of the samples itself)
            lengths = (ends - starts)[runs]
            within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            pairs = pairs[np.repeat(starts[runs], lengths) + within]
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
