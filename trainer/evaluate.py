"""Evaluation: confusion matrix (a plain tensor, ready for all_reduce), mIoU, per-class IoU, and
whole-image or sliding-window inference, single scale, optional flip. Pure PyTorch."""
from __future__ import annotations

import torch

from .ssl import IGNORE


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C int64 counts, rows = true class, columns = predicted; ignored pixels are left out."""
    valid = target != IGNORE
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou(confusion: torch.Tensor) -> tuple[float, list[float]]:
    """(mIoU over classes present in the truth or the prediction, per-class IoU with NaN for absent)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    per_class = tp / union
    present = union > 0
    miou = per_class[present].mean().item() if present.any() else 0.0
    return miou, [float(v) for v in per_class]


def _whole(model, images):
    return model(images).softmax(1)


def _slide(model, images, window: int, stride: int, num_classes: int):
    """Average softmax over overlapping windows (images smaller than a window are evaluated whole)."""
    b, _, h, w = images.shape
    if h <= window and w <= window:
        return _whole(model, images)
    probs = images.new_zeros(b, num_classes, h, w)
    counts = images.new_zeros(1, 1, h, w)
    rows = list(range(0, max(h - window, 0) + 1, stride))
    cols = list(range(0, max(w - window, 0) + 1, stride))
    if rows[-1] + window < h:
        rows.append(h - window)
    if cols[-1] + window < w:
        cols.append(w - window)
    for top in rows:
        for left in cols:
            crop = images[:, :, top:top + window, left:left + window]
            probs[:, :, top:top + crop.shape[2], left:left + crop.shape[3]] += model(crop).softmax(1)
            counts[:, :, top:top + crop.shape[2], left:left + crop.shape[3]] += 1
    return probs / counts


@torch.no_grad()
def predict(model, images: torch.Tensor, num_classes: int, mode: str = "whole", window: int = 512,
            stride: int = 341, flip: bool = False) -> torch.Tensor:
    """Class probabilities B x C x H x W at input size."""
    run = (lambda x: _whole(model, x)) if mode == "whole" else (lambda x: _slide(model, x, window, stride, num_classes))
    probs = run(images)
    if flip:
        probs = (probs + run(images.flip(-1)).flip(-1)) / 2
    return probs



class PseudoMaskScore:
    """Pseudo masks over a stretch of training: the share of unlabeled pixels they label, the class
    frequencies they claim against the true ones and, where the true masks were withheld (a study's shard
    set), how often they are right. Collapse shows as one class's frequency running away from its truth."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.pixels, self.claimed, self.confusion, self.truth = 0, 0, None, None

    def add(self, pseudo: torch.Tensor, truth: torch.Tensor | None = None) -> None:
        """Counts stay on the pseudo masks' device; counting by scatter rather than boolean indexing or
        bincount (both need the host to learn a size), so a step waits for no device-to-host copy."""
        c = self.num_classes
        labeled = pseudo != IGNORE
        self.pixels += pseudo.numel()
        self.claimed = self.claimed + _count(torch.where(labeled, pseudo, c), c)
        if truth is not None:
            truth = truth.to(pseudo.device)
            known = truth != IGNORE
            self.truth = (0 if self.truth is None else self.truth) + _count(torch.where(known, truth, c), c)
            pairs = torch.where(labeled & known, truth * c + pseudo, c * c)
            self.confusion = (0 if self.confusion is None else self.confusion) + _count(pairs, c * c).view(c, c)

    def summary(self) -> dict:
        if not self.pixels:
            return {}
        claimed = torch.as_tensor(self.claimed).double()
        out = {"pseudo_coverage": round(claimed.sum().item() / self.pixels, 4),
               "pseudo_class_freq": [round(v, 4) for v in (claimed / claimed.sum().clamp(min=1)).tolist()]}
        if self.confusion is not None:
            scored = self.confusion.sum().item()
            if scored:  # else nothing was claimed where the truth is known
                out["pseudo_accuracy"] = round(self.confusion.diag().sum().item() / scored, 4)
            truth = self.truth.double()
            out["true_class_freq"] = [round(v, 4) for v in (truth / truth.sum().clamp(min=1)).tolist()]
        return out


def _count(index: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of 0..n-1 in `index` (values equal to n are left out)."""
    counts = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    return counts.scatter_add_(0, index.flatten().long(), torch.ones_like(index.flatten(), dtype=torch.long))[:n]
