"""What orchestration costs: the full Ray + DeepSpeed path with one worker (`guidedmix train --workers 1`,
a local Ray) against a plain single-process PyTorch loop running the same model, step and data.
Steady-state samples/s from the runs' own step timestamps (start-up, evaluation and the final checkpoint
excluded). Prints one JSON object as the last line.

    .venv/bin/python bench/overhead.py [--steps 200] [--method guidedmix]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import ROOT, publish, steady_rate, study_shards, train_once  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--method", default="guidedmix")
    args = parser.parse_args()
    url = study_shards("synthetic", "1/16")
    common = [f"data.url={url}", f"train.steps={args.steps}", f"train.method={args.method}", "train.log_every=20",
              f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}", "eval.max_batches=1"]
    images = 16 if args.method == "guidedmix" else 8
    out = tempfile.mkdtemp(prefix="gm-overhead-")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Ray Train gives its worker one thread; so does train_once
    cmd = [os.path.join(os.path.dirname(sys.executable), "guidedmix"), "train", "--config",
           os.path.join(ROOT, "configs", "cpu-small.yaml"), "--workers", "1", "--out", out,
           *[a for o in common for a in ("--set", o)]]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    with open(os.path.join(out, "history.json")) as f:
        ray_rate = steady_rate(json.load(f)["history"], images)
    plain = train_once(common)
    with open(os.path.join(plain["config"]["out"], "history.json")) as f:
        plain_rate = steady_rate(json.load(f)["history"], images)
    publish({"samples_per_s": {"ray_deepspeed_1_worker": round(ray_rate, 1), "plain_torch": round(plain_rate, 1)},
             "ratio": round(ray_rate / plain_rate, 3), "method": args.method, "steps": args.steps})


if __name__ == "__main__":
    main()
