"""What the semi-supervised methods share (trainer/guidedmix.py, trainer/unimatch.py, the supervised baseline):
a step's output, the supervised term, the reference's mixing weights (a constant, a box or whole classes),
mixing, the student's strong perturbations, the unsupervised weight's ramp-up, and batch norm whose running
statistics a perturbed batch leaves alone. Pure PyTorch."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from shards.manifest import IGNORE  # the shard format's ignore_index


@dataclass
class StepOutput:
    """A micro-batch's loss, and what the Trainer logs of it."""

    loss: torch.Tensor
    # for logging: sup, unsup, mix, taught, lam as detached tensors (read on the host only at a log step,
    # so a step costs no device-to-host sync), weight as a float
    parts: dict = field(default_factory=dict)
    pseudo: Optional[torch.Tensor] = None  # what the unlabeled batch is taught per pixel (255 = nothing)


def supervised_loss(model, x_l, y_l) -> StepOutput:
    """L_sup alone: the supervised baseline's loss (`train.method: supervised`)."""
    loss = F.cross_entropy(model(x_l), y_l, ignore_index=IGNORE)
    return StepOutput(loss, {"sup": loss.detach()})


def drawn_on(generator: Optional[torch.Generator]) -> Optional[torch.device]:
    """Where random draws are made: on the generator's device (a CUDA generator draws only CUDA tensors), then
    moved to where they are used; the same draws on a CPU run as ever."""
    return None if generator is None else generator.device


def sample_lam(batch: int, height: int, width: int, lam_max: float, mode: str,
               generator: Optional[torch.Generator] = None, device=None,
               y_r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """B x 1 x H x W mixing weights of the reference: a constant per pair (interp), a 0/1 box (region), or
    its pixels of whole classes (class)."""
    if mode == "class":
        return class_regions(y_r, lam_max, generator).unsqueeze(1).float()
    u = torch.rand(batch, generator=generator, device=drawn_on(generator))
    if mode == "interp":
        return (u * lam_max).to(device).view(batch, 1, 1, 1).expand(batch, 1, height, width).contiguous()
    # region: a box covering a U(0, lam_max) share of the image, so lam_max bounds the pasted area
    on_host = generator is None or generator.device.type == "cpu"
    return (region_boxes_one_by_one if on_host else region_boxes)((u * lam_max).sqrt(), height, width, generator,
                                                                  device)


def region_boxes(side: torch.Tensor, height: int, width: int, generator: Optional[torch.Generator] = None,
                 device=None) -> torch.Tensor:
    """B x 1 x H x W: per pair a box of round(side * H) x round(side * W) pixels at a uniform position, drawn as
    tensors on the generator's device: no value is read back to the host (on a GPU, no wait for the device)."""
    side = side.double()  # the sides as Python's round() takes them
    box_h, box_w = (height * side).round().long(), (width * side).round().long()
    corner = torch.rand(side.shape[0], 2, generator=generator, device=drawn_on(generator)).to(side)
    top = (corner[:, 0] * (height - box_h + 1)).long().clamp(max=height - box_h)
    left = (corner[:, 1] * (width - box_w + 1)).long().clamp(max=width - box_w)
    rows = torch.arange(height, device=side.device).view(1, height, 1)
    cols = torch.arange(width, device=side.device).view(1, 1, width)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)))
    return box.unsqueeze(1).float().to(device)


def region_boxes_one_by_one(side: torch.Tensor, height: int, width: int,
                            generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """`region_boxes` on a CPU generator, one box at a time, each corner a torch.randint: the draws every CPU
    run and study table has made (torch has no tensor op that draws torch.randint(0, n)'s values for several
    n at once). Its reads are of the generator's draws, host memory: no wait for a device."""
    lam = torch.zeros(side.shape[0], 1, height, width, device=device)
    for i, s in enumerate(side.tolist()):
        box_h, box_w = round(height * s), round(width * s)
        top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
        lam[i, :, top:top + box_h, left:left + box_w] = 1.0
    return lam


def class_regions(y_r: torch.Tensor, lam_max: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """B x H x W booleans: each reference's pixels of whole classes, taken in a random order while they cover
    at most `lam_max` of the image (ClassMix, Olsson et al. 2021, bounded as the box is). Pasting the
    partner's objects, not a box that mostly holds its background, moves its classes into the mixed view;
    a class larger than what is left of the budget (most often the background) stays out."""
    regions = torch.zeros_like(y_r, dtype=torch.bool)
    budget = lam_max * y_r[0].numel()
    for i in range(y_r.shape[0]):
        classes = y_r[i][y_r[i] != IGNORE].unique()
        counts = [int((y_r[i] == c).sum()) for c in classes]
        area = 0
        for k in torch.randperm(len(classes), generator=generator, device=drawn_on(generator)).tolist():
            if area + counts[k] <= budget:
                regions[i] |= y_r[i] == classes[k]
                area += counts[k]
    return regions


def mix(x_u: torch.Tensor, x_r: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    lam = lam.to(x_u.dtype)  # a float32 lam would lift bf16 images to float32
    return lam * x_r + (1 - lam) * x_u


def strong_augment(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pixel-aligned perturbations of normalised images (the student's view only): brightness, contrast,
    saturation, greyscale, blur and noise, each drawn per image. No geometry changes, so pseudo masks made
    on the clean view stay aligned."""
    b = x.shape[0]

    on = drawn_on(generator)

    def draw(low, high):
        return (torch.rand(b, 1, 1, 1, generator=generator, device=on) * (high - low) + low).to(x)

    def coin(p):
        return (torch.rand(b, 1, 1, 1, generator=generator, device=on) < p).to(x)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = x + coin(0.8) * draw(-0.5, 0.5)  # brightness
    x = mean + (x - mean) * (1 + coin(0.8) * draw(-0.5, 0.5))  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * (1 + coin(0.8) * draw(-0.8, 0.8))  # saturation
    x = x + coin(0.2) * (grey - x)  # greyscale
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    x = x + coin(0.5) * (blurred - x)
    noise = torch.randn(x.shape, generator=generator, device=on).to(x)
    return x + coin(0.5) * 0.1 * noise


def rampup(step: int, warmup_steps: int, rampup_steps: int, weight: float) -> float:
    """Sigmoid ramp-up exp(-5 (1 - t)^2) of the unsupervised weight, after `warmup_steps` of supervision."""
    t = step - warmup_steps
    if t < 0:
        return 0.0
    if rampup_steps == 0 or t >= rampup_steps:
        return weight
    return weight * math.exp(-5.0 * (1.0 - t / rampup_steps) ** 2)


@contextmanager
def frozen_bn_statistics(model):
    """Batch norm normalises with the batch's statistics but leaves the running ones alone: mixed images
    (lower contrast, pasted edges) are not what evaluation sees, and must not shift its statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
