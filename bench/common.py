"""Helpers the benchmarks share: generated study sets, single-process training runs, grids of them run as
`guidedmix sweep` trials, and the record each bench leaves of what it measured."""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

import torch

from launch import sweep
from shards import build, sources
from trainer.config import load_config
from trainer.loop import WorkerContext, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(ROOT, "data", "sweeps")
RECORDS = os.path.join(ROOT, "docs", "results")
CODE = ("bench", "trainer", "shards", "launch", "configs")  # what a bench's figures depend on


def publish(figures: dict) -> str:
    """Print a bench's figures as its last line (one JSON object) and keep them as a record,
    `docs/results/<bench>[-<args hash>].json`: the figures with the exact command, the commit it ran at
    (`+dirty` when the code had changes: CODE) and the date, so that a figure quoted in the README names where it
    came from. Returns the record's path."""
    print(json.dumps(figures), flush=True)
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    args = sys.argv[1:]
    threads = os.environ.get("OMP_NUM_THREADS")
    command = shlex.join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), ".venv/bin/python", script, *args])

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # a copy of the tree without its .git (a device machine's) names the commit it was copied at
    commit = git("rev-parse", "--short=12", "HEAD") or os.environ.get("BENCH_COMMIT", "unknown")
    if git("status", "--porcelain", "--untracked-files=no", "--", *CODE):
        commit += "+dirty"
    name = os.path.splitext(os.path.basename(script))[0]
    if args:
        name += "-" + hashlib.sha256(shlex.join(args).encode()).hexdigest()[:8]
    os.makedirs(RECORDS, exist_ok=True)
    path = os.path.join(RECORDS, name + ".json")
    record = {"command": command, "commit": commit, "date": datetime.date.today().isoformat(), "figures": figures}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"record: {os.path.relpath(path, ROOT)}", file=sys.stderr)
    return path


def study_shards(source: str = "synthetic", labeled: str = "1/16", train_images: int = 1200, val_images: int = 240,
                 size: int = 64, seed: int = 0) -> str:
    """Build (once) and return the URL of a generated study set under data/ (`synthetic`, `textures`,
    `textures-hard`), the unlabeled masks withheld (runs score their pseudo masks against them)."""
    name = f"{source}-{labeled.replace('/', '_')}-{train_images}-{size}-s{seed}-withheld"
    url = os.path.join(ROOT, "data", name)
    if not os.path.exists(os.path.join(url, "manifest.json")):
        data = sources.open_source(source, None, synthetic_train=train_images, synthetic_val=val_images,
                                   synthetic_size=size, seed=seed)
        build.build(data, url, build.parse_labeled(labeled), seed=seed, progress=False, withhold_masks=True)
    return url


def train_once(overrides: list[str], config: str = "configs/cpu-small.yaml", in_ray: bool = False) -> dict:
    """One single-process run of the training loop (plain engine, one thread); returns its summary. `in_ray`:
    this process is a Ray driver, and the run's pairing service an actor of that Ray."""
    torch.set_num_threads(1)
    logging.getLogger("guidedmix").setLevel(logging.WARNING)
    out = tempfile.mkdtemp(prefix="gm-bench-")
    cfg = load_config(os.path.join(ROOT, config), ["train.engine=plain", "train.workers=1", f"out={out}", *overrides])
    with contextlib.redirect_stderr(io.StringIO()):
        return train(cfg, WorkerContext(in_ray=in_ray))


def steady_rate(history: list[dict], per_step: float = 1.0) -> float:
    """Steps (times per_step) per second between the run's second and last log points: past warm-up and
    loader start, before the final evaluation."""
    logged = [h for h in history if "seconds" in h]
    first, last = logged[1], logged[-1]
    return (last["step"] - first["step"]) * per_step / (last["seconds"] - first["seconds"])


def run_many(runs: list[tuple[str, int, list[str]]], parallel: int = 2) -> list[dict]:
    """Each (label, seed, overrides) as a `guidedmix sweep` trial (launch/sweep.py: Ray Tune, one thread per
    trial, `parallel` at a time), or its finished summary from data/sweeps/ while code and config are
    unchanged; the summaries in order."""
    config = os.path.join(ROOT, "configs", "cpu-small.yaml")
    trials = [t for label, seed, overrides in runs for t in sweep.plan(config, overrides, {label: []}, [seed], SWEEPS)]
    return sweep.run_trials(trials, parallel)


def device_sync(device: torch.device):
    """What waits for a device's queued work before a clock is read (a GPU runs ahead of the host)."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def loopback_s3(latency_ms: float, bandwidth_mbps: float = 0.0):
    """An S3 server (moto_server) on loopback behind bench/tcp_proxy.py, which puts it at `latency_ms` and
    `bandwidth_mbps` (0: no limit), with the AWS credential variables set for it. Yields (near, far, servers):
    the server's own endpoint (for uploads that are not measured), the front's, and the two processes."""
    s3_port, front_port = free_port(), free_port()
    servers = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "tcp_proxy.py"), str(front_port),
                                 str(s3_port), "--latency-ms", str(latency_ms), "--bandwidth-mbps", str(bandwidth_mbps)])]
    try:
        wait_port(s3_port)
        wait_port(front_port)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        yield f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{front_port}", servers
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)
