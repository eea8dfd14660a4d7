"""The same short run at 1, 2 and 4 workers (a local Ray, DeepSpeed CPU workers). Goals, asserted (exit 1 naming
the one missed): the same samples in the same global order, the same number of logged losses, loss curves
within `--max-loss-diff` (0.01) of the first world's, final mIoU within `--max-miou-diff` (0.5 points).

The global batch is fixed (16 labeled + 16 unlabeled) and the micro-batch is 4, so every world size computes
the same micro-batches (1 worker accumulates 4 of them, 2 workers 2 each, 4 workers 1 each) with the same
randomness (named by their place in the global batch); gradients are summed in another order, and batch norm's
running statistics are updated per worker and averaged at each evaluation and checkpoint. Prints one JSON line
last: {"miou": {"1": .., "2": .., "4": ..}, "max_loss_diff": .., "same_samples": true|false, "missed": [..]}
(mIoU in points).

    .venv/bin/python bench/world_size.py [--steps 60] [--worlds 1 2 4] [--max-loss-diff 0.01] [--max-miou-diff 0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ROOT, publish, study_shards  # noqa: E402

GLOBAL = 16


def global_order(out: str, world: int, split: str) -> list:
    """The run's consumed keys step by step, rank by rank: the global order however many ranks read it."""
    ledgers = [json.load(open(os.path.join(out, "ledger", f"rank-{r}.json")))[split] for r in range(world)]
    share = GLOBAL // world
    steps = len(ledgers[0]) // share
    return [key for g in range(steps) for ledger in ledgers for _, key in ledger[g * share:(g + 1) * share]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-loss-diff", type=float, default=0.01)
    parser.add_argument("--max-miou-diff", type=float, default=0.5, help="points")
    args = parser.parse_args()
    data = study_shards("synthetic", "1/16", train_images=480, val_images=96)
    runs = {}
    for world in args.worlds:
        out = tempfile.mkdtemp(prefix=f"gm-world-{world}-")
        sets = ["data.labeled_batch_size=4", "data.unlabeled_batch_size=4", f"data.global_batch.labeled={GLOBAL}",
                f"data.global_batch.unlabeled={GLOBAL}", "data.loader_workers=0", "train.ledger=true",
                "train.log_every=5", f"train.eval_every={10**6}", f"train.ckpt_every={10**6}", "train.overlays=0"]
        cmd = [os.path.join(os.path.dirname(sys.executable), "guidedmix"), "train", "--config",
               os.path.join(ROOT, "configs", "cpu-small.yaml"), "--data", data, "--out", out, "--workers", str(world),
               "--steps", str(args.steps), *[a for s in sets for a in ("--set", s)]]
        print(f"{world} worker(s): {out}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        summary = json.load(open(os.path.join(out, "summary.json")))
        history = json.load(open(os.path.join(out, "history.json")))["history"]
        runs[world] = {"miou": summary["miou"], "losses": [h["loss"] for h in history if "loss" in h],
                       "order": {s: global_order(out, world, s) for s in ("labeled", "unlabeled")}}
    first = runs[args.worlds[0]]
    miou = {str(w): round(100 * r["miou"], 2) for w, r in runs.items()}
    same_length = all(len(r["losses"]) == len(first["losses"]) for r in runs.values())
    loss_diff = max(abs(a - b) for r in runs.values() for a, b in zip(r["losses"], first["losses"]))
    same_samples = all(r["order"] == first["order"] for r in runs.values())
    missed = [goal for goal, met in [
        ("the same samples in the same global order", same_samples),
        ("as many logged losses at every world size", same_length),
        (f"loss curves within {args.max_loss_diff}", loss_diff <= args.max_loss_diff),
        (f"final mIoU within {args.max_miou_diff} points", max(miou.values()) - min(miou.values()) <= args.max_miou_diff),
    ] if not met]
    publish({"miou": miou, "max_loss_diff": loss_diff, "same_samples": same_samples, "missed": missed,
             "steps": args.steps, "global_batch": {"labeled": GLOBAL, "unlabeled": GLOBAL}, "micro_batch": 4})
    if missed:
        print(f"world_size: missed: {'; '.join(missed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
