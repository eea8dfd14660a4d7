"""Distributed training for real: a local Ray head started here, DeepSpeed CPU workers, S3 on loopback."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import fsspec
import psutil
import pytest

from conftest import (REPO, SMALL, VENV_BIN, check_ledgers, read_json, run_cli, stop_tree, train_cmd,
                      train_workers, wait_for)

pytestmark = pytest.mark.slow


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
    check_ledgers("s3://test/run")  # 12 steps: the unlabeled split's first epoch, partly


def test_killed_worker_recovers_from_the_last_checkpoint(ray_head, synthetic_url, tmp_path):
    out = str(tmp_path / "run")
    # ZeRO-3: parameters and optimizer state are partitioned across the ranks, the hardest state to restore
    proc = subprocess.Popen(train_cmd(ray_head.address, out, synthetic_url, 40, "--set", "train.ckpt_every=8",
                                       "--set", "train.zero_stage=3"), cwd=REPO,
                            stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: os.path.exists(f"{out}/checkpoints/latest"), 300, "a first checkpoint")
        workers = train_workers([ray_head.proc.pid], proc.pid)
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, open(tmp_path / "driver.log").read()[-3000:]
    finally:
        stop_tree(proc.pid)
    summary = json.load(open(f"{out}/summary.json"))
    assert summary["steps"] == 40 and summary["resumed_from"]
    # each rank consumed exactly one labeled batch per step, no more, no fewer
    assert check_ledgers(out)["labeled"]["samples"] == 2 * 40 * 8


# a global batch of 16 + 16 in micro-batches of 8 (one each at 2 workers, two accumulated at 1); a loss logged
# every step, a checkpoint every 8
STEPS, EVERY_STEP = 24, ["--set", "train.log_every=1", "--set", "train.ckpt_every=8",
                         "--set", "data.global_batch.labeled=16", "--set", "data.global_batch.unlabeled=16"]


def logged_losses(out: str) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.load(open(f"{out}/history.json"))["history"] if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(ray_head, synthetic_url, tmp_path_factory) -> str:
    """The default recipe at 2 DeepSpeed workers, never stopped: the run the others are held to."""
    out = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    done = run_cli(*train_cmd(ray_head.address, out, synthetic_url, STEPS, *EVERY_STEP)[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_default_worker_bank_answers_every_query_after_the_first_step(uninterrupted):
    """The default pairs through each worker's own bank: empty at the first step (in-batch pairing then), it
    answers every later query. A bank that failed quietly would turn the run into in-batch pairing."""
    summary = read_json(f"{uninterrupted}/summary.json")
    assert summary["config"]["guidedmix"]["pairing"]["mode"] == "worker"
    pairing = summary["pairing"]  # rank 0's
    per_step = pairing["queries"] // STEPS
    assert per_step >= 1 and pairing["queries"] == per_step * STEPS, pairing
    assert pairing["fallbacks"] == per_step and pairing["answered"] == pairing["queries"] - per_step, pairing
    check_ledgers(uninterrupted)


def test_a_run_killed_after_a_checkpoint_trains_on_as_if_never_stopped(ray_head, synthetic_url, uninterrupted,
                                                                        tmp_path):
    """Driver and workers SIGKILLed once a checkpoint before the last step is committed (written in the
    background), run again: every loss it logs after that step is the uninterrupted run's, bit for bit
    (weights, optimiser, schedule, data positions and the pairing bank all restored)."""
    out = str(tmp_path / "run")
    cmd = train_cmd(ray_head.address, out, synthetic_url, STEPS, *EVERY_STEP)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    latest = f"{out}/checkpoints/latest"

    def committed() -> int:  # 0 before the first commit (or while `latest` is being written)
        name = open(latest).read() if os.path.exists(latest) else ""
        return int(name.removeprefix("step-")) if re.fullmatch(r"step-\d+", name) else 0
    try:
        wait_for(lambda: 0 < committed() < STEPS, 300, "a checkpoint before the last step")
        for p in [*train_workers([ray_head.proc.pid], proc.pid), psutil.Process(proc.pid)]:
            p.send_signal(signal.SIGKILL)
    finally:
        stop_tree(proc.pid, sig=signal.SIGKILL)
    resume_step = committed()
    again = run_cli(*cmd[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.load(open(f"{out}/summary.json"))["resumed_from"] == f"step-{resume_step:08d}"
    resumed, never_stopped = logged_losses(out), logged_losses(uninterrupted)
    assert sorted(resumed) == sorted(never_stopped) == list(range(1, STEPS + 1))
    after = range(resume_step + 1, STEPS + 1)
    assert [resumed[s] for s in after] == [never_stopped[s] for s in after]


def test_one_worker_trains_the_same_samples_and_losses_as_two(ray_head, synthetic_url, uninterrupted, tmp_path):
    """The same run at 1 worker: the same samples in the same global order at every step, and the logged
    losses within 0.01 of the 2 workers' (the micro-batches and their randomness are the same; gradients are
    summed in another order and batch norm's running statistics are kept per worker: `bench/world_size.py`
    measured 0.0039 at most over 40 steps)."""
    from bench.world_size import global_order

    out = str(tmp_path / "run")
    cmd = train_cmd(ray_head.address, out, synthetic_url, STEPS, *EVERY_STEP)
    cmd[cmd.index("--workers") + 1] = "1"
    one = run_cli(*cmd[1:])
    assert one.returncode == 0, one.stderr[-3000:]
    for split in ("labeled", "unlabeled"):
        order = global_order(out, 1, split)
        assert len(order) == STEPS * 16 and order == global_order(uninterrupted, 2, split), split
    losses, control = logged_losses(out), logged_losses(uninterrupted)
    assert sorted(losses) == sorted(control) == list(range(1, STEPS + 1))
    assert max(abs(losses[s] - control[s]) for s in control) < 0.01


@pytest.mark.parametrize("case", ["missing_data", "unknown_key", "too_many_workers"])
def test_bad_input_fails_fast_with_one_line(ray_head, synthetic_url, tmp_path, case):
    args = train_cmd(ray_head.address, str(tmp_path / "run"), synthetic_url, 4)[1:]
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
    errors = [line for line in r.stderr.splitlines() if line.startswith("guidedmix: error")]
    assert len(errors) == 1 and expect in errors[0] and "Traceback" not in r.stderr
    assert r.stderr.rstrip().endswith(errors[0])  # the error is the last word, not buried in what Ray printed
    if case != "too_many_workers":  # refused before Ray is reached: the error line is all of stderr
        assert r.stderr.strip() == errors[0], r.stderr
    assert time.monotonic() - t0 < 60


NOISE = ("PlacementGroupCleaner", "TrainingReport", "built successfully", "Token authentication", "TrainController",
         "core_worker", "-0.000")


def test_a_local_run_has_a_quiet_console_and_v_brings_the_chatter_back(synthetic_url, tmp_path):
    # as a user runs it: Ray's default authentication (no RAY_AUTH_MODE; its token goes under this HOME)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, "HOME": str(tmp_path)}

    def train(out, *flags):
        cmd = [os.path.join(VENV_BIN, "guidedmix"), *flags, "train", *SMALL, "--data", synthetic_url, "--out", out,
               "--workers", "2", "--steps", "8"]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout + r.stderr

    out = str(tmp_path / "quiet")
    console = train(out)
    lines = console.strip().splitlines()
    found = [n for n in NOISE if n in console]
    assert not found and len(lines) <= 10, console
    assert "\x1b[" not in console  # not a terminal: plain lines, no colour codes
    for expected in ("training guidedmix: 2 CPU workers", "step 8/8 | loss", "checkpoint step-00000008 committed",
                     "val mIoU", '"miou"'):
        assert expected in console, (expected, console)
    # the chatter went to the log file the console names, the placement-group cleaner's flood is gone at its
    # cause (a local Ray with its dashboard), not filtered
    log_line = next(line for line in lines if "full log" in line)
    path = log_line.split(": ", 2)[-1].split(" ")[0]
    assert path.startswith(f"{out}/logs/console-")
    full = open(path).read()
    assert "TrainingReport" in full and "Token authentication is enabled" in full
    assert "Failed to query Ray Train Controller" not in full and "step 8/8 | loss" in full
    loud = train(str(tmp_path / "loud"), "-v")
    assert "TrainingReport" in loud and len(loud.splitlines()) > len(lines) + 5


def test_a_sweep_runs_its_grid_on_ray_tune_and_reruns_nothing_finished(synthetic_url, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("supervised: [train.method=supervised]\nlighter: [guidedmix.unsup_weight=0.5]\n")
    out = tmp_path / "sweep"
    args = ["sweep", *SMALL, "--data", synthetic_url, "--grid", str(grid), "--seeds", "0", "1", "--steps", "4",
            "--out", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert [row["variant"] for row in result["rows"]] == ["supervised", "lighter"]
    trials = sorted(glob.glob(f"{out}/trials/*/summary.json"))
    assert len(trials) == 4 and len(re.findall(r"\[\d/4\] \w+ seed \d: mIoU", r.stderr)) == 4
    summaries = [json.load(open(t)) for t in trials]
    assert sorted((s["method"], s["config"]["train"]["seed"], s["config"]["guidedmix"]["unsup_weight"])
                  for s in summaries) == [("guidedmix", 0, 0.5), ("guidedmix", 1, 0.5),
                                          ("supervised", 0, 1.0), ("supervised", 1, 1.0)]
    by_variant = {row["variant"]: row for row in result["rows"]}
    sup = {s["config"]["train"]["seed"]: 100 * s["miou"] for s in summaries if s["method"] == "supervised"}
    assert by_variant["supervised"]["miou"] == {str(k): round(v, 2) for k, v in sup.items()}
    assert "| lighter |" in (out / "sweep.md").read_text()
    # the same sweep again: every trial is found finished, nothing trains
    stamps = [os.path.getmtime(t) for t in trials]
    again = run_cli(*args, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout) == result
    assert [os.path.getmtime(t) for t in trials] == stamps and "mIoU" not in again.stderr
    # a changed override is a new trial; a grid that is not one is one line, exit 2
    grid.write_text("broken: train.method=supervised\n")
    bad = run_cli(*args, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--grid" in bad.stderr


def test_a_trial_key_does_not_depend_on_where_the_checkout_lies(monkeypatch, tmp_path):
    """Two clones of one commit key a trial alike when its data and weights lie inside each clone (the
    studies' under data/), so a worktree finds the trials another finished; data elsewhere stays in the key."""
    from launch import sweep
    monkeypatch.setattr(sweep, "code_digest", lambda: "one commit")

    def key(root, data):
        monkeypatch.setattr(sweep, "ROOT", root)
        overrides = [f"data.url={data}", f"model.pretrained={root}/data/pretrained/tiny.pt"]
        return sweep.plan(None, overrides, {"default": []}, [0], str(tmp_path / "out"))[0].key

    here = key(REPO, f"{REPO}/data/textures-1_16")
    assert key("/elsewhere/clone", "/elsewhere/clone/data/textures-1_16") == here
    assert key(REPO, "/elsewhere/clone/data/textures-1_16") != here


def test_bf16_on_cpu_workers_through_a_checkpoint_and_a_resume(ray_head, synthetic_url, tmp_path):
    """The bf16 path a GPU run takes (DeepSpeed with fp32 weights, the forward under autocast), on CPU workers:
    dtype faults in mask generation, losses, metrics and the pairing service's float32 bank show here first."""
    out = str(tmp_path / "run")
    bf16 = ["--set", "train.precision=bf16", "--set", "train.ckpt_every=3", "--set", "guidedmix.pairing.mode=service",
            "--set", "guidedmix.rampup_steps=0", "--set", "guidedmix.tau=0"]  # every unlabeled pixel taught
    first = run_cli(*train_cmd(ray_head.address, out, synthetic_url, 3, *bf16)[1:])
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(*train_cmd(ray_head.address, out, synthetic_url, 6, *bf16)[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.load(open(f"{out}/summary.json"))
    assert summary["steps"] == 6 and summary["resumed_from"] == "step-00000003"
    assert 0 < summary["miou"] <= 1 and summary["config"]["train"]["precision"] == "bf16"
    history = json.load(open(f"{out}/history.json"))["history"]
    logged = [h for h in history if "loss" in h]
    assert logged and all(0 < h["loss"] < 100 for h in logged) and logged[-1]["mix"] > 0


def test_a_zero_2_checkpoint_of_2_workers_resumes_on_3_and_on_1_with_its_whole_state(ray_head, synthetic_url,
                                                                                     tmp_path):
    """ZeRO partitions load only at the world size that wrote them; the checkpoint's portable state (whole
    fp32 weights and optimiser state per parameter) lets 3 or 1 workers go on where 2 stopped. On 3 the
    weights evaluate exactly as the 2 workers' did (their checkpoint, re-partitioned in 3); on 1 the run
    goes on with AdamW's step count and moments and the schedule carried, not restarted."""
    import shutil

    import torch

    from trainer.checkpoint import PORTABLE_FILE

    zero2 = ["--set", "train.zero_stage=2", "--set", "train.ckpt_every=3", "--set", "data.global_batch.labeled=12",
             "--set", "data.global_batch.unlabeled=12", "--set", "data.labeled_batch_size=2",
             "--set", "data.unlabeled_batch_size=2"]

    def train(out, workers, steps):  # on the module's head of 2 CPUs, or a local Ray for 3 workers
        where = ["--address", ray_head.address] if workers <= 2 else []
        r = run_cli("train", *SMALL, "--data", synthetic_url, "--out", out, "--workers", str(workers),
                    "--steps", str(steps), *where, *zero2)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.load(open(f"{out}/summary.json"))

    first = str(tmp_path / "first")
    written = train(first, 2, 3)
    carried = torch.load(f"{first}/checkpoints/step-00000003/{PORTABLE_FILE}", weights_only=False)
    assert carried["optimiser_step"] == 3 and carried["scheduler"]["last_epoch"] == 3

    on_3 = str(tmp_path / "on-3")  # no step left: it loads, evaluates and reports
    shutil.copytree(first, on_3)
    os.remove(f"{on_3}/summary.json")
    again = train(on_3, 3, 3)
    assert again["resizes"] == [{"step": 3, "from": 2, "to": 3}] and again["resumed_from"] == "step-00000003"
    assert again["miou"] == pytest.approx(written["miou"], abs=1e-6)
    assert again["per_class_iou"] == pytest.approx(written["per_class_iou"], abs=1e-6)

    on_1 = str(tmp_path / "on-1")
    shutil.copytree(first, on_1)
    summary = train(on_1, 1, 6)
    assert summary["resizes"] == [{"step": 3, "from": 2, "to": 1}]
    state = torch.load(f"{on_1}/checkpoints/step-00000006/{PORTABLE_FILE}", weights_only=False)
    assert state["optimiser_step"] == 6 and state["scheduler"]["last_epoch"] == 6  # restarted: 3 and 3
    # the moments go on from step 3's: Adam's second moment decays slowly (0.999 a step), so a restarted one
    # would hold about half of it
    v3 = torch.cat([s["exp_avg_sq"].flatten() for s in carried["optimiser"].values()])
    v6 = torch.cat([s["exp_avg_sq"].flatten() for s in state["optimiser"].values()])
    assert (v6 >= 0.999 ** 3 * v3 - 1e-12).all()
