"""The pairing service: the bank behind a named Ray actor, one per run, and the wire format of a worker's one
call a step to it (`exchange`)."""
from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from typing import NamedTuple, Optional

import numpy as np
import ray
import torch

from ..config import PairingConfig
from ..metrics import Metrics, run_label
from .bank import PairingBank

NAMESPACE = "guidedmix"


def service_name(out: str) -> str:
    """One service per run: the name follows the run's --out, so every worker (and a restarted driver)
    finds the same actor."""
    return "guidedmix-pairing-" + hashlib.sha256(out.encode()).hexdigest()[:12]


class PairingService:
    """The bank behind a Ray actor: takes and gives numpy arrays (what travels over the wire), checks their
    values, and counts what it serves, for metrics and tests."""

    def __init__(self, cfg: PairingConfig, metrics: Metrics, seed: int = 0):
        self.bank = PairingBank(cfg, seed)
        self.metrics = metrics  # Ray's
        self.delay_s = 0.0
        self.pushes = self.queries = self.late_calls = 0
        self.quickest: dict[int, float] = {}  # per rank, the shortest lag from a call's sending to its start
        self._class_iou_set = 0.0  # when the per-class IoU gauges were last set
        self.latencies = deque(maxlen=1000)
        self.staleness = deque(maxlen=1000)

    def ready(self) -> bool:
        return True

    def push(self, embeddings: np.ndarray, images: np.ndarray, masks: np.ndarray, rank: int, step: int,
             shares: Optional[np.ndarray] = None, overlap: Optional[np.ndarray] = None) -> None:
        self.bank.push(_checked("embeddings", embeddings), _checked("images", images), _checked("masks", masks),
                       rank, step, _checked("shares", shares), _checked("overlap", overlap))
        self.pushes += 1
        self.metrics.set("pairing_bank_size", self.bank.size)
        if time.monotonic() - self._class_iou_set >= 1.0:  # a gauge per class: once a second
            self._class_iou_set = time.monotonic()
            set_class_iou(self.metrics, self.bank)

    def query(self, embeddings: np.ndarray, step: int, shares: Optional[np.ndarray] = None) -> Optional[dict]:
        """The bank's answer as numpy arrays, or None: pair in-batch."""
        started = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        answer = self.bank.query(_checked("embeddings", embeddings), step, _checked("shares", shares))
        self.queries += 1
        self.latencies.append(time.perf_counter() - started)
        if answer is None:
            return None
        answer = {name: value.numpy() for name, value in answer.items()}
        self.staleness.extend(answer["staleness"].tolist())
        self.metrics.set("pairing_staleness_steps", float(answer["staleness"].mean()))
        return answer

    @ray.method(num_returns=2)
    def exchange(self, query: "WireQuery", labeled_images: Optional[tuple] = None,
                 labeled: Optional["WireLabeled"] = None):
        """A worker's one call a step (`exchange_args`): push its previous labeled batch, then answer its query.
        One call instead of two halves what Ray costs the service and the worker per step. The answer comes
        as two objects, the images and the rest ((None, None): pair in-batch; `read_answer`). A call that waited
        in the actor's queue past the deadline is dropped whole, its worker has paired in-batch already: a busy
        service sheds its backlog instead of working through it (Ray runs a cancelled actor call that was
        queued)."""
        if self._waited(query.rank, query.sent) > self.bank.cfg.deadline_s:
            self.late_calls += 1
            return None, None
        if labeled is not None:
            self.push(_unwire(labeled.embeddings), _unwire(labeled_images), _unwire(labeled.masks), query.rank,
                      labeled.step, _unwire(labeled.shares), _unwire(labeled.overlap))
        answer = self.query(_unwire(query.embeddings), query.step, _unwire(query.shares))
        if answer is None:
            return None, None
        return _wire(answer["images"]), WireAnswer(_wire(answer["masks"]), answer["index"].tolist(),
                                                   answer["ranks"].tolist(), answer["staleness"].tolist())

    def _waited(self, rank: int, sent: float) -> float:
        """How much longer than the quickest call from this rank so far a call took to start: the clocks of
        the worker's and the service's nodes may differ by a fixed offset, which the quickest call holds too.
        (A rank whose first calls all found the service busy has its lateness underestimated until one is
        quick.)"""
        lag = time.time() - sent
        self.quickest[rank] = min(self.quickest.get(rank, lag), lag)
        return lag - self.quickest[rank]

    def inject_delay(self, seconds: float) -> None:
        """Fault injection for tests and drills: every query sleeps this long first."""
        self.delay_s = seconds

    def stats(self) -> dict:
        latencies = sorted(self.latencies)
        return {"pid": os.getpid(), "cpu_s": time.process_time(), "bank_size": self.bank.size, "pushes": self.pushes, "queries": self.queries,
                "late_calls": self.late_calls,
                "query_p50_s": latencies[len(latencies) // 2] if latencies else 0.0,
                "staleness_mean": float(np.mean(self.staleness)) if self.staleness else 0.0}


def set_class_iou(metrics: Metrics, bank: PairingBank) -> None:
    """The bank's running per-class IoU as a gauge per class (a read of the bank: not every step)."""
    need = bank.need()
    if need is not None:
        for c, value in enumerate((1 - need).tolist()):
            metrics.set("pairing_class_iou", value, **{"class": c})


def _checked(name: str, array: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    """An array from the wire as a tensor, once its values are known to be numbers (the bank checks shapes)."""
    if array is None:
        return None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"pairing: {name} must be a numpy array, got {type(array).__name__}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"pairing: {name} contain NaN or infinity")
    return torch.from_numpy(array.copy())  # Ray hands in read-only arrays


def start_service(pairing_cfg, out: str, seed: int = 0):
    """Create the run's service actor (or find the one a previous driver of the same run left)."""
    actor = ray.remote(PairingService).options(
        name=service_name(out), namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
        max_restarts=pairing_cfg.max_restarts, lifetime=None,
    ).remote(pairing_cfg, Metrics("ray", run=run_label(out)), seed)
    ray.get(actor.ready.remote(), timeout=120)
    return actor


# The exchange's wire format. Arrays travel as (bytes, dtype, shape): Ray moves bytes for about half a
# millisecond less a call on each side than a numpy array (pickle 5's out-of-band buffers). The images go as
# an argument and a return value of their own, so that each object stays under the size that Ray inlines into
# the call and its reply (100 KiB) at the CPU configs' size; one object of everything would go through the
# object store, a millisecond or more a call.

def _wire(array: Optional[np.ndarray]) -> Optional[tuple]:
    return None if array is None else (array.tobytes(), array.dtype.str, array.shape)


def _unwire(wired: Optional[tuple]) -> Optional[np.ndarray]:
    return None if wired is None else np.frombuffer(wired[0], np.dtype(wired[1])).reshape(wired[2])


class LabeledBatch(NamedTuple):
    """A worker's labeled batch for the bank, as numpy arrays (uint8 pixels)."""

    embeddings: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    step: int
    shares: Optional[np.ndarray]
    overlap: Optional[np.ndarray]


class WireQuery(NamedTuple):
    embeddings: tuple
    step: int
    shares: Optional[tuple]
    rank: int
    sent: float  # time.time() on the worker's node


class WireLabeled(NamedTuple):  # a LabeledBatch but its images, which travel as an argument of their own
    embeddings: tuple
    masks: tuple
    step: int
    shares: Optional[tuple]
    overlap: Optional[tuple]


class WireAnswer(NamedTuple):  # the answer but its images, a return value of their own
    masks: tuple
    index: list
    ranks: list
    staleness: list


def exchange_args(embeddings: np.ndarray, step: int, shares: Optional[np.ndarray], rank: int,
                  labeled: Optional[LabeledBatch]) -> tuple:
    """`PairingService.exchange`'s arguments: the query (sent now, by this node's clock) and the labeled
    batch, if any: (WireQuery, images, WireLabeled)."""
    query = WireQuery(_wire(embeddings), step, _wire(shares), rank, time.time())
    if labeled is None:
        return query, None, None
    return query, _wire(labeled.images), WireLabeled(_wire(labeled.embeddings), _wire(labeled.masks), labeled.step,
                                                     _wire(labeled.shares), _wire(labeled.overlap))


def read_answer(images: Optional[tuple], rest: Optional[WireAnswer]) -> Optional[dict]:
    """An exchange's answer as query() gives it, or None: pair in-batch."""
    if rest is None:
        return None
    return {"images": _unwire(images), "masks": _unwire(rest.masks), "index": np.array(rest.index),
            "ranks": np.array(rest.ranks), "staleness": np.array(rest.staleness)}
