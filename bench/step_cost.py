"""Cost of a training step, two ways of doing the same work timed in turns in one run.

- `ratio`: a GuidedMix step / a supervised step (same labeled batch; unlabeled batch equal to it), through the
  plain engine, with the GuidedMix-specific parts each timed on tensors of the step's shapes. Three
  forward/backward passes make the floor about 3x.
- `deepspeed_vs_plain`: the plain engine's step time / the DeepSpeed engine's (ZeRO `train.zero_stage`, one
  rank), supervised and GuidedMix, in the same precision (goal: at least 0.9). In bf16 also
  `deepspeed_bf16_mode_vs_plain`: DeepSpeed's own `bf16` section (the whole model cast, fp32 master copies),
  the way the engine ran before, beside the same plain step.
- `ratio_default`: the default recipe as a run trains it / supervised: two CPU worker processes over gloo,
  each the Trainer of a run (DeepSpeed engine, the worker pairing bank with its `all_gather` at the step's
  end and its query each micro-batch), `train_step` timed without its data wait, the two methods in turns;
  with its parts (the bank's calls, per step; rank 0's). Goal: at most 3.4.
- `host_syncs_per_step`: the host reads (see HostReads) in one non-log `train_step` of each of those Trainers,
  its batches' loading aside, the boxes drawn as on a GPU (`host_reads_per_step`; goal: at most 4, whatever the
  batch; tests/test_host_reads.py holds it).
- `model_flops` and `mfu`: the FLOPs of one plain step of each method as torch.utils.flop_counter counts them
  (matrix products, convolutions and attention, forward and backward, two per multiply-add; element-wise work
  and the optimiser not counted), and the share of the device's peak they reach at the measured step time
  (`--peak-tflops`; known: the H100 and H200's dense bf16, 989.4).
- on a GPU, `channels_last_vs_plain`: the plain step with the model and inputs in channels-last memory format
  (the layout of tensor-core convolutions) / the plain step.

Medians over repeated steps after warm-up. images_per_s counts the images a step consumes (the labeled batch;
GuidedMix: labeled and unlabeled), what a GPU asks of its loaders. Prints one JSON line.

    .venv/bin/python bench/step_cost.py [--batch 8] [--size 64] [--repeats 40] [--config configs/cpu-small.yaml]
        [--device cpu|cuda] [--precision fp32|bf16] [--classes 7] [--default-workers 2 (0: skip)]

On a GPU, as a worker trains: `--config configs/voc-r101.yaml --batch 4 --size 512 --classes 21 --device cuda
--precision bf16`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import device_sync, free_port, publish, study_shards  # noqa: E402
from trainer import guidedmix, ssl  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine import build_engine  # noqa: E402
from trainer.model import build_model  # noqa: E402

PAIRING_CALLS = ("query", "push", "end_step")
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM; per device name
OPTIMISERS = os.path.join("torch", "optim", "")


class HostReads:
    """Counts the calls that read a value back to the host (on a GPU each one waits for the device to
    finish): the tensor methods and torch functions that do, and indexing by a boolean mask. Counted only
    inside the functions passed through `inside`, not nested, while the patches are in (`with`)."""
    METHODS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
               "unique", "bincount", "masked_select", "repeat_interleave")
    FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select", "repeat_interleave")

    def __init__(self):
        self.count, self.counting, self.depth, self.saved = 0, False, 0, []

    def _counted(self, fn, reads=lambda *args: True):
        def wrapper(*args, **kwargs):
            # torch's optimisers read their step counts, which live on the host even in a GPU run: no sync
            counts = (self.counting and self.depth == 0 and reads(*args)
                      and OPTIMISERS not in sys._getframe(1).f_code.co_filename)
            self.count += counts
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return wrapper

    def __enter__(self):
        def by_mask(tensor, index, *rest):
            return isinstance(index, torch.Tensor) and index.dtype == torch.bool
        patches = [(torch.Tensor, name, self._counted(getattr(torch.Tensor, name))) for name in self.METHODS]
        patches += [(torch, name, self._counted(getattr(torch, name))) for name in self.FUNCTIONS]
        patches += [(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), by_mask))
                    for name in ("__getitem__", "__setitem__")]
        for owner, name, patched in patches:
            self.saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, patched)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)

    def inside(self, fn):
        return self._while(fn, True)

    def outside(self, fn):
        return self._while(fn, False)

    def _while(self, fn, counting: bool):
        def call(*args, **kwargs):
            before, self.counting = self.counting, counting
            try:
                return fn(*args, **kwargs)
            finally:
                self.counting = before
        return call


class _LoadedUncounted:
    """A Trainer's stream whose batches load with the count paused: a loader's work is the host's anyway."""

    def __init__(self, stream, reads: HostReads):
        self.stream, self.reads = stream, reads

    def __next__(self):
        return self.reads.outside(next)(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def host_reads_per_step(trainer) -> int:
    """The host reads of one `train_step` of `trainer` (a non-log step: the Trainer reads nothing back unless it
    logs), the loading of its batches aside, with the mixing boxes drawn as a GPU run draws them: as tensors
    (`ssl.region_boxes`; on a CPU generator they are drawn one by one, reading host values, not a device's)."""
    streams, one_by_one = trainer.streams.streams, ssl.region_boxes_one_by_one
    with HostReads() as reads:
        trainer.streams.streams = {split: _LoadedUncounted(stream, reads) for split, stream in streams.items()}
        ssl.region_boxes_one_by_one = ssl.region_boxes
        try:
            reads.inside(trainer.train_step)()
        finally:
            trainer.streams.streams, ssl.region_boxes_one_by_one = streams, one_by_one
    return reads.count


def median_seconds(*fns, repeats: int, warmup: int = 3, sync=lambda: None) -> list[float]:
    """Median time of each function, run in turns so that the machine's drift hits them all alike; `sync`
    waits for the device's queued work (a GPU runs ahead of the host)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            spent.append(time.perf_counter() - t0)
    return [statistics.median(spent) for spent in times]


def with_engine(cfg, name: str):
    """`cfg` with `train.engine` set to `name` (plain or deepspeed)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"engine": name})})


def process_group(device: torch.device, port: int, rank: int = 0, world_size: int = 1) -> None:
    """The process group DeepSpeed's engine expects (Ray Train makes it in a run)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def default_recipe_worker(rank: int, world_size: int, port: int, config: str, url: str, overrides: list[str],
                          repeats: int, result: str) -> None:
    """One worker of the `ratio_default` measurement: a supervised and a default Trainer on the same data, their
    steps timed in turns; rank 0 writes the medians to `result`."""
    from trainer.loop import Trainer, WorkerContext

    torch.set_num_threads(1)  # a Ray Train worker's share on these machines
    process_group(torch.device("cpu"), port, rank, world_size)
    ctx, out = WorkerContext(rank=rank, world_size=world_size), os.path.dirname(result)
    trainers = {method: Trainer(load_config(config, [
        f"data.url={url}", f"out={out}/{method}", "train.engine=deepspeed", f"train.workers={world_size}",
        f"train.method={method}", "train.steps=100000", "data.loader_workers=0", *overrides]), ctx)
        for method in ("supervised", "guidedmix")}
    bank = trainers["guidedmix"].method.pairing
    spent = {call: 0.0 for call in PAIRING_CALLS}
    for call in PAIRING_CALLS:
        def timed(*args, _fn=getattr(bank, call), _call=call, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_call] += time.perf_counter() - t0
        setattr(bank, call, timed)

    def step(trainer):
        def run():
            t0 = time.perf_counter()
            trainer.train_step()
            return time.perf_counter() - t0 - trainer.data_wait
        return run

    runs = {method: step(trainer) for method, trainer in trainers.items()}
    for _ in range(3):  # warm-up: the bank answers from the first step's end on
        for run in runs.values():
            run()
    spent.update({call: 0.0 for call in PAIRING_CALLS})
    queries, answered = bank.queries, bank.answered
    times = {method: [] for method in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            times[method].append(run())
    syncs = {method: host_reads_per_step(trainer) for method, trainer in trainers.items()}
    if rank == 0:
        with open(result, "w") as f:
            json.dump({"host_syncs_per_step": syncs, "micro_steps": trainers["guidedmix"].micro_steps,
                       "steps": {m: statistics.median(t) for m, t in times.items()},
                       "bank_calls": {c: v / repeats for c, v in spent.items()},
                       "bank_answered": (bank.answered - answered) / max(bank.queries - queries, 1)}, f)
    torch.distributed.destroy_process_group()


def default_recipe_cost(config: str, overrides: list[str], workers: int, repeats: int) -> dict:
    url = study_shards("synthetic", "1/16")
    result = os.path.join(tempfile.mkdtemp(prefix="gm-step-cost-"), "default.json")
    torch.multiprocessing.spawn(default_recipe_worker, (workers, free_port(), config, url, overrides, repeats, result),
                                nprocs=workers)
    with open(result) as f:
        measured = json.load(f)
    steps = measured["steps"]
    return {"ratio_default": round(steps["guidedmix"] / steps["supervised"], 3),
            "host_syncs_per_step": {"supervised": measured["host_syncs_per_step"]["supervised"],
                                    "default": measured["host_syncs_per_step"]["guidedmix"],
                                    "micro_steps": measured["micro_steps"]},
            "default_parts": {"workers": workers, "supervised_step": round(steps["supervised"], 5),
                              "default_step": round(steps["guidedmix"], 5),
                              **{f"bank_{c}": round(v, 5) for c, v in measured["bank_calls"].items()},
                              "bank_answered_share": measured["bank_answered"]}}


def deepspeed_bf16_mode(model, cfg, device, micro_batch: int):
    """The DeepSpeed engine as it ran before autocast: its `bf16` section, the whole model cast to bf16."""
    import deepspeed

    from trainer.engine import build_optimizer, poly_schedule

    model = model.to(device, torch.bfloat16)
    optimizer = build_optimizer(model, cfg.optim)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=poly_schedule(optimizer, cfg.train.steps, cfg.optim.poly_power),
        config={"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": {"stage": cfg.train.zero_stage},
                "zero_allow_untested_optimizer": True, "bf16": {"enabled": True}, "steps_per_print": 10**9})

    def micro_step(loss):
        engine.backward(loss)
        engine.step()
    return engine.module, micro_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu-small.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--default-workers", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak in this precision, for `mfu`")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    device, bf16, classes = torch.device(args.device), args.precision == "bf16", args.classes
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, classes, cfg.guidedmix.mitrans.reduction).train()
    process_group(device, free_port())
    engines = {name: build_engine(copy.deepcopy(model), with_engine(cfg, name), device, bf16, args.batch, 1)
               for name in ("plain", "deepspeed")}
    b, s = args.batch, args.size
    x_l, x_u = torch.randn(b, 3, s, s, device=device), torch.randn(b, 3, s, s, device=device)
    y_l = torch.randint(0, classes, (b, s, s), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = device_sync(device)

    def steps(module, micro_step, autocast, x_l, x_u):
        def step(loss_of):
            def run():
                with autocast():
                    loss = loss_of().loss
                micro_step(loss)
            return run
        return (step(lambda: ssl.supervised_loss(module, x_l, y_l)),
                step(lambda: guidedmix.guidedmix_loss(module, x_l, y_l, x_u, 10**6, cfg.guidedmix, classes, None, None,
                                                      gen)))

    ways = {name: steps(e.module, e.micro_step, e.autocast, x_l, x_u) for name, e in engines.items()}
    if device.type == "cuda":
        channels_last = build_engine(copy.deepcopy(model).to(memory_format=torch.channels_last),
                                     with_engine(cfg, "plain"), device, bf16, args.batch, 1)
        ways["channels_last"] = steps(channels_last.module, channels_last.micro_step, channels_last.autocast,
                                      *(x.contiguous(memory_format=torch.channels_last) for x in (x_l, x_u)))
    flops = {}
    for method, run in zip(("supervised", "guidedmix"), ways["plain"]):
        with FlopCounterMode(display=False) as counter:
            run()
        flops[method] = counter.get_total_flops()
    if bf16:
        module, micro_step = deepspeed_bf16_mode(copy.deepcopy(model), cfg, device, b)
        ways["deepspeed_bf16_mode"] = steps(module, micro_step, contextlib.nullcontext,
                                            x_l.to(torch.bfloat16), x_u.to(torch.bfloat16))
    timed = median_seconds(*(fn for pair in ways.values() for fn in pair), repeats=args.repeats, sync=sync)
    step_times = {name: {"supervised": timed[2 * i], "guidedmix": timed[2 * i + 1]} for i, name in enumerate(ways)}
    plain = step_times["plain"]

    def vs_plain(name):
        return {k: round(plain[k] / step_times[name][k], 3) for k in plain}

    peak = args.peak_tflops or (bf16 and device.type == "cuda" and next(
        (tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in torch.cuda.get_device_name()), None))

    # the GuidedMix-specific parts, each timed on tensors of the step's shapes
    model = engines["plain"].module
    with torch.no_grad(), engines["plain"].autocast():
        low, high = model.encode(torch.cat([x_l, x_u]))
        emb = model.embed(high)
        features = model.decode(low[:b], high[:b]).detach()
    lam = ssl.sample_lam(b, s, s, cfg.guidedmix.lam_max, cfg.guidedmix.mix, gen, device)
    p_m = torch.randn(b, classes, s, s, device=device).softmax(1)
    confidence, hard = p_m.max(1)
    ref = guidedmix.onehot(y_l, classes)
    feats = features.clone().requires_grad_()

    def mitrans():
        with engines["plain"].autocast():
            out = model.mitrans(feats).sum()
        out.backward()

    pairing, mixing, strong_aug, mitrans_time, mask_generation, class_balanced = median_seconds(
        lambda: guidedmix.pair(emb[b:], emb[:b]),
        lambda: ssl.mix(x_u, x_l, ssl.sample_lam(b, s, s, cfg.guidedmix.lam_max, cfg.guidedmix.mix, gen,
                                                             device)),
        lambda: ssl.strong_augment(x_u, gen),
        mitrans,
        lambda: guidedmix.generate_mask(p_m, ref, lam),
        # once a step, of the clean view (and once more of the decoupled mask with unsup_loss)
        lambda: guidedmix.confident_pixels(confidence, hard, cfg.guidedmix.tau, cfg.guidedmix.class_keep),
        repeats=args.repeats, sync=sync)
    parts = {
        "pairing": pairing, "mixing": mixing, "strong_aug": strong_aug, "mitrans": mitrans_time,
        "mask_generation": mask_generation, "class_balanced": class_balanced,
        "supervised_step": plain["supervised"], "guidedmix_step": plain["guidedmix"],
    }
    torch.distributed.destroy_process_group()
    default = default_recipe_cost(args.config, [f"train.precision={args.precision}", *args.overrides],
                                  args.default_workers, args.repeats) \
        if args.default_workers else {}
    publish({"ratio": round(plain["guidedmix"] / plain["supervised"], 3), **default,
                      "deepspeed_vs_plain": vs_plain("deepspeed"),
                      **({"deepspeed_bf16_mode_vs_plain": vs_plain("deepspeed_bf16_mode")} if bf16 else {}),
                      **({"channels_last_vs_plain": vs_plain("channels_last")} if "channels_last" in ways else {}),
                      "model_flops": flops, "peak_tflops": peak or None,
                      "mfu": {k: round(flops[k] / plain[k] / (peak * 1e12), 3) for k in flops} if peak else None,
                      "batch": b, "size": s, "device": str(device),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                      "precision": args.precision, "zero_stage": cfg.train.zero_stage,
                      "threads": torch.get_num_threads(),
                      "images_per_s": {"supervised": round(b / plain["supervised"], 1),
                                       "guidedmix": round(2 * b / plain["guidedmix"], 1)},
                      "step_seconds": {name: {k: round(v, 5) for k, v in t.items()} for name, t in step_times.items()},
                      "parts": {k: round(v, 5) for k, v in parts.items()}})


if __name__ == "__main__":
    main()
