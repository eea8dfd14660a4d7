"""What a worker pairs through: its own bank (`pairing.mode: worker`, the default, and every run outside Ray) or
the service's, behind one client that counts what it asks and what comes back."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import numpy as np
import ray
import torch

from shards.errors import BadInput, BankFailure

from ..collectives import all_gather, all_reduce
from ..config import PairingConfig
from ..metrics import Metrics
from .bank import PairingBank, from_uint8, mask_to_uint8, to_uint8
from .service import NAMESPACE, LabeledBatch, exchange_args, read_answer, service_name, set_class_iou

log = logging.getLogger("guidedmix.pairing")

WARN_EVERY_S = 60.0  # a service that stopped answering: one warning a minute, not one a query


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
    (`put_pixels`). It lives on the worker's `device`: a step's pushes, queries and answers read nothing back
    to the host; its gauges are set when the step logs (`stats`)."""

    def __init__(self, cfg: PairingConfig, out: str, rank: int, in_ray: bool, metrics: Metrics, seed: int = 0,
                 device="cpu"):
        self.cfg, self.rank, self.name, self.metrics = cfg, rank, service_name(out), metrics
        # outside Ray, or by choice (`mode: worker`), the bank lives in this process and holds its batches only
        self.local = PairingBank(cfg, seed, device) if cfg.mode == "worker" or not in_ray else None
        self.staleness = torch.zeros((), dtype=torch.long, device=device)  # the local bank's answers' summed
        self.staleness_count = 0  # and how many, since the last log step
        self.actor = None
        self.outbox: Optional[LabeledBatch] = None  # the labeled batch that goes with the next query
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
        batch = LabeledBatch(embeddings.float().cpu().numpy(), to_uint8(images).cpu().numpy(),
                             mask_to_uint8(masks).cpu().numpy(), step, _numpy(shares), _numpy(overlap))
        if self.outbox is not None:
            self.dropped_pushes += 1  # no query went out since the last push: the older batch gives way
        self.outbox = batch

    def end_step(self, step: int) -> None:
        """The local bank takes the step's labeled samples of every rank and their summed overlap."""
        if self.local is None or not self.pending:
            return
        embeddings, images, masks, shares, overlaps = zip(*self.pending)
        self.pending = []
        gathered = [all_gather(torch.cat(part)) for part in (embeddings, images, masks)]
        shares = None if shares[0] is None else all_gather(torch.cat(shares))
        overlap = None if overlaps[0] is None else all_reduce(sum(overlaps))
        with bank_failures("push", step):
            self.local.push(*gathered, self.rank, step, shares, overlap)
        self.metrics.set("pairing_bank_size", self.local.size)

    def state_dict(self) -> Optional[dict]:
        """The local bank's state, pixels aside (None: the bank is the service's)."""
        return None if self.local is None else self.local.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.local.load_state_dict(state)

    def put_pixels(self, first: int, images: torch.Tensor, masks: torch.Tensor) -> None:
        """A resume's rebuild of the local bank: the stream's images and masks of samples `first` ... in push
        order, as `push` converts them."""
        self.local.put_pixels(first, to_uint8(images), mask_to_uint8(masks))

    def query(self, embeddings: torch.Tensor, shares: Optional[torch.Tensor], step: int, device,
              generator: Optional[torch.Generator] = None):
        """(images, masks) of the best-matching bank entries for unlabeled embeddings (and the class shares of
        their predictions), on `device`, or None: pair in-batch this step. A local bank draws with `generator`."""
        self.queries += 1
        started = time.perf_counter()
        answer = self._ask(embeddings.detach().float(), step, None if shares is None else shares.detach().float(),
                           generator)
        self.metrics.observe("pairing_query_seconds", time.perf_counter() - started)
        if answer is None:
            self.fallbacks += 1
            self.metrics.inc("pairing_fallbacks_total")
            return None
        self.answered += 1
        return from_uint8(answer["images"], device), answer["masks"].to(device).long()

    def _ask(self, embeddings: torch.Tensor, step: int, shares: Optional[torch.Tensor], generator) -> Optional[dict]:
        """The answer's images and masks as tensors: the local bank's on its device, the service's from the host."""
        if self.local is not None:  # a failure here is a bug, not a reason to pair in-batch: it stops the run
            with bank_failures("query", step):
                answer = self.local.query(embeddings, step, shares, generator)
            if answer is not None:
                self.staleness += answer["staleness"].sum()
                self.staleness_count += len(answer["staleness"])
            return answer
        actor = self._handle()
        if actor is None:
            return None
        labeled, self.outbox = self.outbox, None
        try:
            refs = actor.exchange.remote(*exchange_args(_numpy(embeddings), step, _numpy(shares), self.rank, labeled))
            answer = read_answer(*ray.get(refs, timeout=self.cfg.deadline_s))  # the service drops a late call
        except Exception as e:  # a late, dead, restarting or confused service: never stop training
            if time.monotonic() >= self._next_warning:  # at most one line a minute, with the count since
                log.warning("pairing: the service did not answer at step %d (%s: %s); %d queries paired in-batch "
                            "so far", step, type(e).__name__, str(e)[:200], self.fallbacks + 1)
                self._next_warning = time.monotonic() + WARN_EVERY_S
            return None
        return None if answer is None else {name: torch.tensor(answer[name]) for name in ("images", "masks")}

    def stats(self) -> dict:
        """What this worker asked and got; a local bank's gauges are set here, at a log step, where reading
        them back from the device is paid for anyway (the service sets its own)."""
        if self.local is not None:
            if self.staleness_count:
                self.metrics.set("pairing_staleness_steps", float(self.staleness) / self.staleness_count)
                self.staleness.zero_()
                self.staleness_count = 0
            set_class_iou(self.metrics, self.local)
        return {"queries": self.queries, "answered": self.answered, "fallbacks": self.fallbacks,
                "dropped_pushes": self.dropped_pushes}


def _numpy(values: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if values is None else values.detach().float().cpu().numpy()
