"""Reliability under faults, on a real two-node Ray cluster on this machine: a head and a second node
(`ray start --address`), one CPU each, so one training worker runs on each; shards, checkpoints and results on
an S3 server on loopback (moto_server behind bench/tcp_proxy.py, so the store can go down and come back with
its data). Each test injects one fault into a running `guidedmix train`, asserts what must hold after it,
and records its figures for `bench/chaos.py`.
"""
import io
import json
import os
import re
import resource
import signal
import subprocess
import threading
import time

import fsspec
import numpy as np
import pytest
import s3fs
from PIL import Image

from conftest import (CLUSTER_ENV, CLUSTER_IP, REPO, RayHead, RayNode, S3Server, TcpFront, check_ledgers,
                      fault_figures, free_port, ledger_report, read_json, rewrite_tar, run_cli, scrape, stop_tree,
                      total, train_cmd, train_workers, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]
STEPS, EVERY = 18, 6


class Cluster:
    def __init__(self, tmp):
        self.tmp = tmp
        self.moto = S3Server(free_port(), f"{tmp}/moto.log")
        self.moto.start()
        self.store = TcpFront(self.moto.port, f"{tmp}/store.log")  # the endpoint everyone uses
        self.store.start()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.store.port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", **CLUSTER_ENV}

    def start_ray(self):
        self.head = RayHead(self.tmp, num_cpus=1, ip=CLUSTER_IP, env=CLUSTER_ENV)
        self.node = RayNode(self.head, self.tmp)
        self.head.wait_nodes(2)

    def restart_node(self):
        self.node = RayNode(self.head, self.tmp)
        self.head.wait_nodes(2)

    def stop(self):
        for part in ("node", "head"):
            if hasattr(self, part):
                getattr(self, part).stop()
        self.store.stop()
        self.moto.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, short_epochs_url):
    c = Cluster(str(tmp_path_factory.mktemp("chaos")))
    with pytest.MonkeyPatch.context() as env:
        for key, value in c.env.items():  # the nodes' environment, as a pod's env carries the store's
            env.setenv(key, value)
        try:
            s3fs.S3FileSystem.clear_instance_cache()
            fs = fsspec.filesystem("s3")
            fs.mkdir("chaos")
            fs.put(short_epochs_url + "/", "chaos/data/", recursive=True)
            c.start_ray()
            yield c
        finally:
            c.stop()
            s3fs.S3FileSystem.clear_instance_cache()


def start(cluster, out, log, *extra, data="s3://chaos/data", steps=STEPS):
    cmd = train_cmd(cluster.head.address, out, data, steps, "--set", f"train.ckpt_every={EVERY}", *extra)
    return cmd, launch(cmd, log)


def launch(cmd, log):
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def committed(out):
    """The name `latest` points at, or None."""
    try:
        with fsspec.open(f"{out}/checkpoints/latest", "r") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def finish(proc, log, timeout=600):
    try:
        code = proc.wait(timeout=timeout)
    finally:
        stop_tree(proc.pid)
    return code, open(log).read()


RESUMED, STEPPED = r"resumed from step-", r"step \d+/\d+ \|"


class Progress:
    """Tails a driver log and notes when each sign of progress appears in it (RESUMED: training resumed from a
    checkpoint; STEPPED: a progress line, every train.log_every steps): recovery times are measured to these."""

    def __init__(self, log, sign=RESUMED):
        self.log, self.sign, self.times, self.stopped = log, re.compile(sign), [], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        seen = 0
        while not self.stopped.wait(0.2):
            try:
                text = open(self.log).read()
            except FileNotFoundError:
                continue
            now = time.time()
            self.times += [now] * len(self.sign.findall(text[seen:]))
            seen = len(text)

    def seconds_after(self, wall):
        """Seconds from `wall` (time.time()) to the first sign of progress after it."""
        self.stopped.set()
        self.thread.join()
        later = [t for t in self.times if t > wall]
        return round(later[0] - wall, 1) if later else None


def check_finished(out, steps=STEPS, workers=2, resizes=()):
    """The run finished every step at `workers`, resized as `resizes` ((from, to), ...) says, its ledgers clean."""
    summary = read_json(f"{out}/summary.json")
    assert summary["steps"] == steps and summary["workers"] == workers
    assert [(r["from"], r["to"]) for r in summary["resizes"]] == list(resizes), summary["resizes"]
    ledger = check_ledgers(out)
    assert ledger["labeled"]["samples"] == steps * 16  # the global batch at every size
    return summary, ledger


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("guidedmix: error:")]


def rerun(cmd, log):
    """The same command again after a fault; returns (exit code, its log, its Progress)."""
    progress = Progress(log)
    code, text = finish(launch(cmd, log), log)
    assert code == 0, text[-3000:]
    return text, progress


def test_node_lost_mid_run_resumes_from_the_last_checkpoint(cluster, tmp_path, chaos_report):
    out, log = "s3://chaos/node-lost", tmp_path / "driver.log"
    _, proc = start(cluster, out, log)
    progress = Progress(log)
    wait_for(lambda: committed(out), 300, "a first checkpoint")
    fault = time.time()
    cluster.node.crash()
    time.sleep(5)  # the run cannot go on one CPU short: it waits for the node's return
    cluster.restart_node()
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]
    assert "resumed from step-" in text
    summary, ledger = check_finished(out)
    chaos_report(**fault_figures("node lost", summary, STEPS, progress.seconds_after(fault), ledger))


def test_driver_lost_the_same_command_continues(cluster, tmp_path, chaos_report):
    out = "s3://chaos/driver-lost"
    cmd, proc = start(cluster, out, tmp_path / "first.log", "--set", "train.zero_stage=2")
    wait_for(lambda: committed(out), 300, "a first checkpoint")
    first = committed(out)
    fault = time.time()
    stop_tree(proc.pid, sig=signal.SIGKILL)  # the driver dies at once, no handler runs; Ray ends its workers
    _, progress = rerun(cmd, tmp_path / "again.log")
    summary, ledger = check_finished(out)
    assert summary["resumed_from"] >= first
    history = read_json(f"{out}/history.json")["history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == sorted(set(steps))  # the history continues, without a replayed stretch
    # the distributed eval equals a single-process eval of the final checkpoint, read back from S3
    e = run_cli("eval", "--checkpoint", out, "--data", "s3://chaos/data")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["miou"] == pytest.approx(summary["miou"], abs=1e-9)
    # and the same command once more reports the finished run instead of starting over
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stderr
    chaos_report(**fault_figures("driver lost", summary, STEPS, progress.seconds_after(fault), ledger))


def test_object_store_outage_is_ridden_out(cluster, tmp_path, chaos_report):
    out, log = "s3://chaos/outage", tmp_path / "driver.log"
    _, proc = start(cluster, out, log)
    progress = Progress(log, STEPPED)
    wait_for(lambda: committed(out), 300, "a first checkpoint")
    fault = time.time()
    cluster.store.stop()
    # down until a worker has felt it (read-ahead can carry the steps between two checkpoints through a fixed
    # window unfelt), then 5 s more: inside the default retry budget (0.5 + 1 + 2 + 4 + 8 s of backoff)
    wait_for(lambda: re.search(r"s3://chaos/\S+: .*retry 1/", open(log).read()), 120, "a retry of the store")
    time.sleep(5)
    cluster.store.start()
    back = time.time()
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]
    summary, ledger = check_finished(out)
    chaos_report(**fault_figures("object store down until felt, then 5 s more", summary, STEPS,
                                 progress.seconds_after(back), ledger, outage_s=round(back - fault, 1)))


def test_object_store_outage_past_the_retry_budget_stops_cleanly_and_a_rerun_resumes(cluster, tmp_path,
                                                                                     chaos_report):
    out, log = "s3://chaos/outage-long", tmp_path / "driver.log"
    cmd, proc = start(cluster, out, log, "--set", "data.retries=1", "--set", "train.max_failures=0")
    wait_for(lambda: committed(out), 300, "a first checkpoint")
    cluster.store.stop()
    try:
        code, text = finish(proc, log, timeout=300)
    finally:
        cluster.store.start()
    back = time.time()
    errors = error_lines(text)
    assert code == 1 and len(errors) == 1, text[-3000:]
    assert "s3://chaos/" in errors[0] and "gave up after 1 retries" in errors[0], errors[0]
    _, progress = rerun(cmd, tmp_path / "again.log")
    summary, ledger = check_finished(out)
    assert summary["resumed_from"]
    chaos_report(**fault_figures("object store down past the retry budget, then a rerun", summary, STEPS,
                                 progress.seconds_after(back), ledger, error=errors[0][:200]))


def test_a_failed_checkpoint_write_keeps_the_previous_one(cluster, tmp_path, short_epochs_url, chaos_report):
    out, log = str(tmp_path / "run"), tmp_path / "driver.log"
    cmd, proc = start(cluster, out, log, "--set", "train.max_failures=0", data=short_epochs_url)
    wait_for(lambda: committed(out), 300, "a first checkpoint")
    first = committed(out)
    # the target fills up: from now on no file the workers write may pass 1 MB (a checkpoint is ~8 MB)
    for worker in train_workers([cluster.head.proc.pid, cluster.node.proc.pid], proc.pid):
        worker.rlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    code, text = finish(proc, log)
    errors = error_lines(text)
    assert code == 1 and len(errors) == 1, text[-3000:]
    assert f"{out}/checkpoints/step-" in errors[0], errors[0]
    assert committed(out) == first
    e = run_cli("eval", "--checkpoint", out, "--data", short_epochs_url)  # the previous checkpoint loads
    assert e.returncode == 0, e.stderr[-2000:]
    fixed = time.time()
    _, progress = rerun(cmd, tmp_path / "again.log")
    summary, ledger = check_finished(out)
    assert summary["resumed_from"] == first
    chaos_report(**fault_figures("checkpoint write fails (file size limit), then a rerun", summary, STEPS,
                                 progress.seconds_after(fixed), ledger, error=errors[0][:200]))


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_data_is_skipped_named_and_counted(cluster, tmp_path, chaos_report):
    from shards import build, sources

    local = str(tmp_path / "data")
    build.build(sources.synthetic_source(240, 32, 32, 1), local, build.parse_labeled("1/4"), seed=0,
                samples_per_shard=16, progress=False)
    labeled = sorted(p for p in os.listdir(local) if p.startswith("labeled-"))
    bad_mask_shard, bad_image_shard, truncated = labeled[0], labeled[1], labeled[2]

    def first_key(shard, suffix):
        import tarfile

        with tarfile.open(f"{local}/{shard}") as tar:
            name = next(n for n in tar.getnames() if n.endswith(suffix) and (suffix != ".png" or ".mask." not in n))
        return name[: -len(suffix)], name

    mask_key, mask_member = first_key(bad_mask_shard, ".mask.png")
    rewrite_tar(f"{local}/{bad_mask_shard}",
                lambda n, d: _png(np.full((32, 32), 200, np.uint8)) if n == mask_member else d)  # class 200 of 7
    image_key, image_member = first_key(bad_image_shard, ".png")
    rewrite_tar(f"{local}/{bad_image_shard}", lambda n, d: b"not an image" if n == image_member else d)
    with open(f"{local}/{truncated}", "r+b") as f:
        f.truncate(os.path.getsize(f"{local}/{truncated}") // 2)
    fsspec.filesystem("s3").put(local + "/", "chaos/corrupt/", recursive=True)

    out, log = "s3://chaos/corrupt-run", tmp_path / "driver.log"
    _, proc = start(cluster, out, log, data="s3://chaos/corrupt", steps=12)
    counted = 0  # the run's corrupt-sample counters, as the two nodes' metrics agents serve them
    while proc.poll() is None:
        scrapes = [scrape(f"http://{CLUSTER_IP}:{port}/metrics")
                   for port in (cluster.head.metrics_port, cluster.node.metrics_port)]
        counted = max(counted, sum(total(s[0], "ray_guidedmix_corrupt_samples_total") for s in scrapes if s))
        time.sleep(1)
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]
    summary = read_json(f"{out}/summary.json")
    assert summary["steps"] == 12 and summary["skipped_samples"] >= 3 and counted >= 3
    # each is warned with its shard and key (the truncated shard with how far it reads)
    assert re.search(rf"shard {bad_mask_shard} key {mask_key}: corrupt sample \(class id 200", text)
    assert re.search(rf"shard {bad_image_shard} key {image_key}: corrupt sample \(", text)
    assert re.search(rf"shard {truncated}: unreadable past sample \d+ of 16 \(", text)
    # the ledgers hold the plan less exactly the samples skipped: no stand-in counted as a sample, none repeated
    ledger = ledger_report(out)
    corrupt = {mask_key, image_key} | {f"{truncated}#{i}" for i in range(16)}
    lost = ledger["labeled"]["lost_keys"]
    assert {mask_key, image_key} <= set(lost) <= corrupt and len(lost) == summary["skipped_samples"], ledger
    assert all(split["repeated"] == split["unplanned"] == 0 for split in ledger.values()), ledger
    assert ledger["unlabeled"]["lost"] == 0 and all(s["samples"] == s["summary_samples"] for s in ledger.values())
    assert summary["samples_seen"] == 12 * 2 * 16 - len(lost)
    chaos_report(**fault_figures("corrupt data (truncated shard, undecodable image, mask ids out of range)",
                                 summary, 12, 0.0, skipped_samples=summary["skipped_samples"],
                                 counted_in_metrics=counted))


def test_elastic_run_whose_node_never_returns_finishes_on_the_workers_left(cluster, tmp_path, chaos_report):
    """`--workers 1:2`: the second node is killed once a checkpoint is committed and never comes back; the run
    resumes with one worker at the same global batch (two micro-batches accumulated) and finishes every step
    there, each planned sample trained on once. The node stays down for the next test."""
    out, log = "s3://chaos/elastic-lost", tmp_path / "driver.log"
    _, proc = start(cluster, out, log, "--workers", "1:2", "--set", "train.resize_check_s=5")
    shrunk = Progress(log, r"2 -> 1 workers")
    wait_for(lambda: committed(out), 300, "a first checkpoint")
    fault = time.time()
    cluster.node.crash()
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]
    summary, ledger = check_finished(out, workers=1, resizes=[(2, 1)])
    chaos_report(**fault_figures("second node lost for good (elastic 1:2)", summary, STEPS,
                                 shrunk.seconds_after(fault), ledger, resizes=summary["resizes"]))


def test_elastic_run_grows_when_a_node_joins(cluster, tmp_path, chaos_report):
    """`--workers 1:2` started one node short: the run trains with one worker; a node joins after its first
    step and, at the next resize check, the group grows to two from a checkpoint and trains on."""
    if cluster.head.alive_nodes() == 2:  # run alone: the previous test leaves the node down
        cluster.node.crash()
    cluster.head.wait_nodes(1, timeout=120)
    out, log, steps = "s3://chaos/elastic-grow", tmp_path / "driver.log", 120  # grew at step 42 when measured
    _, proc = start(cluster, out, log, "--workers", "1:2", "--set", "train.resize_check_s=5", steps=steps)
    try:
        wait_for(lambda: re.search(STEPPED, open(log).read()), 300, "a step with one worker")
        joined = time.time()
    finally:
        cluster.restart_node()  # and later tests have their cluster
    grown = Progress(log, r"1 -> 2 workers")
    code, text = finish(proc, log)
    assert code == 0, text[-3000:]
    summary, ledger = check_finished(out, steps, resizes=[(1, 2)])
    chaos_report(**fault_figures("a node joins an elastic run one node short (1:2)", summary, steps,
                                 grown.seconds_after(joined), ledger, resizes=summary["resizes"]))
