"""`method: unimatch`, the field's simple strong baseline (Yang et al., CVPR 2023), as its reference
implementation (LiheYoung/UniMatch, `unimatch.py`) trains it, in the same pipeline: unlabeled images teach
themselves, with no labeled image in the mix. Pure PyTorch.

1. One forward of the labeled and the (weakly augmented) unlabeled images together; the unlabeled images'
   prediction, detached, is their pseudo mask and its confidence. The same pass decodes the encoder features
   with channel dropout (0.5) as well: the feature-perturbed view (`fp`).
2. A second unlabeled batch (`x_mix`, its own stream in its own order) is predicted in eval mode, without
   gradients: the pseudo masks of what CutMix pastes in.
3. Two strongly perturbed views of the unlabeled images (`ssl.strong_augment`, drawn independently), each with
   its own CutMix box (with probability `cutmix_p`, a box of U(0.02, 0.4) of the image at an aspect ratio of
   U(0.3, 1/0.3), drawn again until it fits) of its own strong view of the second batch pasted in; the pseudo
   masks and confidences are mixed alike.
4. Losses on the pixels whose confidence is at least `tau` (0.95), over all pixels (those below count zero):
   L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, from the first step (no ramp-up).

Against GuidedMix this answers the reviewer's question: does guidance by labeled images beat mixing unlabeled
images with each other?
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from .ssl import IGNORE, StepOutput, drawn_on, mix, strong_augment

if TYPE_CHECKING:  # the typed config section, for readers only
    from .config import UniMatchConfig

WEIGHTS = {"strong": 0.25, "fp": 0.5}  # per strong view; the feature-perturbed view
# a box's draws of ratio and corner until one fits, made at once (the reference loops on the host); at the
# largest area about 1 in 14 draws fits, so all of them missing has a chance of about 5e-9 (that box is left out)
BOX_DRAWS = 256


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over all pixels, those not kept counting zero (a fixed denominator, as UniMatch)."""
    per_pixel = F.cross_entropy(logits, torch.where(keep, target, 0), reduction="none")
    return (per_pixel * keep).sum() / keep.numel()


def cutmix_boxes(batch: int, height: int, width: int, p: float, generator: Optional[torch.Generator] = None,
                 device=None) -> torch.Tensor:
    """B x H x W 0/1 boxes as UniMatch's `obtain_cutmix_box`: with probability `p` a box of U(0.02, 0.4) of the
    image's area; its aspect ratio (height / width) U(0.3, 1/0.3) and its top-left corner uniform over the
    image, both drawn again until the box fits inside. Drawn as tensors (no value read back to the host)."""
    on = drawn_on(generator)

    def uniform(low, high, *shape):
        return torch.rand(batch, *shape, generator=generator, device=on, dtype=torch.float64) * (high - low) + low
    present = uniform(0, 1) < p
    area = (uniform(0.02, 0.4) * height * width).view(-1, 1)
    ratio = uniform(0.3, 1 / 0.3, BOX_DRAWS)
    box_w, box_h = torch.sqrt(area / ratio).floor(), torch.sqrt(area * ratio).floor()
    left, top = (uniform(0, 1, BOX_DRAWS) * width).floor(), (uniform(0, 1, BOX_DRAWS) * height).floor()
    fits = (left + box_w <= width) & (top + box_h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first draw that fits
    left, top, box_w, box_h = (t.gather(1, first) for t in (left, top, box_w, box_h))
    present = present.view(-1, 1) & fits.any(1, keepdim=True)
    rows = torch.arange(height, device=on, dtype=torch.float64).view(1, -1, 1)
    cols = torch.arange(width, device=on, dtype=torch.float64).view(1, 1, -1)
    boxes = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
             & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)) & present.view(-1, 1, 1))
    return boxes.to(device if device is not None else on)


@torch.no_grad()
def _predict_in_eval_mode(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, class) per pixel, as the reference predicts its second batch: batch norm on its running
    statistics, which this forward leaves as they are."""
    model.eval()
    try:
        return model(images).softmax(1).max(1)
    finally:
        model.train()


def unimatch_loss(model, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, x_mix: torch.Tensor,
                  cfg: "UniMatchConfig", generator: Optional[torch.Generator] = None) -> StepOutput:
    b_l, b_u = x_l.shape[0], x_u.shape[0]
    size = x_u.shape[-2:]

    # 1. labeled and weak unlabeled images in one forward (batch norm sees both), decoded also with channel
    # dropout on the encoder features: the feature-perturbed view
    low, high = model.encode(torch.cat([x_l, x_u]))
    dropped = F.dropout2d(low, cfg.feature_dropout), F.dropout2d(high, cfg.feature_dropout)
    clean, perturbed = model.classify(model.decode(torch.cat([low, dropped[0]]), torch.cat([high, dropped[1]])),
                                      size).split([b_l + b_u, b_l + b_u])
    pred_x, pred_u = clean.split([b_l, b_u])
    pred_fp = perturbed[b_l:]
    confidence, pseudo = pred_u.detach().softmax(1).max(1)

    # 2. the second batch's pseudo masks, for what is pasted in
    confidence_mix, pseudo_mix = _predict_in_eval_mode(model, x_mix)

    # 3. two strong views, each with a box of its own strong view of the second batch pasted in
    views, targets, keeps = [], [], []
    for _ in range(2):
        box = cutmix_boxes(b_u, size[0], size[1], cfg.cutmix_p, generator, x_u.device)
        views.append(mix(strong_augment(x_u, generator), strong_augment(x_mix, generator), box.unsqueeze(1)))
        targets.append(torch.where(box, pseudo_mix, pseudo))
        keeps.append(torch.where(box, confidence_mix, confidence) >= cfg.tau)
    pred_s1, pred_s2 = model(torch.cat(views)).chunk(2)

    # 4. the losses, weighted as the reference weighs them
    loss_x = F.cross_entropy(pred_x, y_l, ignore_index=IGNORE)
    loss_s1, loss_s2 = (_masked_ce(pred, target, keep) for pred, target, keep in
                        zip((pred_s1, pred_s2), targets, keeps))
    loss_fp = _masked_ce(pred_fp, pseudo, confidence >= cfg.tau)
    loss_u = WEIGHTS["strong"] * (loss_s1 + loss_s2) + WEIGHTS["fp"] * loss_fp
    loss = (loss_x + loss_u) / 2
    taught = torch.where(confidence >= cfg.tau, pseudo, IGNORE)  # what x_u's own pixels are taught
    parts = {"sup": loss_x.detach(), "unsup": ((loss_s1 + loss_s2) / 2).detach(), "fp": loss_fp.detach(),
             "taught": (taught != IGNORE).float().mean()}
    return StepOutput(loss, parts, pseudo=taught)
