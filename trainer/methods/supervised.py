"""`train.method: supervised`: L_sup alone on the labeled stream, the baseline every study measures against."""
from __future__ import annotations

from ..ssl import supervised_loss
from . import Method


class Supervised(Method):
    splits = ("labeled",)

    def loss(self, model, images, y_l, step, generator):
        return supervised_loss(model, images["labeled"], y_l)
