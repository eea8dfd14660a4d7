"""GuidedMix against supervised-only on the synthetic set at 1/16 labels: same model, labeled stream,
steps and seeds. Prints one JSON object as the last line: both mIoUs per seed and the mean gain.

    .venv/bin/python bench/ssl_gain.py [--seeds 0 1] [--steps 1500] [--labeled 1/16] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import synthetic_shards, train_once  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--labeled", default="1/16")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra overrides for the GuidedMix runs only")
    args = parser.parse_args()
    url = synthetic_shards(args.labeled)
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for method in ("supervised", "guidedmix"):
            t0 = time.monotonic()
            extra = args.overrides if method == "guidedmix" else []
            summary = train_once([f"data.url={url}", f"out={tempfile.mkdtemp(prefix='ssl-gain-')}",
                                  f"train.method={method}", f"train.seed={seed}", f"train.steps={args.steps}",
                                  f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}", *extra])
            row[method] = round(100 * summary["miou"], 2)
            print(f"seed {seed} {method}: mIoU {row[method]:.2f} ({time.monotonic() - t0:.0f}s)", flush=True)
        row["gain"] = round(row["guidedmix"] - row["supervised"], 2)
        rows.append(row)
    gains = [r["gain"] for r in rows]
    sup = [r["supervised"] for r in rows]
    result = {"labeled": args.labeled, "steps": args.steps, "overrides": args.overrides, "runs": rows,
              "mean_gain": round(statistics.mean(gains), 2),
              "supervised_spread": round(max(sup) - min(sup), 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
