"""Evaluation: confusion matrix (a plain tensor, ready for all_reduce), mIoU, per-class IoU, and
whole-image or sliding-window inference, single scale, optional flip. Pure PyTorch."""
from __future__ import annotations

import torch

IGNORE = 255


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

