"""What the pairing service costs: query latency and throughput through Ray (this process asks a service
actor in another process, on loopback) at three bank sizes, against in-batch pairing; and the training
step time with the service against in-batch pairing (same model, data and steps, one process training
with the service as a Ray actor beside it). Prints one JSON object as the last line.

    .venv/bin/python bench/pairing.py [--queries 400] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import steady_rate, study_shards, train_once  # noqa: E402
from trainer import guidedmix, pairing  # noqa: E402
from trainer.config import PairingConfig  # noqa: E402

WIDTH, SIZE, BATCH = 128, 64, 8  # the cpu-small model's embedding width, crop and batch


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def random_batch(n: int, g: torch.Generator):
    emb = F.normalize(torch.randn(n, WIDTH, generator=g), dim=1).numpy()
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8).numpy()
    masks = torch.randint(0, 7, (n, SIZE, SIZE), generator=g, dtype=torch.uint8).numpy()
    return emb, images, masks


def service_latency(ray, bank: int, queries: int) -> dict:
    cfg = PairingConfig(mode="service", bank_size=bank)
    actor = pairing.start_service(cfg, f"bench-{bank}")
    g = torch.Generator().manual_seed(0)
    for start in range(0, bank, 256):  # fill the bank
        ray.get(actor.push.remote(*random_batch(256, g), 0, 0))
    times = []
    for i in range(queries + 20):
        emb = random_batch(BATCH, g)[0]
        t0 = time.perf_counter()
        answer = ray.get(actor.query.remote(emb, 1))
        if i >= 20:  # past warm-up
            times.append(time.perf_counter() - t0)
    assert answer["images"].shape == (BATCH, 3, SIZE, SIZE)
    ray.kill(actor)
    return {"bank": bank, "batch": BATCH, **percentiles(times), "qps": round(len(times) / sum(times), 1)}


def in_batch_latency(queries: int) -> dict:
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(queries):
        emb_l, emb_u = (F.normalize(torch.randn(BATCH, WIDTH, generator=g), dim=1) for _ in range(2))
        x_l, y_l = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 7, (BATCH, SIZE, SIZE))
        t0 = time.perf_counter()
        index = guidedmix.pair(emb_u, emb_l)
        x_l[index], y_l[index]
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def step_seconds(steps: int, mode: str) -> tuple[float, dict]:
    """Steady-state seconds per step of a single-process run; with `service`, the run's loop finds a
    service actor by name, as a Ray Train worker does."""
    url = study_shards("synthetic", "1/16")
    out = tempfile.mkdtemp(prefix="gm-bench-pairing-")
    service = pairing.start_service(PairingConfig(mode="service"), out) if mode == "service" else None
    summary = train_once([f"data.url={url}", f"train.steps={steps}", "train.log_every=20",
                          f"train.eval_every={steps}", f"train.ckpt_every={steps}", "eval.max_batches=1",
                          f"guidedmix.pairing.mode={mode}", "train.overlays=0", f"out={out}"], in_ray=True)
    del service  # the last handle: the actor goes with it
    with open(os.path.join(out, "history.json")) as f:
        return 1 / steady_rate(json.load(f)["history"]), summary.get("pairing", {})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace=pairing.NAMESPACE, logging_level=logging.WARNING)
    try:
        results = [service_latency(ray, bank, args.queries) for bank in (1024, 8192, 32768)]
        # two runs of each, alternating, so that drift in the machine's speed hits both alike; the faster kept
        times, service_stats = {"service": [], "in_batch": []}, {}
        for _ in range(2):
            for mode in times:
                seconds, stats = step_seconds(args.steps, mode)
                times[mode].append(seconds)
                service_stats = stats or service_stats
        step = {"service_s": round(min(times["service"]), 4), "in_batch_s": round(min(times["in_batch"]), 4)}
        step["ratio"] = round(step["service_s"] / step["in_batch_s"], 3)
        step["service_fallbacks"] = service_stats["fallbacks"]
    finally:
        ray.shutdown()
    print(json.dumps({"results": results, "in_batch": in_batch_latency(args.queries), "step": step}))


if __name__ == "__main__":
    main()
