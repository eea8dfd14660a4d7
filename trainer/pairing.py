"""The pairing service: one named Ray actor per run holds a ring bank of recent labeled samples pushed by
every worker, and answers each unlabeled embedding with its best-matching labeled sample (image, mask).

Workers talk to it through `PairingClient`: one call a step (`exchange`), which carries the worker's
previous labeled batch for the bank and its unlabeled embeddings, and waits at most `pairing.deadline_s` for
the answer. A late or failed answer makes the worker pair in-batch for that step and count a fallback (the
service drops a call that waited past the deadline, so it never works through a backlog), so training never
waits longer than the deadline and never dies because of the service. A crashed actor is restarted by Ray
(`pairing.max_restarts`) with an empty bank that refills from new pushes; workers keep their handle.
Outside Ray (single-process runs), and with `pairing.mode: worker`, the same service object lives in the
worker's process, and its bank takes every rank's labeled batches at each step's end: the same bank on every
rank at any world size, checkpointed and rebuilt on resume (`PairingClient`).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from typing import Optional

import numpy as np
import ray
import torch

from shards.augment import MEAN, STD
from shards.errors import BadInput, BankFailure

from .collectives import all_gather, all_reduce
from .config import PairingConfig
from .guidedmix import CLASS_CRITERIA, class_need, pair
from .metrics import Metrics, run_label

log = logging.getLogger("guidedmix.pairing")

NAMESPACE = "guidedmix"
WARN_EVERY_S = 60.0  # a service that stopped answering: one warning a minute, not one a query
# each report's weight against the running per-class score: about the last hundred pushes count
OVERLAP_DECAY = 0.99


def service_name(out: str) -> str:
    """One service per run: the name follows the run's --out, so every worker (and a restarted driver)
    finds the same actor."""
    return "guidedmix-pairing-" + hashlib.sha256(out.encode()).hexdigest()[:12]


class PairingBank:
    """A bounded ring of the most recent labeled samples: L2-normalised embeddings (float32), images
    (uint8, 3 x H x W), masks (uint8, H x W) and their class shares (float32, C), with the rank and step that
    pushed each; and the running per-class intersection and union that workers report (`need`)."""

    def __init__(self, cfg: PairingConfig, seed: int = 0):
        self.cfg, self.capacity = cfg, cfg.bank_size
        capacity = cfg.bank_size
        self.generator = torch.Generator().manual_seed(seed)
        self.size = self.pushed = 0  # the ring's next slot is pushed % capacity
        self.embeddings = self.images = self.masks = self.shares = None  # allocated by the first push
        self.overlap = None  # 2 x C decayed sums of the reported intersections and unions
        self.steps = np.zeros(capacity, np.int64)
        self.ranks = np.zeros(capacity, np.int32)

    def _check_embeddings(self, embeddings) -> torch.Tensor:
        if not isinstance(embeddings, np.ndarray) or embeddings.dtype != np.float32 or embeddings.ndim != 2:
            raise ValueError(f"pairing: embeddings must be a 2-D float32 array, got "
                             f"{getattr(embeddings, 'dtype', type(embeddings).__name__)} "
                             f"{getattr(embeddings, 'shape', '')}")
        if self.embeddings is not None and embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"pairing: embeddings have width {embeddings.shape[1]}, the bank holds width "
                             f"{self.embeddings.shape[1]}")
        if not np.isfinite(embeddings).all():
            raise ValueError("pairing: embeddings contain NaN or infinity")
        return torch.nn.functional.normalize(torch.from_numpy(embeddings.copy()), dim=1)  # Ray hands in read-only arrays

    def push(self, embeddings: np.ndarray, images: np.ndarray, masks: np.ndarray, rank: int, step: int,
             shares: Optional[np.ndarray] = None, overlap: Optional[np.ndarray] = None) -> None:
        """Add labeled samples (`shares`: N x C class shares of their masks, for the class criteria) and fold
        in the pushing worker's per-class `overlap` (2 x C intersection and union) on its labeled batch."""
        vectors = self._check_embeddings(embeddings)
        n = vectors.shape[0]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[1] != 3:
            raise ValueError(f"pairing: images must be uint8 N x 3 x H x W with N = {n}, got "
                             f"{images.dtype} {images.shape}")
        if masks.dtype != np.uint8 or masks.shape != (n, *images.shape[2:]):
            raise ValueError(f"pairing: masks must be uint8 {(n, *images.shape[2:])}, got {masks.dtype} {masks.shape}")
        if self.embeddings is None:
            self.embeddings = torch.zeros(self.capacity, vectors.shape[1])
            self.images = np.zeros((self.capacity, *images.shape[1:]), np.uint8)
            self.masks = np.zeros((self.capacity, *masks.shape[1:]), np.uint8)
        elif images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"pairing: images are {images.shape[2:]}, the bank holds {self.images.shape[2:]}")
        shares = self._check_classes("shares", shares, n)
        overlap = self._check_classes("overlap", overlap, 2)
        if shares is not None and self.shares is None:
            self.shares = torch.zeros(self.capacity, shares.shape[1])
        if overlap is not None:
            self.overlap = overlap if self.overlap is None else OVERLAP_DECAY * self.overlap + overlap
        slots = self._slots(self.pushed, n)  # a ring: the oldest entries give way
        kept = slice(n - len(slots), n)
        self.embeddings[slots] = vectors[kept]
        self.put_pixels(self.pushed, images, masks)
        if shares is not None:
            self.shares[slots] = shares[kept]
        self.steps[slots], self.ranks[slots] = step, rank
        self.pushed += n
        self.size = min(self.pushed, self.capacity)

    def _slots(self, first: int, n: int) -> np.ndarray:
        """Where the samples `first` .. `first + n - 1` in push order live (the latest of one slot wins)."""
        return np.arange(first, first + n)[-self.capacity:] % self.capacity

    def put_pixels(self, first: int, images: np.ndarray, masks: np.ndarray) -> None:
        """Store the images and masks of the samples `first` ... in push order: push's, and a rebuild's
        (`load_state_dict` leaves the pixels out, the stream reads them again)."""
        slots = self._slots(first, len(images))
        self.images[slots], self.masks[slots] = images[-len(slots):], masks[-len(slots):]

    def state_dict(self) -> dict:
        """What the bank learnt from the model (embeddings, the running per-class overlap) and where its ring
        stands; the pixels stay out: they are the stream's, read again on resume (`put_pixels`)."""
        return {"capacity": self.capacity, "pushed": self.pushed, "embeddings": self.embeddings,
                "shares": self.shares, "overlap": self.overlap, "steps": torch.from_numpy(self.steps.copy()),
                "ranks": torch.from_numpy(self.ranks.copy()),
                "pixels": None if self.images is None else (self.images.shape[1:], self.masks.shape[1:])}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"pairing.bank_size: the checkpoint's bank holds {state['capacity']}, "
                             f"the config {self.capacity}")
        self.pushed, self.size = state["pushed"], min(state["pushed"], self.capacity)
        self.embeddings, self.shares, self.overlap = state["embeddings"], state["shares"], state["overlap"]
        self.steps, self.ranks = state["steps"].numpy(), state["ranks"].numpy()
        if state["pixels"] is not None:
            self.images = np.zeros((self.capacity, *state["pixels"][0]), np.uint8)
            self.masks = np.zeros((self.capacity, *state["pixels"][1]), np.uint8)

    def _check_classes(self, name: str, value: Optional[np.ndarray], rows: int) -> Optional[torch.Tensor]:
        """A rows x C float32 array of per-class figures as a tensor; C is the bank's once it holds one."""
        if value is None:
            return None
        known = self.shares if self.shares is not None else self.overlap
        width = known.shape[1] if known is not None else None
        if (not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.ndim != 2 or value.shape[0] != rows
                or width not in (None, value.shape[1]) or not np.isfinite(value).all()):
            raise ValueError(f"pairing: {name} must be a finite float32 array of {rows} x {width or 'C'} per-class "
                             f"figures, got {getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}")
        return torch.from_numpy(value.copy())

    def need(self) -> Optional[torch.Tensor]:
        """Per class, 1 - the running IoU the workers report (1 where a class has not been seen)."""
        return None if self.overlap is None else class_need(self.overlap)

    def query(self, embeddings: np.ndarray, step: int, shares: Optional[np.ndarray] = None,
              generator: Optional[torch.Generator] = None) -> Optional[dict]:
        """The best-matching entry for each embedding (`shares`: the queries' predicted class shares, for
        `complement`): images, masks, the pushing ranks and staleness (steps since insert). None while the bank
        is empty, or while a class criterion lacks what it scores (no shares pushed or no need reported yet).
        Draws with `generator` (a micro-batch's), else the bank's own."""
        vectors = self._check_embeddings(embeddings)
        shares = self._check_classes("shares", shares, vectors.shape[0])
        if self.size == 0:
            return None
        candidate_shares = None if self.shares is None else self.shares[:self.size]
        need = self.need()
        if self.cfg.similarity in CLASS_CRITERIA and (
                candidate_shares is None or (shares if self.cfg.similarity == "complement" else need) is None):
            return None
        index = pair(vectors, self.embeddings[:self.size], self.cfg.similarity, self.cfg.topk, self.cfg.temperature,
                     self.generator if generator is None else generator, shares, candidate_shares, need).cpu().numpy()
        return {"images": self.images[index], "masks": self.masks[index], "index": index,
                "ranks": self.ranks[index], "staleness": np.maximum(step - self.steps[index], 0)}


class PairingService:
    """The bank behind a Ray actor (or in-process): counts what it serves, for metrics and tests."""

    def __init__(self, cfg: PairingConfig, metrics: Metrics, seed: int = 0):
        self.bank = PairingBank(cfg, seed)
        self.metrics = metrics  # in-process: the worker's; the actor: Ray's
        self.delay_s = 0.0
        self.pushes = self.queries = self.late_calls = 0
        self.quickest: dict[int, float] = {}  # per rank, the shortest lag from a call's sending to its start
        self._class_iou_set = 0.0  # when the per-class IoU gauges were last set
        self.latencies = deque(maxlen=1000)
        self.staleness = deque(maxlen=1000)

    def ready(self) -> bool:
        return True

    def push(self, embeddings, images, masks, rank: int, step: int, shares=None, overlap=None) -> None:
        self.bank.push(embeddings, images, masks, rank, step, shares, overlap)
        self.pushes += 1
        self.metrics.set("pairing_bank_size", self.bank.size)
        need = self.bank.need()
        if need is not None and time.monotonic() - self._class_iou_set >= 1.0:  # a gauge per class: once a second
            self._class_iou_set = time.monotonic()
            for c, value in enumerate((1 - need).tolist()):
                self.metrics.set("pairing_class_iou", value, **{"class": c})

    def query(self, embeddings, step: int, shares=None, generator: Optional[torch.Generator] = None) -> Optional[dict]:
        started = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        answer = self.bank.query(embeddings, step, shares, generator)
        self.queries += 1
        self.latencies.append(time.perf_counter() - started)
        if answer is not None:
            self.staleness.extend(answer["staleness"].tolist())
            self.metrics.set("pairing_staleness_steps", float(answer["staleness"].mean()))
        return answer

    @ray.method(num_returns=2)
    def exchange(self, query: tuple, labeled_images: Optional[tuple] = None, labeled: Optional[tuple] = None):
        """A worker's one call a step (`exchange_args`): push its previous labeled batch, then answer its query.
        One call instead of two halves what Ray costs the service and the worker per step. The answer comes
        as two objects, the images and the rest ((None, None): pair in-batch; `read_answer`). A call that waited
        in the actor's queue past the deadline is dropped whole, its worker has paired in-batch already: a busy
        service sheds its backlog instead of working through it (Ray runs a cancelled actor call that was
        queued)."""
        embeddings, step, shares, rank, sent = query
        if self._waited(rank, sent) > self.bank.cfg.deadline_s:
            self.late_calls += 1
            return None, None
        if labeled is not None:
            emb, masks, pushed_step, pushed_shares, overlap = labeled
            self.push(_unwire(emb), _unwire(labeled_images), _unwire(masks), rank, pushed_step,
                      _unwire(pushed_shares), _unwire(overlap))
        answer = self.query(_unwire(embeddings), step, _unwire(shares))
        if answer is None:
            return None, None
        return _wire(answer["images"]), (_wire(answer["masks"]), answer["index"].tolist(),
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


def start_service(pairing_cfg, out: str, seed: int = 0):
    """Create the run's service actor (or find the one a previous driver of the same run left)."""
    actor = ray.remote(PairingService).options(
        name=service_name(out), namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
        max_restarts=pairing_cfg.max_restarts, lifetime=None,
    ).remote(pairing_cfg, Metrics("ray", run=run_label(out)), seed)
    ray.get(actor.ready.remote(), timeout=120)
    return actor


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised float images (B x 3 x H x W, any device) as the uint8 pixels the bank stores, on their device."""
    mean = torch.as_tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


def mask_to_uint8(masks: torch.Tensor) -> torch.Tensor:
    """Class-id masks as the bank stores them: one byte a pixel (255 stays the ignore index)."""
    return masks.clamp(0, 255).to(torch.uint8)


def from_uint8(images: np.ndarray, device) -> torch.Tensor:
    mean = torch.as_tensor(MEAN).view(1, 3, 1, 1)
    std = torch.as_tensor(STD).view(1, 3, 1, 1)
    return ((torch.tensor(images).float() - mean) / std).to(device)  # a copy: Ray's arrays are read-only


@contextlib.contextmanager
def bank_failures(call: str, step: int):
    """A worker bank's error as one BankFailure line (bad input stays bad input); the traceback at DEBUG."""
    try:
        yield
    except BadInput:
        raise
    except Exception as e:
        log.debug("pairing bank %s at step %d", call, step, exc_info=True)
        raise BankFailure(f"pairing bank: {call} at step {step} failed ({type(e).__name__}: {str(e)[:200]}); a bug, "
                          "not a reason to pair in-batch (-v shows the traceback)") from e


class PairingClient:
    """A worker's side: sends its labeled batches, asks for references under a deadline, falls back.

    A bank in the worker's process (`local`) is the same on every rank at any world size and survives a
    resume: it takes each step's whole global labeled batch at the step's end (every rank's, gathered in their
    places' order, with the step's summed per-class overlap), partners are drawn with the micro-batch's
    generator, and a checkpoint keeps its `state_dict` while its pixels are read again from the stream
    (`put_pixels`)."""

    def __init__(self, cfg: PairingConfig, out: str, rank: int, in_ray: bool, metrics: Metrics, seed: int = 0):
        self.cfg, self.rank, self.name, self.metrics = cfg, rank, service_name(out), metrics
        # outside Ray, or by choice (`mode: worker`), the bank lives in this process and holds its batches only
        self.local = PairingService(cfg, metrics, seed) if cfg.mode == "worker" or not in_ray else None
        self.actor = None
        self.outbox: Optional[tuple] = None  # the labeled batch that goes with the next query
        self.pending: list[tuple] = []  # this step's labeled micro-batches, for the local bank at its end
        self.queries = self.answered = self.fallbacks = self.dropped_pushes = 0
        self._next_lookup = self._next_warning = 0.0
        for name in ("pairing_fallbacks_total", "pairing_query_seconds"):
            metrics.declare(name)

    def _handle(self):
        """The actor's handle, looked up by name (at most once a second while it cannot be found)."""
        if self.actor is None and time.monotonic() >= self._next_lookup:
            try:
                self.actor = ray.get_actor(self.name, namespace=NAMESPACE)
            except ValueError:
                self._next_lookup = time.monotonic() + 1.0
                log.warning("pairing: service %s not found; pairing in-batch", self.name)
        return self.actor

    def push(self, embeddings: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, step: int,
             shares: Optional[torch.Tensor] = None, overlap: Optional[torch.Tensor] = None) -> None:
        """Give the bank labeled samples (with their masks' class `shares`) and this batch's per-class
        `overlap`: to the local bank at the step's end (`end_step`), else with the next query (a step later; one
        waiting at most)."""
        if self.local is not None:
            self.pending.append((embeddings.float(), to_uint8(images), mask_to_uint8(masks),
                                 None if shares is None else shares.float(), None if overlap is None else overlap.float()))
            return
        batch = (embeddings.float().cpu().numpy(), to_uint8(images).cpu().numpy(),
                 mask_to_uint8(masks).cpu().numpy(), self.rank, step, _numpy(shares), _numpy(overlap))
        if self.outbox is not None:
            self.dropped_pushes += 1  # no query went out since the last push: the older batch gives way
        self.outbox = batch

    def end_step(self, step: int) -> None:
        """The local bank takes the step's labeled samples of every rank and their summed overlap."""
        if self.local is None or not self.pending:
            return
        embeddings, images, masks, shares, overlaps = zip(*self.pending)
        self.pending = []
        gathered = [all_gather(torch.cat(part)).cpu().numpy() for part in (embeddings, images, masks)]
        shares = None if shares[0] is None else all_gather(torch.cat(shares))
        overlap = None if overlaps[0] is None else all_reduce(sum(overlaps))
        with bank_failures("push", step):
            self.local.push(*gathered, self.rank, step, _numpy(shares), _numpy(overlap))

    def state_dict(self) -> Optional[dict]:
        """The local bank's state, pixels aside (None: the bank is the service's)."""
        return None if self.local is None else self.local.bank.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.local.bank.load_state_dict(state)

    def put_pixels(self, first: int, images: torch.Tensor, masks: torch.Tensor) -> None:
        """A resume's rebuild of the local bank: the stream's images and masks of samples `first` ... in push
        order, as `push` converts them."""
        self.local.bank.put_pixels(first, to_uint8(images).cpu().numpy(),
                                   mask_to_uint8(masks).cpu().numpy())

    def query(self, embeddings: torch.Tensor, shares: Optional[torch.Tensor], step: int, device,
              generator: Optional[torch.Generator] = None):
        """(images, masks) of the best-matching bank entries for unlabeled embeddings (and the class shares of
        their predictions), or None: pair in-batch this step. A local bank draws with `generator`."""
        self.queries += 1
        started = time.perf_counter()
        answer = self._ask(embeddings.float().cpu().numpy(), step, _numpy(shares), generator)
        self.metrics.observe("pairing_query_seconds", time.perf_counter() - started)
        if answer is None:
            self.fallbacks += 1
            self.metrics.inc("pairing_fallbacks_total")
            return None
        self.answered += 1
        masks = torch.from_numpy(answer["masks"].astype(np.int64))
        return from_uint8(answer["images"], device), masks.to(device)

    def _ask(self, embeddings: np.ndarray, step: int, shares: Optional[np.ndarray], generator):
        if self.local is not None:  # a failure here is a bug, not a reason to pair in-batch: it stops the run
            with bank_failures("query", step):
                return self.local.query(embeddings, step, shares, generator)
        actor = self._handle()
        if actor is None:
            return None
        labeled, self.outbox = self.outbox, None
        try:
            refs = actor.exchange.remote(*exchange_args(embeddings, step, shares, self.rank, labeled))
            return read_answer(*ray.get(refs, timeout=self.cfg.deadline_s))  # the service drops a late call
        except Exception as e:  # a late, dead, restarting or confused service: never stop training
            if time.monotonic() >= self._next_warning:  # at most one line a minute, with the count since
                log.warning("pairing: the service did not answer at step %d (%s: %s); %d queries paired in-batch "
                            "so far", step, type(e).__name__, str(e)[:200], self.fallbacks + 1)
                self._next_warning = time.monotonic() + WARN_EVERY_S
            return None

    def stats(self) -> dict:
        return {"queries": self.queries, "answered": self.answered, "fallbacks": self.fallbacks,
                "dropped_pushes": self.dropped_pushes}


# The exchange's wire format. Arrays travel as (bytes, dtype, shape): Ray moves bytes for about half a
# millisecond less a call on each side than a numpy array (pickle 5's out-of-band buffers). The images go as
# an argument and a return value of their own, so that each object stays under the size that Ray inlines into
# the call and its reply (100 KiB) at the CPU configs' size; one object of everything would go through the
# object store, a millisecond or more a call.

def _wire(array: Optional[np.ndarray]) -> Optional[tuple]:
    return None if array is None else (array.tobytes(), array.dtype.str, array.shape)


def _unwire(wired: Optional[tuple]) -> Optional[np.ndarray]:
    return None if wired is None else np.frombuffer(wired[0], np.dtype(wired[1])).reshape(wired[2])


def exchange_args(embeddings: np.ndarray, step: int, shares: Optional[np.ndarray], rank: int,
                  labeled: Optional[tuple]) -> tuple:
    """`PairingService.exchange`'s arguments: the query (sent now, by this node's clock) and `labeled`, push's
    arguments (embeddings, images, masks, rank, step, shares, overlap) or None."""
    query = (_wire(embeddings), step, _wire(shares), rank, time.time())
    if labeled is None:
        return query, None, None
    emb, images, masks, _, pushed_step, pushed_shares, overlap = labeled
    return query, _wire(images), (_wire(emb), _wire(masks), pushed_step, _wire(pushed_shares), _wire(overlap))


def read_answer(images: Optional[tuple], rest: Optional[tuple]) -> Optional[dict]:
    """An exchange's answer as query() gives it, or None: pair in-batch."""
    if rest is None:
        return None
    masks, index, ranks, staleness = rest
    return {"images": _unwire(images), "masks": _unwire(masks), "index": np.array(index),
            "ranks": np.array(ranks), "staleness": np.array(staleness)}


def _numpy(values: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if values is None else values.detach().float().cpu().numpy()
