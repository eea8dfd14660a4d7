"""Checkpoints under OUT/checkpoints on any fsspec URL, one store for Ray workers and single processes. The
layout, every name of it defined here:

    OUT/checkpoints/
      latest                 the committed checkpoint's name, written last: the commit
      step-NNNNNNNN/
        config.json          the run's config (secrets dropped) and classes
        rank-R.json          rank R's data-stream positions, samples consumed and sample ledger
        plain.pt             the plain engine's model, optimiser, schedule and client state, or
        engine/              DeepSpeed's own checkpoint (its file names), ZeRO's partitions included, and
        portable.pt          at ZeRO > 0, the whole fp32 state per parameter, for a resume at another world size
        NAME.pt              a method's parts, rank 0's (trainer/methods): `teacher.pt`, guidedmix's EMA
                             teacher; `pairing-bank.pt`, its worker bank without pixels (a resume reads them again);
                             `thresholds.pt`, its adaptive thresholds
        rank-R.complete      rank R's files are all there

`load_trained` reads one back as a model for eval and predict.

Saving does not stall training: the step hands the store its state as host copies (`Snapshot`) and goes on;
the engine's weights and optimiser state, which change only at its next optimiser step, are copied in the
background while the next forward and backward run, the engine waiting for the copy before it updates them.
A background thread writes the files, uploads them and marks the rank complete, and rank 0 writes `latest`
(naming the folder) once every rank is: the commit. A new checkpoint waits for the previous one's commit,
and so does the end of the run. A failed or interrupted write (storage down past the retry budget, a full or
read-only target, a killed worker) leaves `latest` on the previous, complete checkpoint; the error
(CheckpointError, naming the URL) is raised in the training thread at its next step.
"""
from __future__ import annotations

import collections
import concurrent.futures
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Callable, Optional

import torch

from shards.errors import BadInput, StorageFailure
from shards.storage import Storage, describe_error, join, with_retries

from .config import Config
from .model import build_model

log = logging.getLogger("guidedmix.checkpoint")
LATEST = "latest"
RUN_CONFIG = "config.json"
RANK_STATE = "rank-{rank}.json"
COMPLETE = "rank-{rank}.complete"
PLAIN_FILE = "plain.pt"
ENGINE_FOLDER = "engine"  # DeepSpeed's checkpoint tag: its own files, named by DeepSpeed
PORTABLE_FILE = "portable.pt"
COMMIT_POLL_S = 0.2


class CheckpointError(StorageFailure):
    """A checkpoint could not be written or read; the message names the URL."""


class CheckpointStore:
    def __init__(self, run: Storage, keep: int = 2):
        checkpoints = run.at("checkpoints")
        self.root, (self.fs, self.path) = checkpoints.url, checkpoints.filesystem()
        self.keep, self.retries = keep, run.retries
        self._pending: Optional[concurrent.futures.Future] = None

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

    def save(self, name: str, rank: int, world_size: int, write_files: Callable[["Snapshot"], None],
             on_commit: Callable[[float], None] = lambda seconds: None) -> None:
        """`write_files(snapshot)` hands this rank's state to a Snapshot (host copies; collectives allowed);
        the files are then written, uploaded and committed in the background, and `on_commit(seconds)` runs
        once `latest` names them (on rank 0; on the others once their part is written). Waits for the
        previous checkpoint first."""
        self.wait()
        started = time.monotonic()
        snapshot = Snapshot(tempfile.mkdtemp(prefix="guidedmix-save-"))
        try:
            write_files(snapshot)
        except BaseException:
            snapshot.copied.set()  # nothing to wait for: the snapshot is dropped
            remove_local(snapshot.folder)
            raise
        self._pending = in_background(self._write_and_commit, snapshot, name, rank, world_size,
                                      lambda: on_commit(time.monotonic() - started))

    def _write_and_commit(self, snapshot: "Snapshot", name: str, rank: int, world_size: int,
                          on_commit: Callable[[], None]) -> None:
        try:
            try:
                snapshot.copy_rest()
            finally:
                snapshot.copied.set()  # the engine may update its state now, even where the copy failed
            try:
                snapshot.write()
            except (OSError, RuntimeError) as e:  # a full disk or a file size limit (torch's writer: RuntimeError)
                text = (str(e).splitlines() or [""])[0][:160]
                raise CheckpointError(f"{join(self.root, name)}: writing its files failed ({type(e).__name__}: "
                                      f"{text}); the previous checkpoint stays the latest") from e
            self._upload(snapshot.folder, name)
        finally:
            remove_local(snapshot.folder)
        folder = join(self.path, name)
        self._retry(lambda: self.fs.pipe_file(join(folder, COMPLETE.format(rank=rank)), b""), join(self.root, name))
        if rank == 0:
            wanted = {COMPLETE.format(rank=r) for r in range(world_size)}
            while not wanted <= self._names(folder):
                time.sleep(COMMIT_POLL_S)
            self._retry(lambda: self._point_latest_at(name), self.root)
            self._prune(name)
            log.info("checkpoint %s committed", name)
        on_commit()

    def _point_latest_at(self, name: str) -> None:
        """The commit. An object store's PUT replaces `latest` whole; a file system's write in place could be
        read, or left by a crash, half-written: there the name goes to a temporary file, renamed over `latest`."""
        pointer = join(self.path, LATEST)
        if "file" not in self.fs.protocol:
            self.fs.pipe_file(pointer, name.encode())
            return
        self.fs.pipe_file(pointer + ".next", name.encode())
        self.fs.mv(pointer + ".next", pointer)

    def _names(self, folder: str) -> set[str]:
        self.fs.invalidate_cache(folder)  # s3fs caches listings; another rank's marker is news
        return {os.path.basename(p.rstrip("/")) for p in self._retry(lambda: self.fs.ls(folder, detail=False), folder)}

    def poll(self) -> None:
        """Raise a background write's error, if it has failed (cheap: called every step)."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Until this rank's last checkpoint is written (and on rank 0, committed); raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

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
        steps = [n for n in names if n.startswith("step-") and n < current]  # a later one may be uploading
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


def in_background(fn, *args) -> concurrent.futures.Future:
    """`fn(*args)` in a daemon thread: a process that ends (an error, a signal) does not wait for an upload,
    as the executors' threads would make it."""
    future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)
    threading.Thread(target=run, name="checkpoint", daemon=True).start()
    return future


class Snapshot:
    """A checkpoint's files as this rank hands them over: tensors copied to host memory (training goes on
    changing the originals), written to `folder` later by `write()`. Small files (JSON) go to `folder` directly.

    `save` copies at once. `save_until_update` takes an engine's state, whose tensors change only at its next
    optimiser step but for those named `changing` (batch-norm statistics, which the forward updates): those are
    copied at once, the others by `copy_rest()` in the background, after which `copied` is set; the engine
    waits for `copied` before its next optimiser step."""

    def __init__(self, folder: str):
        self.folder, self.files, self.copied_now = folder, {}, set()
        self.copied = threading.Event()
        self.copied.set()

    def save(self, state, path: str) -> None:
        """`path` relative to the folder, or inside it (DeepSpeed's checkpoint engine names whole paths)."""
        self.files[os.path.join(self.folder, path)] = host_copy(state)

    def save_until_update(self, state, path: str, changing) -> None:
        changing = {t.data_ptr() for t in changing}

        def now(tensor):
            return tensor.data_ptr() in changing
        partial = host_copy(state, now, copied=self.copied_now)
        self.files[os.path.join(self.folder, path)] = partial
        self.copied.clear()

    def copy_rest(self) -> None:
        def not_yet(tensor):
            return id(tensor) not in self.copied_now
        self.files = {path: host_copy(state, not_yet) for path, state in self.files.items()}

    def write(self) -> None:
        for path, state in self.files.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(state, path)


def host_copy(state, which: Callable[[torch.Tensor], bool] = lambda tensor: True, copied: Optional[set] = None):
    """`state` with every tensor for which `which` holds copied to host memory (the others kept as they are;
    `copied` collects the copies' ids); containers rebuilt, other values as they are (numbers, strings,
    DeepSpeed's config), lists and dicts copied."""
    if torch.is_tensor(state):
        if not which(state):
            return state
        copy = state.detach().to("cpu", copy=True)
        if copied is not None:
            copied.add(id(copy))
        return copy
    if isinstance(state, dict):
        items = {k: host_copy(v, which, copied) for k, v in state.items()}
        return collections.OrderedDict(items) if isinstance(state, collections.OrderedDict) else items
    if isinstance(state, list) or (isinstance(state, tuple) and not hasattr(state, "_fields")):
        return type(state)(host_copy(v, which, copied) for v in state)
    return state


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def part_file(name: str) -> str:
    """A method's part in a checkpoint folder."""
    return f"{name}.pt"


def read_parts(local_dir: str, names) -> dict:
    """The method parts of these names that the checkpoint holds."""
    paths = {name: os.path.join(local_dir, part_file(name)) for name in names}
    return {name: torch.load(path, weights_only=True) for name, path in paths.items() if os.path.exists(path)}


def write_rank_state(local_dir: str, rank: int, state: dict) -> None:
    with open(os.path.join(local_dir, RANK_STATE.format(rank=rank)), "w") as f:
        json.dump(state, f)


def read_rank_states(local_dir: str) -> dict[int, dict]:
    """Every rank's state in a checkpoint folder, by rank (the world that wrote it, whatever reads it)."""
    states = {}
    for name in os.listdir(local_dir):
        rank = re.fullmatch(RANK_STATE.replace("{rank}", r"(\d+)").replace(".", r"\."), name)
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


def zero_world(local_dir: str) -> int:
    """How many data-parallel ranks wrote a checkpoint's ZeRO optimiser partitions."""
    return len(glob.glob(os.path.join(local_dir, ENGINE_FOLDER, "*zero_pp_rank_*_optim_states.pt")))


def load_model_weights(local_dir: str) -> dict:
    """The model's fp32 state dict from a checkpoint folder either engine wrote (DeepSpeed ZeRO 0-3 or plain)."""
    plain = os.path.join(local_dir, PLAIN_FILE)
    if os.path.exists(plain):
        return torch.load(plain, map_location="cpu", weights_only=False)["model"]
    states = sorted(glob.glob(os.path.join(local_dir, ENGINE_FOLDER, "*model_states.pt")))
    if any("zero_pp_rank" in s for s in states):  # ZeRO-3: parameters live in the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # see __init__

        return get_fp32_state_dict_from_zero_checkpoint(local_dir, tag=ENGINE_FOLDER)
    if not states:
        raise BadInput(f"{local_dir}: checkpoint holds no model weights")
    state = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_trained(storage: Storage):
    """(config, classes, model in eval mode) from a run folder (its latest checkpoint) or one of its
    checkpoints, written by either engine."""
    url = storage.url.rstrip("/")
    run, _, name = url.rpartition("/checkpoints/")
    if not run:
        run, name = url, None
    store = CheckpointStore(storage.for_url(run))
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
