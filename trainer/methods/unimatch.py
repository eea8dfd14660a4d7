"""`train.method: unimatch`: the field's simple strong baseline; its loss is trainer/unimatch.py's."""
from __future__ import annotations

from ..unimatch import unimatch_loss
from . import Method


class UniMatch(Method):
    splits = ("labeled", "unlabeled", "unlabeled_mix")  # CutMix pastes in a second unlabeled batch

    def loss(self, model, images, y_l, step, generator):
        return unimatch_loss(model, images["labeled"], y_l, images["unlabeled"], images["unlabeled_mix"],
                             self.cfg.unimatch, generator)
