"""`method: unimatch`, the field's simple strong baseline (Yang et al., CVPR 2023), in the same pipeline:
unlabeled images teach themselves, with no labeled image in the mix. Pure PyTorch.

1. The clean view of x_u (the model's prediction, detached) gives a pseudo mask and its confidence.
2. The student sees a strongly perturbed view (`ssl.strong_augment`), with a box of another
   unlabeled image of the batch pasted in (CutMix between unlabeled images; the pseudo mask is mixed alike).
3. Feature perturbation (`feature_dropout` > 0): the clean view's encoder features with channel dropout
   must predict the same pseudo mask.
4. Losses on pixels whose confidence is at least `tau` (a high fixed threshold, 0.95 as UniMatch):
   L = L_sup + w(t) * (L_strong + L_fp) / 2 (w: guidedmix's ramp-up; without feature perturbation L_strong).

Against GuidedMix this answers the reviewer's question: does guidance by labeled images beat mixing unlabeled
images with each other?
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from .ssl import IGNORE, StepOutput, frozen_bn_statistics, mix, rampup, sample_lam, strong_augment

if TYPE_CHECKING:  # the typed config sections, for readers only
    from .config import GuidedMixConfig, UniMatchConfig


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over all pixels, those not kept counting zero (a fixed denominator, as UniMatch)."""
    per_pixel = F.cross_entropy(logits, torch.where(keep, target, 0), reduction="none")
    return (per_pixel * keep).sum() / keep.numel()


def unimatch_loss(model, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, step: int,
                  cfg: "UniMatchConfig", ramp: "GuidedMixConfig",
                  generator: Optional[torch.Generator] = None) -> StepOutput:
    """One step's loss. `ramp` supplies the unsupervised weight's warm-up and ramp-up (shared with GuidedMix,
    so both methods weigh their unlabeled loss alike)."""
    b_u = x_u.shape[0]
    size = x_u.shape[-2:]

    # 1. the clean view teaches: pseudo mask and confidence (its encoder pass is shared with step 3)
    low, high = model.encode(x_u)
    with torch.no_grad():
        confidence, pseudo = model.classify(model.decode(low, high), size).softmax(1).max(1)

    # 2. the strongly perturbed view, with a box of another unlabeled image (the next one) pasted in
    box = sample_lam(b_u, size[0], size[1], cfg.cutmix_max, "region", generator, x_u.device)
    other = torch.roll(torch.arange(b_u, device=x_u.device), 1)
    x_s = strong_augment(x_u, generator)
    x_s = mix(x_s, x_s[other], box)
    inside = box.squeeze(1) > 0.5
    target_s = torch.where(inside, pseudo[other], pseudo)
    keep_s = torch.where(inside, confidence[other], confidence) >= cfg.tau

    loss_sup = F.cross_entropy(model(x_l), y_l, ignore_index=IGNORE)
    with frozen_bn_statistics(model):  # perturbed images must not shift the running statistics
        loss_strong = _masked_ce(model(x_s), target_s, keep_s)
        loss_fp = loss_strong.new_zeros(())
        if cfg.feature_dropout > 0:  # 3. feature perturbation on the clean view's encoder features
            dropped = (F.dropout2d(low, cfg.feature_dropout), F.dropout2d(high, cfg.feature_dropout))
            loss_fp = _masked_ce(model.classify(model.decode(*dropped), size), pseudo, confidence >= cfg.tau)
    unlabeled = (loss_strong + loss_fp) / 2 if cfg.feature_dropout > 0 else loss_strong

    w = rampup(step, ramp.warmup_steps, ramp.rampup_steps, ramp.unsup_weight)
    loss = loss_sup + w * unlabeled
    taught = torch.where(confidence >= cfg.tau, pseudo, IGNORE)  # what x_u's own pixels are taught
    parts = {"sup": loss_sup.detach(), "unsup": loss_strong.detach(), "fp": loss_fp.detach(), "weight": w,
             "taught": (taught != IGNORE).float().mean()}
    return StepOutput(loss, parts, pseudo=taught)
