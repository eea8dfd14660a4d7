"""`train.method: unimatch`: the field's simple strong baseline; its loss is trainer/unimatch.py's."""
from __future__ import annotations

from ..unimatch import unimatch_loss
from . import Method


class UniMatch(Method):
    def loss(self, model, x_l, y_l, x_u, step, generator):
        return unimatch_loss(model, x_l, y_l, x_u, self.cfg.unimatch, generator)
