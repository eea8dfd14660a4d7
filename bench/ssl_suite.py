"""The study suite: sets x methods x labeled fractions x seeds, every method against supervised-only on the
same set, fraction and seed. The sets are generated study sets of different regimes (docs/study-sets.md):
`synthetic` (drawn shapes), `textures` (real pixels: scikit-image's textures and photographs),
`textures-hard` (a weak teacher: ten grey textures, jittered, small objects). Methods are
bench/ssl_ablation.py's variants. Runs are `guidedmix sweep` trials kept under data/sweeps/ by code and config, so the suite
grows across sessions without rerunning what is known. Writes a Markdown table (with this command) and prints
the results as JSON on the last line.

    .venv/bin/python bench/ssl_suite.py [--sets synthetic textures textures-hard] [--labeled 1/16 1/4]
        [--seeds 0 1 2] [--methods default ...] [--steps 1500] [--size 64] [--labeled-batch N] [--pretrained[=ARGS]]
        [--table docs/results-suite.md]

`--labeled-batch N` sets `data.labeled_batch_size` of every run, supervised-only's included: 2 is what a GPU
worker holds in the published recipes, so in-batch pairing has as few partners as there. `--pretrained`
starts every run's backbone from bench/pretrain_backbone.py's weights (made first if not cached), as the field
starts from ImageNet's, instead of from random weights; `--pretrained="--task segment"` from the weights those
arguments make. `--size N`: the sets generated at N px and trained on
whole (`data.crop_size`); bench/regime_cost.py says what a larger size costs a step.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import ROOT, publish, run_many, study_shards  # noqa: E402
from bench.pretrain_backbone import pretrained_backbone  # noqa: E402
from bench.ssl_ablation import VARIANTS  # noqa: E402

SETS = ("synthetic", "textures", "textures-hard")


def pseudo_scores(taught: list[dict]) -> dict:
    """A method's pseudo masks over its seeds (the summaries' `pseudo_masks`), means."""
    if not taught:
        return {}
    return {name: round(statistics.mean(value(t) for t in taught), 4) for name, value in (
        ("taught", lambda t: t["pseudo_coverage"]), ("right", lambda t: t["pseudo_accuracy"]),
        ("taught_background", lambda t: t["pseudo_class_freq"][0]),
        ("true_background", lambda t: t["true_class_freq"][0]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--labeled", nargs="+", default=["1/16", "1/4"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64, help="image side of the generated sets, and the crop")
    parser.add_argument("--labeled-batch", type=int, default=None, help="data.labeled_batch_size of every run")
    parser.add_argument("--pretrained", nargs="?", const="", default=None, metavar="ARGS",
                        help="backbone from bench/pretrain_backbone.py's weights, made with these arguments "
                             "(quoted, after '='; none: its defaults)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--table", default=os.path.join(ROOT, "docs", "results-suite.md"))
    args = parser.parse_args()
    methods = ["supervised"] + [m for m in args.methods if m != "supervised"]
    plan = [(s, f, m, seed) for s in args.sets for f in args.labeled for m in methods for seed in args.seeds]
    common = [] if args.labeled_batch is None else [f"data.labeled_batch_size={args.labeled_batch}"]
    if args.pretrained is not None:
        common.append(f"model.pretrained={pretrained_backbone(shlex.split(args.pretrained))}")
    if args.size != 64:  # 64: configs/cpu-small.yaml's own crop
        common.append(f"data.crop_size={args.size}")
    runs = []
    for data_set, fraction, method, seed in plan:
        url = study_shards(data_set, fraction, size=args.size)
        runs.append((f"{data_set} {fraction} {method}", seed,
                     [f"data.url={url}", f"train.steps={args.steps}", f"train.eval_every={args.steps}",
                      f"train.ckpt_every={args.steps}", *common, *VARIANTS[method]]))
    results = run_many(runs, args.parallel)
    miou: dict = {}
    pseudo: dict = {}  # what each method taught its unlabeled pixels, scored against the withheld masks
    for key, r in zip(plan, results):
        miou.setdefault(key[:3], []).append(round(100 * r["miou"], 2))
        if r.get("pseudo_masks"):
            pseudo.setdefault(key[:3], []).append(r["pseudo_masks"])
    rows = []
    for data_set in args.sets:
        for fraction in args.labeled:
            sup = miou[(data_set, fraction, "supervised")]
            for method in methods:
                values = miou[(data_set, fraction, method)]
                per_seed = [round(v - s, 2) for v, s in zip(values, sup)]
                rows.append({"set": data_set, "labeled": fraction, "method": method, "miou": values,
                             "mean": round(statistics.mean(values), 2),
                             "gain": round(statistics.mean(values) - statistics.mean(sup), 2),
                             "worst_seed_gain": min(per_seed),
                             **pseudo_scores(pseudo.get((data_set, fraction, method), []))})
    suite = {m: {f: round(statistics.mean(r["gain"] for r in rows if r["method"] == m and r["labeled"] == f), 2)
                 for f in args.labeled} for m in methods if m != "supervised"}
    command = shlex.join(["bench/ssl_suite.py", *sys.argv[1:]])
    lines = ["# The study suite: every method against supervised-only", "",
             f"Made by `.venv/bin/python {command}`: `configs/cpu-small.yaml`"
             + ("" if args.labeled_batch is None else f" with {args.labeled_batch} labeled images per step")
             + (f", the backbone pretrained by `{shlex.join(['bench/pretrain_backbone.py', *shlex.split(args.pretrained)])}`"
                " (exemplar classes of images disjoint from the sets)"
                if args.pretrained is not None else ", the backbone from random weights")
            + f", {args.size} px, {args.steps} steps, one process "
             "per run, the sets of docs/study-sets.md. mIoU in %; gain: the method's mean minus supervised's on the "
             "same set and fraction; worst seed: the lowest per-seed difference (same seed). Pseudo masks, over the "
             "run's unlabeled pixels at its end, scored against the withheld masks: taught, the share of pixels taught; "
             "right, the share of taught pixels whose label is right; background, the taught pixels' share labeled "
             "background against the truth's (mean over seeds).", "",
             "| set | labeled | method | mIoU per seed | mean | gain | worst seed | taught | right | background |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "" if r["method"] == "supervised" else f"{r['gain']:+.2f}"
        worst = "" if r["method"] == "supervised" else f"{r['worst_seed_gain']:+.2f}"
        scored = (f"{r['taught']:.1%} | {r['right']:.1%} | {r['taught_background']:.1%} of {r['true_background']:.1%}"
                  if "taught" in r else " | | ")
        lines.append(f"| {r['set']} | {r['labeled']} | {r['method']} | {' / '.join(f'{v:.2f}' for v in r['miou'])} "
                     f"| {r['mean']:.2f} | {gain} | {worst} | {scored} |")
    lines += ["", "Suite mean gain per method and fraction: " + "; ".join(
        f"{m}: " + ", ".join(f"{f} {g:+.2f}" for f, g in by_fraction.items()) for m, by_fraction in suite.items())]
    with open(args.table, "w") as f:
        f.write("\n".join(lines) + "\n")
    publish({"sets": args.sets, "labeled": args.labeled, "seeds": args.seeds, "steps": args.steps, "size": args.size,
             "labeled_batch": args.labeled_batch,
             "pretrained": args.pretrained is not None, "pretrain_args": args.pretrained, "rows": rows, "suite_mean_gain": suite})


if __name__ == "__main__":
    main()
