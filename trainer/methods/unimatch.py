"""`train.method: unimatch`: the field's simple strong baseline; its loss is trainer/unimatch.py's."""
from __future__ import annotations

from ..unimatch import unimatch_loss
from . import Method


class UniMatch(Method):
    splits = ("labeled", "unlabeled", "unlabeled_mix")  # CutMix pastes in a second unlabeled batch

    def loss(self, model, x_l, y_l, x_u, step, generator, x_mix=None):
        return unimatch_loss(model, x_l, y_l, x_u, x_mix, self.cfg.unimatch, generator)
