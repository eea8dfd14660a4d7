"""Helpers the benchmarks share: a cached synthetic shard set and cached single-process training runs."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

from shards import build, sources
from trainer.config import load_config
from trainer.loop import WorkerContext, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "data", "run-cache")


def study_shards(source: str = "synthetic", labeled: str = "1/16", train_images: int = 1200, val_images: int = 240,
                 size: int = 64, seed: int = 0) -> str:
    """Build (once) and return the URL of a generated study set under data/ (`synthetic`, `textures`,
    `textures-hard`), the unlabeled masks withheld (runs score their pseudo masks against them)."""
    name = f"{source}-{labeled.replace('/', '_')}-{train_images}-{size}-s{seed}-withheld"
    url = os.path.join(ROOT, "data", name)
    if not os.path.exists(os.path.join(url, "manifest.json")):
        data = sources.open_source(source, None, synthetic_train=train_images, synthetic_val=val_images,
                                   synthetic_size=size, seed=seed)
        build.build(data, url, build.parse_labeled(labeled), seed=seed, progress=False, withhold_masks=True)
    return url


def train_once(overrides: list[str], config: str = "configs/cpu-small.yaml", in_ray: bool = False) -> dict:
    """One single-process run of the training loop (plain engine, one thread); returns its summary. `in_ray`:
    this process is a Ray driver, and the run's pairing service an actor of that Ray."""
    torch.set_num_threads(1)
    logging.getLogger("guidedmix").setLevel(logging.WARNING)
    out = tempfile.mkdtemp(prefix="gm-bench-")
    cfg = load_config(os.path.join(ROOT, config), ["train.engine=plain", f"out={out}", *overrides])
    with contextlib.redirect_stderr(io.StringIO()):
        return train(cfg, WorkerContext(in_ray=in_ray))


def steady_rate(history: list[dict], per_step: float = 1.0) -> float:
    """Steps (times per_step) per second between the run's second and last log points: past warm-up and
    loader start, before the final evaluation."""
    logged = [h for h in history if "seconds" in h]
    first, last = logged[1], logged[-1]
    return (last["step"] - first["step"]) * per_step / (last["seconds"] - first["seconds"])


def code_digest() -> str:
    """A hash of everything a training result depends on besides the overrides: the code and config."""
    digest = hashlib.sha256()
    for package in ("shards", "trainer"):
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, package, name), "rb") as f:
                    digest.update(f.read())
    with open(os.path.join(ROOT, "configs", "cpu-small.yaml"), "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()


def _cached(overrides: tuple[str, ...]) -> dict:
    key = hashlib.sha256(json.dumps([code_digest(), sorted(overrides)]).encode()).hexdigest()[:16]
    path = os.path.join(CACHE, key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    summary = train_once(list(overrides))
    result = {"overrides": list(overrides), "miou": summary["miou"], "wall_seconds": summary["wall_seconds"],
              "per_class_iou": summary["per_class_iou"], "pseudo_masks": summary.get("pseudo_masks")}
    os.makedirs(CACHE, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return result


def run_many(runs: list[list[str]], parallel: int = 2, on_done=None) -> list[dict]:
    """Run (or fetch from the cache) each override list; `parallel` processes of one thread each."""
    results: list = [None] * len(runs)
    with ProcessPoolExecutor(parallel) as pool:
        futures = {pool.submit(_cached, tuple(r)): i for i, r in enumerate(runs)}
        for future in futures:
            i = futures[future]
            results[i] = future.result()
            if on_done:
                on_done(i, results[i])
    return results
