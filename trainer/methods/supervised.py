"""`train.method: supervised`: L_sup alone on the labeled stream, the baseline every study measures against."""
from __future__ import annotations

from ..ssl import supervised_loss
from . import Method


class Supervised(Method):
    splits = ("labeled",)

    def loss(self, model, x_l, y_l, x_u, step, generator, x_mix=None):
        return supervised_loss(model, x_l, y_l)
