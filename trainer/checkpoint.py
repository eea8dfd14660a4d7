"""Checkpoints under OUT/checkpoints on any fsspec URL, one store for Ray workers and single processes.

A checkpoint is a folder `step-NNNNNNNN/` holding the engine's files (DeepSpeed's, or a plain torch
file), the run's config and classes (`config.json`, secrets dropped) and one `rank-R.json` per rank (its
data-stream positions and sample ledger). `load_trained` reads one back as a model for eval and predict.
Every rank uploads its files, all ranks meet at a barrier, then rank 0 writes `latest` (naming the folder): the commit.
A failed or interrupted write (storage down past the retry budget, a full or read-only target, a killed
worker) leaves `latest` on the previous, complete checkpoint, and raises CheckpointError naming the URL.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Optional

from shards.errors import BadInput, StorageFailure
from shards.storage import describe_error, filesystem, join, with_retries

from .collectives import barrier
from .config import Config
from .engine import load_model_weights
from .model import build_model

log = logging.getLogger("guidedmix.checkpoint")
LATEST = "latest"
RUN_CONFIG = "config.json"


class CheckpointError(StorageFailure):
    """A checkpoint could not be written or read; the message names the URL."""


class CheckpointStore:
    def __init__(self, out: str, storage_options: Optional[dict], retries: int, keep: int = 2):
        self.root = join(out, "checkpoints")
        self.fs, self.path = filesystem(self.root, storage_options)
        self.keep, self.retries = keep, retries

    def _retry(self, fn, url):
        try:
            return with_retries(fn, url, self.retries)
        except StorageFailure as e:
            raise CheckpointError(str(e)) from e
        except OSError as e:
            raise CheckpointError(describe_error(url, e)) from e

    def latest(self) -> Optional[str]:
        """The committed checkpoint's folder name, or None for a fresh run."""
        pointer = join(self.path, LATEST)
        try:
            return self._retry(lambda: self.fs.cat_file(pointer), self.root).decode().strip() or None
        except CheckpointError as e:
            if isinstance(e.__cause__, FileNotFoundError):  # no pointer yet: a fresh run
                return None
            raise

    def save(self, name: str, rank: int, write_files: Callable[[str], None]) -> None:
        """`write_files(folder)` puts this rank's files in a local folder; they are uploaded, every rank
        waits for the others, then rank 0 commits and prunes."""
        started = time.monotonic()
        local = tempfile.mkdtemp(prefix="guidedmix-save-")
        try:
            try:
                write_files(local)
            except (OSError, RuntimeError) as e:  # a full disk or a file size limit (torch's writer: RuntimeError)
                text = (str(e).splitlines() or [""])[0][:160]
                raise CheckpointError(f"{join(self.root, name)}: writing its files failed ({type(e).__name__}: "
                                      f"{text}); the previous checkpoint stays the latest") from e
            self._upload(local, name)
        finally:
            remove_local(local)
        barrier()
        if rank == 0:
            self._retry(lambda: self.fs.pipe_file(join(self.path, LATEST), name.encode()), self.root)
            self._prune(name)
        barrier()
        if rank == 0:
            log.info("checkpoint %s committed in %.1fs", name, time.monotonic() - started)

    def _upload(self, local_dir: str, name: str) -> None:
        target = join(self.path, name)
        # file by file with explicit paths: ranks upload into the same folders, and a recursive put into
        # a folder that another rank already created would nest it one level deeper
        for folder, _, files in os.walk(local_dir):
            relative = os.path.relpath(folder, local_dir)
            remote = target if relative == "." else join(target, *relative.split(os.sep))
            self._retry(lambda: self.fs.makedirs(remote, exist_ok=True), join(self.root, name))
            for file in files:
                self._retry(lambda: self.fs.put_file(os.path.join(folder, file), join(remote, file)),
                            join(self.root, name, file))

    def _prune(self, current: str) -> None:
        try:
            names = sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False))
        except OSError:
            return
        steps = [n for n in names if n.startswith("step-") and n != current]
        for old in steps[: max(0, len(steps) - (self.keep - 1))]:
            try:
                self.fs.rm(join(self.path, old), recursive=True)
            except OSError as e:  # an old checkpoint left behind costs space, not correctness
                log.warning("could not prune %s: %s", old, describe_error(join(self.root, old), e))

    def download(self, name: str) -> str:
        """A local copy of a committed checkpoint (the caller removes it)."""
        local = tempfile.mkdtemp(prefix="guidedmix-ckpt-")
        source = join(self.path, name)
        files = self._retry(lambda: self.fs.find(source), join(self.root, name))
        if not files:
            raise CheckpointError(f"{join(self.root, name)}: empty or missing checkpoint")
        for remote in files:
            relative = remote[len(source.rstrip("/")) + 1:]
            path = os.path.join(local, *relative.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._retry(lambda: self.fs.get_file(remote, path), join(self.root, name, relative))
        return local


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def write_rank_state(local_dir: str, rank: int, state: dict) -> None:
    with open(os.path.join(local_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(state, f)


def read_rank_states(local_dir: str) -> dict[int, dict]:
    """Every rank's state in a checkpoint folder, by rank (the world that wrote it, whatever reads it)."""
    states = {}
    for name in os.listdir(local_dir):
        rank = re.fullmatch(r"rank-(\d+)\.json", name)
        if rank:
            with open(os.path.join(local_dir, name)) as f:
                states[int(rank.group(1))] = json.load(f)
    if 0 not in states:
        raise CheckpointError(f"{local_dir}: no state for rank 0 (an incomplete checkpoint)")
    return states


def remove_local(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_run_config(local_dir: str, cfg: Config, classes: list[str]) -> None:
    """What a checkpoint needs to be loaded on its own: the config without secrets, and the class names."""
    with open(os.path.join(local_dir, RUN_CONFIG), "w") as f:
        json.dump({"config": cfg.public_dict(drop_secrets=True), "classes": classes}, f)


def load_trained(url: str, storage_options: Optional[dict], retries: int):
    """(config, classes, model in eval mode) from a run folder (its latest checkpoint) or one of its
    checkpoints, written by either engine."""
    url = url.rstrip("/")
    run, _, name = url.rpartition("/checkpoints/")
    if not run:
        run, name = url, None
    store = CheckpointStore(run, storage_options, retries)
    name = name or store.latest()
    if not name:
        raise BadInput(f"{url}: no committed checkpoint")
    local = store.download(name)
    try:
        if not os.path.exists(os.path.join(local, RUN_CONFIG)):
            raise BadInput(f"{url}: not a guidedmix checkpoint (no {RUN_CONFIG})")
        with open(os.path.join(local, RUN_CONFIG)) as f:
            saved = json.load(f)
        cfg, classes = Config.model_validate(saved["config"]), saved["classes"]
        model = build_model(cfg.model, len(classes), cfg.guidedmix.mitrans.reduction)
        model.load_state_dict(load_model_weights(local))
    finally:
        remove_local(local)
    return cfg, classes, model.eval()
