"""Training methods behind one small interface. The Trainer (trainer/loop.py) holds a `Method` and never asks
which one it is: it hands each micro-batch to `loss`, calls `end_step` after the optimiser step, asks `state`
for what a checkpoint keeps of the method and gives it back through `load_state` on resume, and logs `stats`.

Adding a method is one module here with a `Method` subclass, its name in `METHODS` (and in the config's
`train.method` choices), and a config section if it has settings; docs/method.md, "Adding a method", walks
through it. The losses themselves are pure PyTorch beside the paper they follow (trainer/guidedmix.py,
trainer/unimatch.py); what the methods share is in trainer/ssl.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..ssl import StepOutput

if TYPE_CHECKING:
    from ..config import Config
    from ..loop import WorkerContext
    from ..metrics import Metrics

# replay(first_step): the labeled stream from that global step on, every rank's share of each global batch
# as one worker reads it (a resume rebuilds what a method held of recent steps from it); close() when done
Replay = Callable[[int], Iterator[dict]]


class Method:
    """What the Trainer asks of a method; the defaults are those of a method with no state of its own."""

    # the training streams the method reads (trainer/loop.py's STREAMS): labeled, unlabeled, and for a method
    # that pastes in images of a second unlabeled batch, unlabeled_mix
    splits: tuple[str, ...] = ("labeled", "unlabeled")
    parts: tuple[str, ...] = ()  # the names `state()` may hand a checkpoint

    def __init__(self, cfg: "Config", model: torch.nn.Module, ctx: "WorkerContext", metrics: "Metrics",
                 num_classes: int):
        self.cfg, self.ctx, self.num_classes = cfg, ctx, num_classes

    def loss(self, model: torch.nn.Module, images: dict[str, torch.Tensor], y_l: torch.Tensor, step: int,
             generator: torch.Generator) -> StepOutput:
        """One micro-batch's loss: `images` holds a micro-batch of each of `splits` by stream name, `y_l` the
        labeled images' masks (all on the worker's device)."""
        raise NotImplementedError

    def end_step(self, model: torch.nn.Module, step: int) -> None:
        """After the optimiser step `step`."""

    def state(self) -> dict[str, dict]:
        """The method's parts for a checkpoint by name, the same on every rank (rank 0 writes them)."""
        return {}

    def load_state(self, parts: dict[str, dict], step: int, replay: Replay) -> None:
        """A resume at `step`: the parts a checkpoint held (those of `state()`'s names it has)."""

    def stats(self) -> dict:
        """Numbers for each log record and the summary (this rank's, since its start)."""
        return {}


def build_method(cfg: "Config", model: torch.nn.Module, ctx: "WorkerContext", metrics: "Metrics",
                 num_classes: int) -> Method:
    """The configured method, built before the engine wraps `model` (a teacher copies it as it is)."""
    return METHODS[cfg.train.method](cfg, model, ctx, metrics, num_classes)


# the methods, each in its module (they import Method from here, defined above)
from .guidedmix import GuidedMix  # noqa: E402
from .supervised import Supervised  # noqa: E402
from .unimatch import UniMatch  # noqa: E402

METHODS: dict[str, type[Method]] = {"supervised": Supervised, "guidedmix": GuidedMix, "unimatch": UniMatch}
