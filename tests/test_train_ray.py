"""Distributed training for real: a local Ray head started here, DeepSpeed CPU workers, S3 on loopback."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import fsspec
import psutil
import pytest

from conftest import REPO, VENV_BIN, run_cli, stop_tree

pytestmark = pytest.mark.slow

SMALL = ["--config", "configs/cpu-small.yaml", "--set", "data.crop_size=32", "--set", "train.log_every=4",
         "--set", "train.eval_every=1000", "--set", "train.ledger=true", "--set", "data.val_batch_size=8"]


def read_json(url):
    with fsspec.open(url, "r") as f:
        return json.load(f)


def check_ledgers(out, world, epochs_complete=False):
    """Per split and epoch, no sample key twice across all ranks; and ranks' sets are disjoint."""
    per_rank = [read_json(f"{out}/ledger/rank-{r}.json") for r in range(world)]
    for split in per_rank[0]:
        counts = Counter((epoch, key) for ledger in per_rank for epoch, key in ledger[split])
        repeated = [k for k, n in counts.items() if n > 1]
        assert not repeated, f"{split}: repeated {repeated[:3]}"
        by_rank = [{(e, k) for e, k in ledger[split]} for ledger in per_rank]
        assert not (by_rank[0] & by_rank[-1]) or world == 1
    return per_rank


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_ray_job_submit_trains_to_s3(ray_head, s3, synthetic_url):
    fs = fsspec.filesystem("s3")
    fs.put(synthetic_url + "/", "test/data/", recursive=True)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")}
    cmd = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", ray_head.dashboard, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"env_vars": env}), "--",
           sys.executable, "-m", "launch", "train", *SMALL, "--data", "s3://test/data", "--out", "s3://test/run",
           "--workers", "2", "--steps", "12", "--set", "train.ckpt_every=6"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 12/12" in r.stdout  # progress lines reach the driver's log
    summary = read_json("s3://test/run/summary.json")
    assert summary["steps"] == 12 and summary["workers"] == 2 and summary["method"] == "guidedmix"
    assert 0 <= summary["miou"] <= 1 and len(summary["per_class_iou"]) == 7
    assert summary["samples_seen"] == 12 * 2 * 16
    assert fs.cat_file("test/run/checkpoints/latest").decode() == "step-00000012"
    assert fs.exists("test/run/checkpoints/step-00000012/rank-1.json")
    assert fs.exists("test/run/curves.png") and fs.exists("test/run/overlays/val-0.png")
    check_ledgers("s3://test/run", 2)


def _train_cmd(ray_head, out, data, steps, *extra):
    return [os.path.join(VENV_BIN, "guidedmix"), "train", *SMALL, "--data", data, "--out", out, "--workers", "2",
            "--steps", str(steps), "--address", ray_head.address, *extra]


def test_killed_worker_recovers_from_the_last_checkpoint(ray_head, synthetic_url, tmp_path):
    out = str(tmp_path / "run")
    # ZeRO-3: parameters and optimizer state are partitioned across the ranks, the hardest state to restore
    proc = subprocess.Popen(_train_cmd(ray_head, out, synthetic_url, 40, "--set", "train.ckpt_every=8",
                                       "--set", "train.zero_stage=3"), cwd=REPO,
                            stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: os.path.exists(f"{out}/checkpoints/latest"), 300, "a first checkpoint")
        started = psutil.Process(proc.pid).create_time()
        workers = [p for p in psutil.Process(ray_head.proc.pid).children(recursive=True)
                   if p.name() == "ray::RayTrainWorker" and p.create_time() >= started
                   and p.parent().name() != "ray::RayTrainWorker"]  # not the forked data loader workers
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, open(tmp_path / "driver.log").read()[-3000:]
    finally:
        stop_tree(proc.pid)
    summary = json.load(open(f"{out}/summary.json"))
    assert summary["steps"] == 40 and summary["resumed_from"]
    ledgers = check_ledgers(out, 2)
    # each rank consumed exactly one labeled batch per step, no more, no fewer
    assert all(len(ledger["labeled"]) == 40 * 8 for ledger in ledgers)


def test_interrupted_run_continues_and_finished_run_is_reported(ray_head, synthetic_url, tmp_path):
    out = str(tmp_path / "run")
    cmd = _train_cmd(ray_head, out, synthetic_url, 36, "--set", "train.ckpt_every=6", "--set", "train.zero_stage=2")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: os.path.exists(f"{out}/checkpoints/latest"), 300, "a first checkpoint")
    finally:
        stop_tree(proc.pid)  # the driver dies; Ray ends its workers with it
    first = open(f"{out}/checkpoints/latest").read()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(f"{out}/summary.json"))
    assert summary["steps"] == 36 and summary["resumed_from"] >= first
    history = json.load(open(f"{out}/history.json"))["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert [h["step"] for h in history if "loss" in h] == sorted({h["step"] for h in history if "loss" in h})
    assert sum(losses[-3:]) < sum(losses[:3])  # the loss falls
    check_ledgers(out, 2)
    # the distributed eval equals a single-process eval of the final checkpoint
    e = run_cli("eval", "--checkpoint", out, "--data", synthetic_url)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["miou"] == pytest.approx(summary["miou"], abs=1e-9)
    # the same command again reports the finished run instead of starting over
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stderr


@pytest.mark.parametrize("case", ["missing_data", "unknown_key", "too_many_workers"])
def test_bad_input_fails_fast_with_one_line(ray_head, synthetic_url, tmp_path, case):
    args = _train_cmd(ray_head, str(tmp_path / "run"), synthetic_url, 4)[1:]
    expect = {"missing_data": "manifest", "unknown_key": "model.bogus", "too_many_workers": "--workers 8"}[case]
    if case == "missing_data":
        args[args.index("--data") + 1] = str(tmp_path / "nothing")
    elif case == "unknown_key":
        args += ["--set", "model.bogus=1"]
    else:
        args[args.index("--workers") + 1] = "8"
    t0 = time.monotonic()
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("guidedmix: error")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
