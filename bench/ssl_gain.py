"""GuidedMix (the config's defaults) against supervised-only on the synthetic set at 1/16 labels: same
model, labeled stream, steps and seeds. Prints one JSON object as the last line: both mIoUs per seed and the
mean gain.

    .venv/bin/python bench/ssl_gain.py [--seeds 0 1 2] [--steps 1500] [--labeled 1/16] [--set key=value ...]

Runs two trainings at a time (one thread each) as `guidedmix sweep` trials kept under data/sweeps/.
"""
from __future__ import annotations

import argparse
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import publish, run_many, study_shards  # noqa: E402


def compare(labeled: str, steps: int, seeds: list[int], overrides: list[str], parallel: int = 2) -> dict:
    url = study_shards("synthetic", labeled)
    base = [f"data.url={url}", f"train.steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}"]
    plan = [(seed, method) for seed in seeds for method in ("supervised", "guidedmix")]
    runs = [(method, seed, [*base, f"train.method={method}", *(overrides if method == "guidedmix" else [])])
            for seed, method in plan]
    results = run_many(runs, parallel)
    rows = []
    for k, seed in enumerate(seeds):
        sup, gm = 100 * results[2 * k]["miou"], 100 * results[2 * k + 1]["miou"]
        pseudo = results[2 * k + 1].get("pseudo_masks") or {}  # what GuidedMix taught its unlabeled pixels
        rows.append({"seed": seed, "supervised": round(sup, 2), "guidedmix": round(gm, 2), "gain": round(gm - sup, 2),
                     "pseudo_taught": pseudo.get("pseudo_coverage"), "pseudo_right": pseudo.get("pseudo_accuracy")})
    sup = [r["supervised"] for r in rows]
    gains = [r["gain"] for r in rows]
    return {"labeled": labeled, "steps": steps, "overrides": overrides, "runs": rows,
            "supervised_mean": round(statistics.mean(sup), 2),
            "guidedmix_mean": round(statistics.mean(r["guidedmix"] for r in rows), 2),
            "mean_gain": round(statistics.mean(gains), 2), "min_gain": round(min(gains), 2),
            "supervised_spread": round(max(sup) - min(sup), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--labeled", default="1/16")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra overrides for the GuidedMix runs only")
    args = parser.parse_args()
    publish(compare(args.labeled, args.steps, args.seeds, args.overrides, args.parallel))


if __name__ == "__main__":
    main()
