"""The few collective operations the trainer needs, each a no-op in a single process (no process group)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """A process group is up (Ray Train creates it before the loop starts; a single process has none)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returned for chaining."""
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor (the same shape on each), concatenated along the first dimension in rank order."""
    if not distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average_buffers(module: torch.nn.Module) -> None:
    """Average batch-norm running statistics across ranks, so every rank (and the checkpoint, which holds
    rank 0's copy) carries the same model. SyncBN keeps them equal on GPU; on CPU they drift apart."""
    if not distributed():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()
