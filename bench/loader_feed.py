"""Does a worker's loader keep its device fed? A Trainer of `--config` (the config's method and loader workers,
the DeepSpeed engine, one rank) trains on a generated set at the config's crop size, two ways in turns:

- fed: its batches from its shard streams, as a run reads them (`data.loader_workers` processes a stream);
- preloaded: the same Trainer stepping on batches already in memory (the loader's work taken away).

`data_wait_share`: the fed steps' time spent waiting for batches / their whole time (the Trainer's own
`data_wait`); `fed_vs_preloaded`: preloaded step time / fed step time (1.0: loading costs the device nothing).
Goal: a share under 0.05. Times are over whole stretches of `--steps` steps, the device synchronised only at
their ends (a GPU runs ahead of the host as in a run); medians of `--rounds`. Prints one JSON line.

    .venv/bin/python bench/loader_feed.py [--config configs/cpu-small.yaml] [--steps 20] [--rounds 3]

On a GPU, as a worker trains: `--config configs/voc-r101.yaml --images 192 --image-size 512`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import device_sync, free_port, publish, study_shards  # noqa: E402
from bench.step_cost import process_group  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer, WorkerContext  # noqa: E402


class _Preloaded:
    """A stream that gives the same batches over and over (a batch of each micro-step, loaded once)."""
    skipped = 0

    def __init__(self, batches: list):
        self.batches = itertools.cycle(batches)

    def __next__(self):
        return next(self.batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu-small.yaml"))
    parser.add_argument("--images", type=int, default=480, help="generated training images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps a stretch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    url = study_shards("synthetic", "1/4", train_images=args.images, val_images=8, size=args.image_size)
    cfg = load_config(args.config, [
        f"data.url={url}", f"out={tempfile.mkdtemp(prefix='gm-feed-')}", "data.node_cache=null",
        "model.pretrained=null", "train.engine=deepspeed", "train.workers=1", "train.steps=1000000",
        "train.log_every=1000000", "train.eval_every=1000000", "train.ckpt_every=1000000", *args.overrides])
    process_group(device, free_port())
    trainer = Trainer(cfg, WorkerContext(device=device))
    trainer.resume()
    sync = device_sync(device)
    fed = trainer.streams.streams
    preloaded = {split: _Preloaded([next(stream) for _ in range(trainer.micro_steps)]) for split, stream in fed.items()}

    def stretch(streams: dict) -> tuple[float, float]:
        trainer.streams.streams = streams
        sync()
        t0, waited = time.perf_counter(), 0.0
        for _ in range(args.steps):
            trainer.train_step()
            waited += trainer.data_wait
        sync()
        return time.perf_counter() - t0, waited

    stretch(fed)  # warm-up: the loaders' first shards, the device's kernels, the bank
    times = {"fed": [], "preloaded": []}
    waits = []
    for _ in range(args.rounds):
        seconds, waited = stretch(fed)
        times["fed"].append(seconds)
        waits.append(waited / seconds)
        times["preloaded"].append(stretch(preloaded)[0])
    trainer.streams.streams = fed
    fed_s, preloaded_s = (statistics.median(times[k]) / args.steps for k in ("fed", "preloaded"))
    images = sum(cfg.global_batch(s) for s in fed)
    publish({"data_wait_share": round(statistics.median(waits), 3), "fed_vs_preloaded": round(preloaded_s / fed_s, 3),
             "step_seconds": {"fed": round(fed_s, 4), "preloaded": round(preloaded_s, 4)},
             "images_per_s": {"fed": round(images / fed_s, 1), "preloaded": round(images / preloaded_s, 1)},
             "method": cfg.train.method, "loader_workers": cfg.data.loader_workers, "crop_size": cfg.data.crop_size,
             "images_per_step": images, "device": str(device),
             "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
             "precision": "bf16" if trainer.engine.bf16 else "fp32",
             "cpu_cores": os.cpu_count()})
    for stream in fed.values():
        stream.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
