"""Helpers the benchmarks share: a cached synthetic shard set and quiet single-process training."""
from __future__ import annotations

import contextlib
import io
import logging
import os

from shards import build, sources
from trainer.config import load_config
from trainer.loop import WorkerContext, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_shards(labeled: str = "1/16", train_images: int = 1200, val_images: int = 240, size: int = 64,
                     seed: int = 0) -> str:
    """Build (once) and return the URL of a synthetic shard set under data/."""
    name = f"synthetic-{labeled.replace('/', '_')}-{train_images}-{size}-s{seed}"
    url = os.path.join(ROOT, "data", name)
    if not os.path.exists(os.path.join(url, "manifest.json")):
        source = sources.synthetic_source(train_images, val_images, size, seed)
        build.build(source, url, build.parse_labeled(labeled), seed=seed, progress=False)
    return url


def train_once(overrides: list[str], config: str = "configs/cpu-small.yaml") -> dict:
    """One single-process run of the loop (plain engine); returns its summary."""
    logging.getLogger("guidedmix").setLevel(logging.WARNING)
    cfg = load_config(os.path.join(ROOT, config), ["train.engine=plain", *overrides])
    with contextlib.redirect_stderr(io.StringIO()):
        return train(cfg, WorkerContext())
