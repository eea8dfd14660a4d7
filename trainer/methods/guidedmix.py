"""`train.method: guidedmix`: the loss of trainer/guidedmix.py with what it needs around it during training:
the EMA teacher (`guidedmix.teacher: ema`) and the pairing client (`guidedmix.pairing.mode`: the worker's own
bank, the default, or the service), with their state in checkpoints: the teacher's weights and the worker
bank's entries, whose pixels a resume reads again from the labeled stream."""
from __future__ import annotations

import copy
import functools
import logging

from .. import collectives, guidedmix
from ..pairing import PairingClient
from . import Method

log = logging.getLogger("guidedmix.train")


class GuidedMix(Method):
    parts = ("teacher", "pairing-bank", "thresholds")

    def __init__(self, cfg, model, ctx, metrics, num_classes):
        super().__init__(cfg, model, ctx, metrics, num_classes)
        gm = self.gm = cfg.guidedmix
        self.teacher = copy.deepcopy(model).to(ctx.device).eval() if gm.teacher == "ema" else None
        self.thresholds = None
        if gm.threshold == "adaptive":
            self.thresholds = guidedmix.AdaptiveThresholds(num_classes, gm.threshold_momentum, ctx.device)
            self.step_confidence = 0  # this rank's sums over the step's micro-batches
        self.pairing = None
        if gm.pairing.mode in ("service", "worker"):
            self.pairing = PairingClient(gm.pairing, cfg.out, ctx.rank, ctx.in_ray, metrics, cfg.train.seed,
                                         ctx.device)

    def loss(self, model, images, y_l, step, generator):
        x_l, x_u = images["labeled"], images["unlabeled"]
        find = None
        if self.pairing is not None:
            find = functools.partial(self.pairing.query, step=step, device=self.ctx.device, generator=generator)
        class_tau = self.thresholds.per_class() if self.thresholds is not None else None
        out = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, step, self.gm, self.num_classes, self.teacher, find,
                                       generator, class_tau)
        if self.thresholds is not None:
            self.step_confidence = self.step_confidence + out.unlabeled_confidence
        if self.pairing is not None:
            self.pairing.push(out.labeled_embeddings, x_l, y_l, step, out.labeled_shares, out.labeled_overlap)
        return out

    def end_step(self, model, step):
        if self.pairing is not None:
            self.pairing.end_step(step)
        if self.teacher is not None:
            guidedmix.ema_update(self.teacher, model, self.gm.ema_decay)
        if self.thresholds is not None:  # the whole global step's pixels: the same thresholds at any world size
            self.thresholds.update(collectives.all_reduce(self.step_confidence))
            self.step_confidence = 0

    def state(self):
        parts = {}
        if self.teacher is not None:
            parts["teacher"] = self.teacher.state_dict()
        if self.thresholds is not None:
            parts["thresholds"] = self.thresholds.state_dict()
        bank = self.pairing.state_dict() if self.pairing is not None else None
        if bank is not None:  # the worker bank (the service keeps its own)
            parts["pairing-bank"] = bank
        return parts

    def load_state(self, parts, step, replay):
        if self.teacher is not None and "teacher" in parts:
            self.teacher.load_state_dict(parts["teacher"])
        if self.thresholds is not None and "thresholds" in parts:
            self.thresholds.load_state_dict(parts["thresholds"])
        if "pairing-bank" in parts and self.pairing is not None and self.pairing.local is not None:
            self._rebuild_bank(parts["pairing-bank"], step, replay)

    def _rebuild_bank(self, state, step, replay):
        """The worker's bank as it was: its checkpointed state, and the pixels of the samples its ring holds
        (those of the last global steps) read again from the labeled stream's order, converted as training
        converted them."""
        try:
            self.pairing.load_state_dict(state)
        except ValueError as e:  # a changed bank size: the bank refills from the next steps
            log.warning("%s; the pairing bank starts empty", e)
            return
        per_step = self.cfg.global_batch("labeled")
        steps = min(step, -(-self.gm.pairing.bank_size // per_step))
        first = (step - steps) * per_step
        stream = replay(step - steps)
        try:
            while first < step * per_step:
                batch = next(stream)
                self.pairing.put_pixels(first, batch["image"].to(self.ctx.device), batch["mask"])
                first += len(batch["keys"])
        finally:
            stream.close()

    def stats(self):
        stats = {} if self.pairing is None else {"pairing": self.pairing.stats()}
        if self.thresholds is not None:  # read at log steps only: a host sync there, never in a step
            per_class = self.thresholds.per_class()
            stats.update(tau_level=round(float(self.thresholds.level), 4), tau_min=round(float(per_class.min()), 4))
        return stats
