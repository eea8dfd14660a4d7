"""What a checkpoint costs training: the asynchronous checkpoint (the step hands host copies over; writing,
upload and commit in the background) against a synchronous one (the same save, waited for), each taken once
in a stretch of training steps of DeepLabv3+ R50 (AdamW: weights and two moments, about 300 MB).

    stall_ratio = (a stretch with an asynchronous checkpoint - the stretch without) /
                  (a stretch with a synchronous checkpoint - the stretch without)

A stretch is twice as long as a synchronous checkpoint, and the wait for an asynchronous checkpoint that has
not committed by its end counts as lost; the stretches run in turns, `--rounds` times; medians. `host_copy`:
the time the step spends handing its state over, what the asynchronous checkpoint cannot avoid. Targets:
local disk, and S3 (moto_server on loopback behind bench/tcp_proxy.py at `--latency-ms`, its CPU seconds
reported), twice: `s3`, the store's processes free to run on any core, so its CPU time is taken from
the training node's two cores; `s3-apart`, the store's processes confined to the last core (training and its
writer thread are not pinned), the nearest this machine comes to a store on other machines, as on a cluster.
Goal: at most 0.1. Prints one JSON line.

    .venv/bin/python bench/checkpoint_stall.py [--backbone resnet50] [--rounds 3] [--latency-ms 20]
        [--device cpu|cuda] [--targets local,s3,s3-apart]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import device_sync, loopback_s3, publish  # noqa: E402
from shards.storage import Storage  # noqa: E402
from trainer import checkpoint, ssl  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine import build_engine  # noqa: E402
from trainer.model import build_model  # noqa: E402


def stretches(engine, store, rounds: int, batch: int, size: int, device, servers=()) -> dict:
    """`servers`: the processes of a loopback object store, whose CPU time is reported: on these 2 cores it is
    taken from training, which a remote store's is not."""
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 7, (batch, size, size), device=device)
    saves = iter(range(10**6))
    sync = device_sync(device)

    def step():
        engine.micro_step(ssl.supervised_loss(engine.module, x, y).loss)

    def server_cpu_seconds() -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in servers))

    def stretch(save: str, steps: int) -> float:
        cpu = server_cpu_seconds()
        t0 = time.perf_counter()
        for i in range(steps):
            step()
            if i == 0 and save != "none":
                handed = time.perf_counter()
                store.save(checkpoint.step_name(next(saves)), 0, 1,
                           lambda snapshot: engine.save(snapshot, {"step": i}))
                snapshot_seconds[save].append(time.perf_counter() - handed)
                if save == "sync":
                    store.wait()
        sync()
        store.wait()  # an asynchronous checkpoint not done by now holds training up from here
        store_cpu[save].append(server_cpu_seconds() - cpu)
        return time.perf_counter() - t0

    store_cpu, snapshot_seconds = {"none": [], "sync": [], "async": []}, {"sync": [], "async": []}
    # warm-up, and a stretch long enough for a checkpoint to finish in the background: twice a synchronous one
    one_step, one_checkpoint = stretch("none", 2) / 2, stretch("sync", 1)
    steps = max(4, math.ceil(2 * one_checkpoint / one_step))
    times = {"none": [], "sync": [], "async": []}
    store_cpu.update({k: [] for k in times})
    for _ in range(rounds):
        for save in times:
            times[save].append(stretch(save, steps))
    none, sync, async_ = (statistics.median(times[k]) for k in ("none", "sync", "async"))
    return {"stall_ratio": round((async_ - none) / (sync - none), 3), "steps": steps,
            "seconds": {"stretch": round(none, 2), "sync_checkpoint": round(sync - none, 2),
                        "async_checkpoint": round(async_ - none, 2),
                        "host_copy": round(statistics.median(snapshot_seconds["async"]), 3)},
            **({"store_cpu_seconds_per_checkpoint": round(statistics.median(store_cpu["async"]), 2)} if servers else {})}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", choices=["tiny", "resnet18", "resnet50", "resnet101"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--targets", default="local,s3,s3-apart", help="comma-separated: local, s3, s3-apart")
    args = parser.parse_args()
    device, targets = torch.device(args.device), args.targets.split(",")
    if not targets or set(targets) - {"local", "s3", "s3-apart"}:
        parser.error(f"--targets {args.targets}: a comma-separated list of local, s3 and s3-apart")
    torch.set_num_threads(1)  # one core trains, the other is the background writer's
    cfg = load_config(os.path.join(ROOT, "configs", "cpu-small.yaml"),
                      [f"model.backbone={args.backbone}", "train.engine=plain"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 7, cfg.guidedmix.mitrans.reduction).train()
    engine = build_engine(model, cfg, device, False, args.batch, 1)
    megabytes = 3 * sum(p.numel() * 4 for p in model.parameters()) / 2**20  # weights and AdamW's two moments
    result = {"backbone": args.backbone, "checkpoint_mb": round(megabytes), "device": str(device),
              "cpu_cores": os.cpu_count()}
    if "local" in targets:
        result["local"] = stretches(engine, checkpoint.CheckpointStore(Storage(tempfile.mkdtemp(prefix="gm-stall-"),
                                                                               retries=1)),
                                    args.rounds, args.batch, args.size, device)
    for target in [t for t in targets if t.startswith("s3")]:
        with loopback_s3(args.latency_ms) as (_, far_url, servers):
            store_processes = [psutil.Process(server.pid) for server in servers]
            if target == "s3-apart":
                store_core = {max(os.sched_getaffinity(0))}
                for thread in (t for process in store_processes for t in process.threads()):
                    os.sched_setaffinity(thread.id, store_core)  # threads started later inherit it
            os.environ["AWS_ENDPOINT_URL"] = far_url
            import fsspec

            fsspec.get_filesystem_class("s3").clear_instance_cache()  # the last target's pointed at its own server
            fsspec.filesystem("s3").mkdir("stall")
            result[target] = stretches(engine, checkpoint.CheckpointStore(Storage("s3://stall/run", retries=1)),
                                       args.rounds, args.batch, args.size, device, store_processes)
            result[target]["latency_ms"] = args.latency_ms
    publish(result)


if __name__ == "__main__":
    main()
