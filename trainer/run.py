"""What a worker's run keeps beside the model, the engine and the method (trainer/loop.py's Trainer holds one of
each): its record (steps done, history, training time, world-size changes, where it resumed from), its samples
(how many it consumed, and their ledger) with what a checkpoint holds of both, and its log step, the one place a
step's values are read back from the device."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import evaluate
from .collectives import all_reduce
from .metrics import Metrics
from .ssl import StepOutput

log = logging.getLogger("guidedmix.train")


@dataclass
class RunRecord:
    """How far the run is and how it got there; the engine's client state in a checkpoint."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_before: float = 0.0  # training seconds of earlier attempts
    resumed_from: Optional[str] = None
    resizes: list[dict] = field(default_factory=list)  # {step, from, to}: each time the group came back resized
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        """Training seconds of this run, earlier attempts included."""
        return self.elapsed_before + time.monotonic() - self.started

    def state(self, world_size: int) -> dict:
        return {"step": self.step, "history": self.history, "elapsed": self.elapsed(), "world_size": world_size,
                "resizes": self.resizes}

    def restore(self, state: dict, name: str, world_size: int, ranks_before: int) -> int:
        """The record of checkpoint `name` (written by `ranks_before` ranks where it does not say); returns the
        world size that wrote it, and records the resize if this one differs."""
        self.step, self.history, self.elapsed_before = state["step"], state["history"], state["elapsed"]
        self.resumed_from, self.resizes = name, state.get("resizes", [])
        before = state.get("world_size", ranks_before)
        if before != world_size:
            self.resizes.append({"step": self.step, "from": before, "to": world_size})
        return before

    def best_miou(self) -> Optional[float]:
        mious = [h["miou"] for h in self.history if "miou" in h]
        return max(mious) if mious else None


class SampleLedger:
    """The samples this rank trained on, by split: how many (a corrupt sample's stand-in is not one), and with
    `train.ledger` each one's (epoch, key), which the chaos tests hold against the planned order. Kept in the
    rank's checkpoint state; on a resume at a smaller world size rank 0 takes over the departed ranks'."""

    def __init__(self, splits, keys: bool):
        self.consumed = {s: 0 for s in splits}
        self.keys = {s: [] for s in splits} if keys else None

    def add(self, split: str, batch: dict) -> None:
        self.consumed[split] += len(batch["keys"])
        if self.keys is not None:
            self.keys[split] += [[batch["epoch"], k] for k in batch["keys"]]

    def state(self) -> dict:
        return {"consumed": dict(self.consumed), **({"ledger": self.keys} if self.keys is not None else {})}

    def summed(self, skipped: int, device) -> tuple[dict, int]:
        """(samples consumed by split, bad samples skipped) over every rank."""
        splits = list(self.consumed)
        counts = all_reduce(torch.tensor([skipped, *(self.consumed[s] for s in splits)], device=device))
        return dict(zip(splits, counts[1:].tolist())), int(counts[0])

    def restore(self, states: dict[int, dict], rank: int, world_size: int, ranks_before: int) -> None:
        for r in [rank] + (list(range(world_size, ranks_before)) if rank == 0 else []):
            for split, count in states.get(r, {}).get("consumed", {}).items():
                self.consumed[split] += count
            for split, entries in states.get(r, {}).get("ledger", {}).items() if self.keys is not None else ():
                self.keys[split] += entries


def run_summary(cfg, run: RunRecord, per_class_iou: dict, miou: float, consumed: dict, skipped: int,
                world_size: int, method_stats: dict) -> dict:
    """summary.json: the run's result, what it consumed and skipped over every rank, how it ran; the method's
    stats are rank 0's since its last (re)start, the pseudo masks its last log interval's."""
    summary = {
        "method": cfg.train.method, "miou": miou, "per_class_iou": per_class_iou,
        "steps": run.step, "samples_seen": sum(consumed.values()), "samples_by_split": consumed,
        "skipped_samples": skipped, "wall_seconds": round(run.elapsed(), 2), "workers": world_size,
        "resizes": run.resizes, "engine": cfg.train.engine, "resumed_from": run.resumed_from,
        "config_hash": cfg.digest(), "config": cfg.public_dict(), **method_stats,
    }
    last_log = [h for h in run.history if "pseudo_coverage" in h]
    if last_log:
        summary["pseudo_masks"] = {k: v for k, v in last_log[-1].items() if "pseudo" in k or k == "true_class_freq"}
    return summary


class _Progress:
    def __init__(self, total: int, start: int, images_per_step: int):
        self.total, self.start, self.images = total, start, images_per_step
        self.t0 = time.monotonic()

    def line(self, step: int, record: dict) -> str:
        done = step - self.start
        elapsed = time.monotonic() - self.t0
        rate = done * self.images / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / max(done, 1)
        losses = " ".join(f"{k} {record[k] + 0.0:.3f}" for k in ("sup", "unsup", "mix") if k in record)  # no -0.000
        pseudo = f"pseudo {record['pseudo_coverage']:.0%} px" if "pseudo_coverage" in record else ""
        if "pseudo_accuracy" in record:
            pseudo += f", {record['pseudo_accuracy']:.0%} right"
        return (f"step {step}/{self.total} | loss {record['loss']:.3f} ({losses}) | "
                f"{pseudo + ' | ' if pseudo else ''}lr {record['lr']:.2e} | {rate:.1f} img/s | "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


class StepLog:
    """The log step: the step's losses read back from the device (every rank's mean, comparable between runs at
    any world size), the pseudo masks since the last log step, a history record and its metrics; rank 0 also
    writes the progress line (with rate and ETA since `restart`)."""

    def __init__(self, metrics: Metrics, classes: list[str], total_steps: int, images_per_step: int):
        self.metrics, self.classes, self.total, self.images = metrics, classes, total_steps, images_per_step
        self.pseudo_score = evaluate.PseudoMaskScore(len(classes))  # watches for collapse between log lines
        self.restart(0)

    def restart(self, step: int) -> None:
        self.progress = _Progress(self.total, step, self.images)

    def record(self, step: int, out: StepOutput, world_size: int, **numbers) -> dict:
        """The record of `step` (`numbers`: lr, the method's stats, ...), its metrics set."""
        names = [k for k, v in out.parts.items() if torch.is_tensor(v)]
        losses = all_reduce(torch.stack([out.loss.detach(), *(out.parts[k] for k in names)]).float())
        losses = losses.cpu() / world_size
        record = {"step": step, "loss": float(losses[0]), **{k: float(v) for k, v in out.parts.items()},
                  **{k: float(v) for k, v in zip(names, losses[1:])}}
        for name, value in numbers.items():
            record.update({f"{name}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
        record.update(self.pseudo_score.summary())
        self.pseudo_score.reset()
        m = self.metrics
        m.set("learning_rate", record["lr"])
        m.set("loss", record["loss"], part="total")
        for part in ("sup", "unsup", "mix"):
            if part in record:
                m.set("loss", record[part], part=part)
        for name in ("coverage", "accuracy"):
            if f"pseudo_{name}" in record:
                m.set(f"pseudo_mask_{name}", record[f"pseudo_{name}"])
        if record.get("pseudo_coverage"):  # shares of nothing claimed are no shares
            for key, metric in (("pseudo_class_freq", "pseudo_class_share"), ("true_class_freq", "true_class_share")):
                for name, share in zip(self.classes, record.get(key, ())):
                    m.set(metric, share, **{"class": name})
        return record

    def line(self, step: int, record: dict) -> None:
        log.info(self.progress.line(step, record))
