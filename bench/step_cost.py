"""Cost of a GuidedMix step against a supervised step (same labeled batch; unlabeled batch equal to it).

Prints as its last line {"ratio": guidedmix step / supervised step, "images_per_s": {...}, "parts":
{...seconds...}}, medians over repeated steps after warm-up, the two steps timed in turns. Three
forward/backward passes make the floor about 3x. images_per_s counts the images a step consumes (the labeled
batch; GuidedMix: labeled and unlabeled), what a GPU asks of its loaders.

    .venv/bin/python bench/step_cost.py [--batch 8] [--size 64] [--repeats 40] [--config configs/cpu-small.yaml]
        [--device cpu|cuda] [--precision fp32|bf16] [--engine plain|deepspeed] [--classes 7]

On a GPU, as a worker trains: `--config configs/voc-r101.yaml --batch 4 --size 512 --classes 21 --device cuda
--precision bf16 --engine deepspeed` (the whole model in bf16, as the DeepSpeed engine casts it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from trainer import guidedmix  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine import build_engine  # noqa: E402
from trainer.model import build_model  # noqa: E402


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


def single_process_group(device: torch.device) -> None:
    """The one-rank process group DeepSpeed's engine expects (Ray Train makes it in a run)."""
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29517")})
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu-small.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--engine", default="plain", choices=["plain", "deepspeed"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    device, bf16, classes = torch.device(args.device), args.precision == "bf16", args.classes
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = load_config(args.config, [*args.overrides, f"train.engine={args.engine}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, classes, cfg.guidedmix.mitrans.reduction).train()
    if args.engine == "deepspeed":
        single_process_group(device)
    # the plain engine keeps the model's dtype: cast here as DeepSpeed's engine casts it
    engine = build_engine(model.to(device, dtype), cfg, device, bf16, args.batch, 1)
    model = engine.module
    b, s = args.batch, args.size
    x_l, x_u = torch.randn(b, 3, s, s, device=device, dtype=dtype), torch.randn(b, 3, s, s, device=device, dtype=dtype)
    y_l = torch.randint(0, classes, (b, s, s), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def step(compute):
        return lambda: engine.micro_step(compute().loss)

    supervised, mixed = median_seconds(
        step(lambda: guidedmix.supervised_loss(model, x_l, y_l)),
        step(lambda: guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 10**6, cfg.guidedmix, classes, None, None, gen)),
        repeats=args.repeats, sync=sync)
    # the GuidedMix-specific parts, each timed on tensors of the step's shapes
    with torch.no_grad():
        low, high = model.encode(torch.cat([x_l, x_u]))
        emb = model.embed(high)
        features = model.decode(low[:b], high[:b]).detach()
    lam = guidedmix.sample_lam(b, s, s, cfg.guidedmix.lam_max, cfg.guidedmix.mix, gen, device)
    p_m = torch.randn(b, classes, s, s, device=device).softmax(1)
    confidence, hard = p_m.max(1)
    ref = guidedmix.onehot(y_l, classes)
    feats = features.clone().requires_grad_()

    def mitrans():
        model.mitrans(feats).sum().backward()

    pairing, mixing, strong_aug, mitrans_time, mask_generation, class_balanced = median_seconds(
        lambda: guidedmix.pair(emb[b:], emb[:b]),
        lambda: guidedmix.mix(x_u, x_l, guidedmix.sample_lam(b, s, s, cfg.guidedmix.lam_max, cfg.guidedmix.mix, gen,
                                                             device)),
        lambda: guidedmix.strong_augment(x_u, gen),
        mitrans,
        lambda: guidedmix.generate_mask(p_m, ref, lam),
        # once a step, of the clean view (and once more of the decoupled mask with unsup_loss)
        lambda: guidedmix.confident_pixels(confidence, hard, cfg.guidedmix.tau, cfg.guidedmix.class_keep),
        repeats=args.repeats, sync=sync)
    parts = {
        "pairing": pairing, "mixing": mixing, "strong_aug": strong_aug, "mitrans": mitrans_time,
        "mask_generation": mask_generation, "class_balanced": class_balanced,
        "supervised_step": supervised,
        "guidedmix_step": mixed,
    }
    print(json.dumps({"ratio": round(mixed / supervised, 3), "batch": b, "size": s, "device": str(device),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                      "precision": args.precision, "engine": args.engine, "threads": torch.get_num_threads(),
                      "images_per_s": {"supervised": round(b / supervised, 1), "guidedmix": round(2 * b / mixed, 1)},
                      "parts": {k: round(v, 5) for k, v in parts.items()}}))


if __name__ == "__main__":
    main()
