"""The Ray driver behind `guidedmix train` (and the entrypoint of `ray job submit`).

Connects to Ray (`--address`, RAY_ADDRESS, or a local Ray started for this run), checks the cluster can
hold the workers, and runs Ray Train's TorchTrainer; each worker runs `trainer.loop.train`. Checkpoints
live under --out (see trainer/checkpoint.py), so a restarted worker group, a rerun of the same command,
or a later `ray job submit` all continue from the last committed step.
"""
from __future__ import annotations

import json
import logging
import os
import time

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from shards.errors import BadInput, BankFailure, StorageFailure
from shards.manifest import read_manifest
from shards.storage import join
from trainer.config import CREDENTIALS_HELP, Config
from trainer.loop import WorkerContext, train
from trainer.outputs import SUMMARY
from trainer.pairing import start_service

from .console import LOG_FORMAT

log = logging.getLogger("guidedmix.driver")


def absolute(url: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if "://" in url or url.startswith("pipe:"):
        return url
    return os.path.abspath(url)


def finished_summary(cfg: Config):
    """The summary of a run under --out that already reached the requested steps, else None."""
    stored = cfg.storage(cfg.out).at(SUMMARY)
    try:
        summary = json.loads(stored.read())
    except FileNotFoundError:
        return None
    except ValueError:
        summary = None
    if not isinstance(summary, dict) or not isinstance(summary.get("steps"), int):
        raise BadInput(f"{stored.url}: not a summary this program wrote (move it away to train into {cfg.out})")
    return summary if summary["steps"] >= cfg.train.steps else None


def expected_failure(err: BaseException):
    """The BadInput, StorageFailure or BankFailure a worker raised, dug out of Ray Train's wrappers (worker failures,
    causes, the DataLoader's re-raise); None for anything else."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (BadInput, StorageFailure, BankFailure)):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "_base_exc", None),
                  *getattr(e, "worker_failures", {}).values()]
    return None


def _worker_entry(config: dict) -> None:
    # our format, in place of Ray's: the driver's console tells our lines from Ray's and DeepSpeed's by it
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    ctx = ray.train.get_context()
    train(Config.model_validate(config),
          WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), in_ray=True,
                        report=ray.train.report))


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `--address`, else RAY_ADDRESS; None: a local Ray started for this command."""
    return address or os.environ.get("RAY_ADDRESS")


def _connect(address: str | None, workers: int):
    env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL",
                                      "AWS_DEFAULT_REGION") if k in os.environ}
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # with its dashboard: Ray Train's placement-group cleaner watches the controller through the State API
    # the dashboard serves, and without it warns every few seconds that the state is unavailable
    ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=True,
             logging_level=logging.WARNING, runtime_env={"env_vars": env} if env else None)
    return True


def _check_capacity(workers: int, use_gpu: bool) -> None:
    resources = ray.cluster_resources()
    kind = "GPU" if use_gpu else "CPU"
    have = int(resources.get(kind, 0))
    if workers > have:
        raise BadInput(f"--workers {workers}: the Ray cluster has {have} {kind}s (each worker takes one)")


def run(cfg: Config, address: str | None = None) -> dict:
    if cfg.secret_keys():
        # Ray Train keeps a run's config in its object store and the controller's arguments, and its dashboard
        # serves it: credentials stay with the processes that use them
        raise BadInput(f"{cfg.secret_keys()[0]}: a run on Ray takes no credentials in its config; {CREDENTIALS_HELP} "
                       "on every node (train --no-ray reads them from the config)")
    cfg = cfg.model_copy(update={"out": absolute(cfg.out),
                                 "data": cfg.data.model_copy(update={"url": absolute(cfg.data.url)})})
    done = finished_summary(cfg)
    if done:
        log.info("run under %s already finished (%d steps, mIoU %.4f)", cfg.out, done["steps"], done["miou"])
        return done
    read_manifest(cfg.storage())  # bad data fails before Ray starts
    address = cluster_address(address)
    if not address:
        # the embedded local Ray stays on loopback: Ray otherwise binds the machine's interface address,
        # and gloo picks the interface its hostname resolves to unless told (workers inherit both)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    low, high = cfg.train.worker_range
    started_local = _connect(address, high)
    try:
        use_gpu = cfg.train.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= low
        _check_capacity(low, use_gpu)
        count = f"{low} to {high}" if cfg.train.elastic else f"{low}"
        log.info("training %s: %s %s workers, %d steps, outputs under %s", cfg.train.method, count,
                 "GPU" if use_gpu else "CPU", cfg.train.steps, cfg.out)
        service = None  # held until training ends: an actor nobody holds a handle to is removed
        if cfg.train.method == "guidedmix" and cfg.guidedmix.pairing.mode == "service":
            service = start_service(cfg.guidedmix.pairing, cfg.out, cfg.train.seed)
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config=cfg.public_dict(drop_secrets=True),
            # elastic (MIN, MAX): Ray Train asks for MAX, starts with what it has and restarts the group at a
            # new size from the latest checkpoint when a node goes or comes (the global batch stays)
            scaling_config=ScalingConfig(num_workers=(low, high) if cfg.train.elastic else low, use_gpu=use_gpu,
                                         elastic_resize_monitor_interval_s=cfg.train.resize_check_s,
                                         resources_per_worker={"GPU" if use_gpu else "CPU": 1}),
            run_config=RunConfig(name=f"guidedmix-{cfg.digest()}-{int(time.time())}",
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        )
        try:
            trainer.fit()
        except Exception as e:  # a worker's expected failure reaches the user as its own one line
            raise expected_failure(e) or e
        del service
    finally:
        if started_local:
            ray.shutdown()
    summary = finished_summary(cfg)
    if summary is None:
        raise RuntimeError(f"training ended without {join(cfg.out, SUMMARY)}")
    return summary
