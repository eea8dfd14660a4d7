"""What the pairing service costs: the latency and throughput of a worker's call a step through Ray (its
labeled batch and its query; this process asks a service actor in another process, on loopback) at three
bank sizes, against in-batch pairing; the same with 8, 32 and 64 simulated workers stepping at once (one call
per step each, waited on up to the deadline: latency, calls/s, fallback rate, and the late calls the service
dropped unworked); and the training step time with the service against in-batch pairing (same
model, data and steps, one process training with the service as a Ray actor beside it). `compute`: the
service's own work, in this process without Ray, per push and per query of each similarity at banks of 1,024
and 32,768, and the share of one core that work takes at 64 workers (what saturates an actor, apart from
Ray's per-call cost and the clients sharing this machine's cores). Prints one JSON object as the last line;
each entry of `results` carries `clients` (1: one client asking back to back).

    .venv/bin/python bench/pairing.py [--queries 400] [--steps 200] [--step-rate 2] [--seconds 20] [--compute-only]
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
from bench.common import publish, steady_rate, study_shards, train_once  # noqa: E402
from trainer import guidedmix, pairing  # noqa: E402
from trainer.config import PairingConfig  # noqa: E402

WIDTH, SIZE, BATCH, CLASSES = 128, 64, 8, 7  # the cpu-small model's embedding width, crop and batch


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def random_batch(n: int, g: torch.Generator):
    """A push's arguments before rank and step: embeddings, images, masks, class shares and overlap."""
    emb = F.normalize(torch.randn(n, WIDTH, generator=g), dim=1).numpy()
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8).numpy()
    masks = torch.randint(0, CLASSES, (n, SIZE, SIZE), generator=g, dtype=torch.uint8)
    shares = guidedmix.image_class_shares(masks.long(), CLASSES).numpy()
    overlap = torch.rand(2, CLASSES, generator=g).sort(0).values.numpy()  # intersection <= union
    return emb, images, masks.numpy(), shares, overlap


def push(actor, batch, rank: int, step: int):
    emb, images, masks, shares, overlap = batch
    return actor.push.remote(emb, images, masks, rank, step, shares, overlap)


def exchange(actor, batch, rank: int, step: int):
    """A worker's one call a step, as PairingClient makes it: its labeled batch for the bank and its query
    (the batch's own embeddings and shares stand in for the unlabeled images' and their predictions')."""
    emb, images, masks, shares, overlap = batch
    labeled = pairing.LabeledBatch(emb, images, masks, step, shares, overlap)
    return actor.exchange.remote(*pairing.exchange_args(emb, step, shares, rank, labeled))


def service_latency(ray, bank: int, queries: int) -> dict:
    cfg = PairingConfig(mode="service", bank_size=bank)
    actor = pairing.start_service(cfg, f"bench-{bank}")
    g = torch.Generator().manual_seed(0)
    for start in range(0, bank, 256):  # fill the bank
        ray.get(push(actor, random_batch(256, g), 0, 0))
    times, batches = [], [random_batch(BATCH, g) for _ in range(16)]
    for i in range(queries + 20):
        t0 = time.perf_counter()
        answer = pairing.read_answer(*ray.get(exchange(actor, batches[i % len(batches)], 0, i)))
        if i >= 20:  # past warm-up
            times.append(time.perf_counter() - t0)
    assert answer["images"].shape == (BATCH, 3, SIZE, SIZE)
    ray.kill(actor)
    return {"clients": 1, "bank": bank, "batch": BATCH, **percentiles(times), "qps": round(len(times) / sum(times), 1)}


def concurrent_clients(ray, clients: int, bank: int, similarity: str, steps_per_s: float, seconds: float,
                       deadline_s: float) -> dict:
    """`clients` simulated workers, each a coroutine of this process stepping at `steps_per_s`: one call a
    step with its labeled batch and query (waited on up to the deadline, as PairingClient does; a late one is
    a fallback), against one service whose bank is full."""
    import asyncio

    cfg = PairingConfig(mode="service", bank_size=bank, similarity=similarity)
    actor = pairing.start_service(cfg, f"bench-clients-{clients}-{bank}-{similarity}")
    g = torch.Generator().manual_seed(0)
    for start in range(0, bank, 256):
        ray.get(push(actor, random_batch(256, g), 0, 0))
    batches = [random_batch(BATCH, g) for _ in range(16)]  # what the clients send, drawn up front

    async def client(i: int, start: float, end: float) -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        times, late, step = [], 0, 0
        await asyncio.sleep((i / clients) / steps_per_s)  # workers do not step in lockstep
        while loop.time() < end:
            t0 = time.perf_counter()
            refs = exchange(actor, batches[(i + step) % len(batches)], i, step)
            try:
                await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(r.future()) for r in refs)), deadline_s)
                times.append(time.perf_counter() - t0)
            except asyncio.TimeoutError:
                late += 1
            step += 1
            await asyncio.sleep(max(0.0, start + (i / clients + step) / steps_per_s - loop.time()))
        return times, late

    async def run():
        loop = asyncio.get_running_loop()
        start = loop.time()
        return await asyncio.gather(*(client(i, start, start + seconds) for i in range(clients)))

    service_cpu, clients_cpu, t0 = ray.get(actor.stats.remote())["cpu_s"], time.process_time(), time.perf_counter()
    results = asyncio.run(run())
    elapsed, clients_cpu = time.perf_counter() - t0, time.process_time() - clients_cpu
    stats = ray.get(actor.stats.remote())
    ray.kill(actor)
    times = [t for r in results for t in r[0]]
    late = sum(r[1] for r in results)
    return {"clients": clients, "bank": bank, "batch": BATCH, "similarity": similarity,
            "steps_per_s_per_client": steps_per_s, **percentiles(times),
            "qps": round((len(times) + late) / elapsed, 1), "fallback_rate": round(late / max(len(times) + late, 1), 4),
            "service_dropped_late": stats["late_calls"],
            # of one core: the service's process (Ray's threads in it included) and this one's simulated workers
            "service_cpu_share": round((stats["cpu_s"] - service_cpu) / elapsed, 3),
            "clients_cpu_share": round(clients_cpu / elapsed, 3)}


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


def service_compute(similarity: str, bank: int, steps_per_s: float, calls: int = 100) -> dict:
    """Milliseconds per push and per query of the service object itself (no Ray), single-threaded."""
    from trainer.metrics import Metrics

    service = pairing.PairingService(PairingConfig(mode="service", similarity=similarity, bank_size=bank),
                                     Metrics("none"))
    g = torch.Generator().manual_seed(0)
    fill, batch = random_batch(256, g), random_batch(BATCH, g)
    for start in range(0, bank, 256):
        service.push(*fill[:3], 0, start, *fill[3:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an actor's work on one core, as `num_cpus` would give it; the rest keeps its threads
    try:
        t0 = time.perf_counter()
        for step in range(calls):
            service.push(*batch[:3], 0, step, *batch[3:])
        push_s = (time.perf_counter() - t0) / calls
        t0 = time.perf_counter()
        for step in range(calls):
            service.query(batch[0], step, batch[3])
        query_s = (time.perf_counter() - t0) / calls
    finally:
        torch.set_num_threads(threads)
    return {"similarity": similarity, "bank": bank, "batch": BATCH, "push_ms": round(push_s * 1e3, 3),
            "query_ms": round(query_s * 1e3, 3),
            "core_share_at_64_clients": round((push_s + query_s) * 64 * steps_per_s, 3)}


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
    parser.add_argument("--step-rate", type=float, default=2.0,
                        help="steps per second of each simulated worker (a GPU worker's GuidedMix step: ~0.5 s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each concurrent-clients run")
    parser.add_argument("--similarities", nargs="+", default=["random", "most", "complement", "need"],
                        help="pairing.similarity of the concurrent-clients runs")
    parser.add_argument("--compute-only", action="store_true", help="only the service's own work (`compute`)")
    args = parser.parse_args()
    compute = [service_compute(similarity, bank, args.step_rate)
               for similarity in args.similarities for bank in (1024, 32768)]
    if args.compute_only:
        publish({"compute": compute})
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace=pairing.NAMESPACE, logging_level=logging.WARNING)
    try:
        results = [service_latency(ray, bank, args.queries) for bank in (1024, 8192, 32768)]
        deadline = PairingConfig().deadline_s
        results += [concurrent_clients(ray, clients, bank, similarity, args.step_rate, args.seconds, deadline)
                    for similarity in args.similarities for clients in (8, 32, 64) for bank in (1024, 32768)]
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
    publish({"results": results, "in_batch": in_batch_latency(args.queries), "step": step, "compute": compute})


if __name__ == "__main__":
    main()
