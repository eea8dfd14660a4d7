"""Cost of a GuidedMix step against a supervised step (same labeled batch; unlabeled batch equal to it).

Prints as its last line {"ratio": guidedmix step / supervised step, "parts": {...seconds...}}, medians over
repeated steps after warm-up, the two steps timed in turns. Three forward/backward passes make the floor about
3x.

    .venv/bin/python bench/step_cost.py [--batch 8] [--size 64] [--repeats 40] [--config configs/cpu-small.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import ROOT  # noqa: E402
from trainer import guidedmix  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine import build_optimizer  # noqa: E402
from trainer.model import build_model  # noqa: E402


def median_seconds(*fns, repeats: int, warmup: int = 3) -> list[float]:
    """Median time of each function, run in turns so that the machine's drift hits them all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
    return [statistics.median(spent) for spent in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu-small.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    classes = 7
    torch.manual_seed(0)
    model = build_model(cfg.model, classes, cfg.guidedmix.mitrans.reduction).train()
    optimizer = build_optimizer(model, cfg.optim)
    b, s = args.batch, args.size
    x_l, y_l, x_u = torch.randn(b, 3, s, s), torch.randint(0, classes, (b, s, s)), torch.randn(b, 3, s, s)
    gen = torch.Generator().manual_seed(0)

    def step(compute):
        def run():
            loss = compute().loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    supervised, mixed = median_seconds(
        step(lambda: guidedmix.supervised_loss(model, x_l, y_l)),
        step(lambda: guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 10**6, cfg.guidedmix, classes, None, None, gen)),
        repeats=args.repeats)
    # the GuidedMix-specific parts, each timed on tensors of the step's shapes
    with torch.no_grad():
        low, high = model.encode(torch.cat([x_l, x_u]))
        emb = model.embed(high)
        features = model.decode(low[:b], high[:b]).detach()
    lam = guidedmix.sample_lam(b, s, s, cfg.guidedmix.lam_max, cfg.guidedmix.mix, gen)
    p_m = torch.randn(b, classes, s, s).softmax(1)
    confidence, hard = p_m.max(1)
    ref = guidedmix.onehot(y_l, classes)
    feats = features.clone().requires_grad_()

    def mitrans():
        model.mitrans(feats).sum().backward()

    pairing, mixing, strong_aug, mitrans_time, mask_generation, class_balanced = median_seconds(
        lambda: guidedmix.pair(emb[b:], emb[:b]),
        lambda: guidedmix.mix(x_u, x_l, guidedmix.sample_lam(b, s, s, cfg.guidedmix.lam_max, cfg.guidedmix.mix, gen)),
        lambda: guidedmix.strong_augment(x_u, gen),
        mitrans,
        lambda: guidedmix.generate_mask(p_m, ref, lam),
        # once a step, of the clean view (and once more of the decoupled mask with unsup_loss)
        lambda: guidedmix.confident_pixels(confidence, hard, cfg.guidedmix.tau, cfg.guidedmix.class_keep),
        repeats=args.repeats)
    parts = {
        "pairing": pairing, "mixing": mixing, "strong_aug": strong_aug, "mitrans": mitrans_time,
        "mask_generation": mask_generation, "class_balanced": class_balanced,
        "supervised_step": supervised,
        "guidedmix_step": mixed,
    }
    print(json.dumps({"ratio": round(mixed / supervised, 3), "batch": b, "size": s,
                      "threads": torch.get_num_threads(), "parts": {k: round(v, 5) for k, v in parts.items()}}))


if __name__ == "__main__":
    main()
