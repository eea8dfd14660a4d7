"""What a study run costs in a regime: seconds per training step, one thread, at each image size, for
supervised-only and the default method, from the runs' own step timestamps (start-up and evaluation
excluded), and what a run of 1,500 and 3,000 steps takes at that rate. The sizes run one after another in one
invocation, so the ratio between them holds on a noisy machine where the absolute seconds do not. Prints one
JSON object as the last line.

    OMP_NUM_THREADS=1 .venv/bin/python bench/regime_cost.py [--sizes 64 96] [--steps 200] [--set textures]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import publish, steady_rate, study_shards, train_once  # noqa: E402
from bench.pretrain_backbone import pretrained_backbone  # noqa: E402
from bench.ssl_suite import SETS  # noqa: E402

METHODS = ("supervised", "guidedmix")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--set", default="textures", choices=SETS)
    args = parser.parse_args()
    if min(args.sizes) < 8:
        parser.error(f"--sizes must be at least 8 px (got {min(args.sizes)})")
    if args.steps < 60:  # a steady rate needs log points past the first (every 20 steps)
        parser.error(f"--steps must be at least 60 (got {args.steps})")
    weights = pretrained_backbone()
    seconds = {}
    for size in args.sizes:
        url = study_shards(args.set, "1/16", size=size)
        for method in METHODS:
            summary = train_once([f"data.url={url}", f"data.crop_size={size}", f"train.method={method}",
                                  f"model.pretrained={weights}", f"train.steps={args.steps}", "train.log_every=20",
                                  f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}",
                                  "eval.max_batches=1"])
            with open(os.path.join(summary["config"]["out"], "history.json")) as f:
                seconds[f"{method} {size}px"] = round(1 / steady_rate(json.load(f)["history"]), 4)
            print(f"{method} at {size} px: {seconds[f'{method} {size}px']:.3f} s a step", file=sys.stderr,
                  flush=True)
    base = args.sizes[0]
    publish({"set": args.set, "steps_timed": args.steps, "seconds_per_step": seconds,
             "per_step_vs_smallest": {f"{m} {s}px": round(seconds[f"{m} {s}px"] / seconds[f"{m} {base}px"], 3)
                                      for m in METHODS for s in args.sizes[1:]},
             "run_minutes": {f"{m} {s}px {n} steps": round(seconds[f"{m} {s}px"] * n / 60, 1)
                             for m in METHODS for s in args.sizes for n in (1500, 3000)}})


if __name__ == "__main__":
    main()
