"""Healthy ranges for the alert thresholds (k8s/base/prometheusrule.yaml), read from finished runs' histories:
at each log point, the quantities the alerts compare, at their worst over the run. Prints one JSON record per
run and the worst over all of them.

    .venv/bin/python bench/alert_ranges.py runs/demo data/sweeps/...   # run folders (each with history.json)

What a history gives is close to what Prometheus sees, not the same: `data_wait_s` is the log step's own
wait (the alert takes 10 minutes of steps), the hour's mean of a class share is taken over the log points
of the last 3,600 training seconds. `..._longest_over_threshold_s`: the longest time a quantity stayed above the
rule's threshold (the rule fires past its `for:`, 10 minutes).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import publish  # noqa: E402


def longest(stretches: list[tuple[float, bool]]) -> float:
    """The longest time (s) over which the flag held at consecutive log points."""
    best, start = 0.0, None
    for seconds, flag in stretches:
        start = (start if start is not None else seconds) if flag else None
        best = max(best, seconds - start) if flag else best
    return round(best, 1)


def ranges(history: list[dict], runaway: float, off_truth: float) -> dict:
    logs = [r for r in history if "loss" in r]
    wait_share, above_mean, above_truth, seen = [], [], [], []
    for before, record in zip(logs, logs[1:]):
        step_s = (record["seconds"] - before["seconds"]) / (record["step"] - before["step"])
        wait_share.append(record["data_wait_s"] / max(step_s, 1e-9))
    for record in logs:
        shares = record.get("pseudo_class_freq")
        if not record.get("pseudo_coverage"):  # nothing claimed: no shares (the metric is not set either)
            continue
        t = record["seconds"]
        seen = [(s_t, s) for s_t, s in seen if t - s_t <= 3600] + [(t, shares)]
        mean = [sum(s[c] for _, s in seen) / len(seen) for c in range(len(shares))]
        above_mean.append((t, max(v - m for v, m in zip(shares, mean))))
        if "true_class_freq" in record:
            above_truth.append((t, max(v - m for v, m in zip(shares, record["true_class_freq"]))))
    mious = [r["miou"] for r in history if "miou" in r]
    last = logs[-1] if logs else {}
    queries = last.get("pairing_queries", 0)
    return {"log_points": len(logs), "evaluations": len(mious),
            "data_wait_share_max": round(max(wait_share, default=0.0), 3),
            "data_wait_share_median": round(sorted(wait_share)[len(wait_share) // 2], 3) if wait_share else None,
            "data_wait_share_mean": round(sum(wait_share) / len(wait_share), 3) if wait_share else None,
            "in_batch_share": round(last.get("pairing_fallbacks", 0) / queries, 4) if queries else None,
            "class_share_above_hour_mean_max": round(max((v for _, v in above_mean), default=0.0), 3),
            "class_share_above_hour_mean_longest_over_threshold_s": longest([(t, v > runaway) for t, v in above_mean]),
            "class_share_above_truth_max": round(max((v for _, v in above_truth), default=0.0), 3),
            "class_share_above_truth_longest_over_threshold_s": longest([(t, v > off_truth) for t, v in above_truth]),
            "miou_under_best_max": round(max((max(mious[:i + 1]) - m for i, m in enumerate(mious)), default=0.0), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders; every history.json below each is read")
    parser.add_argument("--runaway", type=float, default=0.3, help="GuidedMixPseudoMaskCollapse's threshold over the "
                        "hour's mean (the rule's)")
    parser.add_argument("--off-truth", type=float, default=0.4, help="its threshold over the true share (the rule's)")
    args = parser.parse_args()
    records = []
    for folder in args.runs:
        for path in sorted(glob.glob(os.path.join(folder, "**", "history.json"), recursive=True)):
            try:
                with open(path) as f:
                    history = json.load(f)["history"]
                records.append({"run": os.path.dirname(path), **ranges(history, args.runaway, args.off_truth)})
            except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
                parser.exit(2, f"alert_ranges.py: {path}: not a run's history ({type(e).__name__}: {e})\n")
    if not records:
        parser.exit(2, "alert_ranges.py: no history.json under the folders given\n")
    for record in records:
        print(json.dumps(record))
    worst = {k: max(r[k] for r in records if r[k] is not None) for k in records[0]
             if k not in ("run", "log_points", "evaluations") and any(r[k] is not None for r in records)}
    publish({"runs": len(records), "worst": worst})


if __name__ == "__main__":
    main()
