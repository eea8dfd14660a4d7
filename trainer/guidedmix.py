"""GuidedMix-Net's objective (Tu et al., AAAI 2022), step by step as docs/method.md tells it. Pure PyTorch.

1. pairing: each unlabeled image gets the most similar labeled reference (cosine of pooled embeddings)
   in the labeled batch, or from outside: `find_references` (the pairing service's bank) answers; the
   class criteria pick instead by what the partner's mask holds (`complement`: the classes the unlabeled
   image's prediction lacks; `need`: the classes the model does worst on);
2. mixing: x_m = lam * x_r + (1 - lam) * x_u, lam ~ U(0, lam_max) per pair; `mix: region` pastes a box
   of the reference instead, `mix: class` its pixels of whole classes (lam becomes a 0/1 map, so the
   decoupling below is exact inside it);
   `strong_aug` perturbs the student's copy of x_u first (the teacher keeps the clean view);
3. forward: encoder over [x_l; x_u], then over x_m (its batch statistics leave the running ones alone);
   MITrans refines the mixed decoder features;
4. mask generation: q = clamp((p_m - lam * onehot(y_r)) / (1 - lam), 0, 1) renormalised; the pseudo mask
   of x_u is argmax q with confidence max q;
5. losses: L = L_sup + w(t) * (L_unsup + L_mix), w a sigmoid ramp-up after an optional warm-up.

Lam is carried as a per-pixel map B x 1 x H x W throughout, so global and region mixing share one path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from .ssl import IGNORE, StepOutput, drawn_on, frozen_bn_statistics, mix, rampup, sample_lam, strong_augment

if TYPE_CHECKING:  # the typed config section, for readers and type checkers only: no pydantic at run time here
    from .config import GuidedMixConfig


# Given the unlabeled batch's L2-normalised embeddings and the class shares of its predictions (B x C), the
# reference (image, mask) of each unlabeled image, found outside the batch (the pairing service), or None:
# pair in-batch this step.
ReferenceFinder = Callable[[torch.Tensor, torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]

# a class under this share of an unlabeled image's predicted pixels counts as absent for `complement`
ABSENT_SHARE = 0.01
CLASS_CRITERIA = ("complement", "need")


@dataclass
class GuidedMixOutput(StepOutput):
    """A GuidedMix step's output: besides the loss, what pairing and the worker's bank use."""

    pairing: Optional[torch.Tensor] = None  # index into the labeled batch (None: references from outside)
    labeled_embeddings: Optional[torch.Tensor] = None  # what the pairing bank stores
    labeled_shares: Optional[torch.Tensor] = None  # B_l x C class shares of the labeled masks (the bank's too)
    labeled_overlap: Optional[torch.Tensor] = None  # 2 x C intersection and union on the labeled batch
    # the teacher's clean view of the unlabeled batch, summed over its pixels: [sum of max probability,
    # sum of each class's probability (C), pixel count]; what adaptive thresholds follow (None without them)
    unlabeled_confidence: Optional[torch.Tensor] = None


def pair(query: torch.Tensor, candidates: torch.Tensor, similarity: str = "most", topk: int = 1,
         temperature: float = 0.1, generator: Optional[torch.Generator] = None, *,
         query_shares: Optional[torch.Tensor] = None, candidate_shares: Optional[torch.Tensor] = None,
         need: Optional[torch.Tensor] = None) -> torch.Tensor:
    """For each query embedding, the index of its reference among the candidate embeddings.

    `most`: argmax cosine (or a softmax-weighted draw among the top k); `least`: argmin; `random`:
    uniform. The last two exist to measure whether similarity matters at all. The class criteria score each
    candidate by the share of its mask's pixels in the classes wanted, and draw from softmax(score /
    temperature) (a draw, not an argmax: one best partner for every query would paste the same few images):
    `complement` wants the classes absent from the query's predicted class shares, `need` (per class, in
    [0, 1]) weighs every class by how badly the model does on it."""
    n = candidates.shape[0]
    if similarity == "random":
        return torch.randint(0, n, (query.shape[0],), generator=generator, device=drawn_on(generator)).to(query.device)
    if similarity in CLASS_CRITERIA:
        if candidate_shares is None or (query_shares if similarity == "complement" else need) is None:
            raise ValueError(f"pairing.similarity {similarity} needs class shares"
                             + (" of the queries" if similarity == "complement" else " and the per-class need"))
        if similarity == "complement":
            wanted = (query_shares < ABSENT_SHARE).float()
        else:  # every query wants the same classes: one row of scores serves the batch
            wanted = need.float().unsqueeze(0)
        cdf = torch.softmax((wanted @ candidate_shares.float().T) / temperature, dim=1).cumsum(1)
        # an inverse-CDF draw: torch.multinomial takes 10 ms over a bank of 32,768 on one core, this 0.4 ms
        u = torch.rand(query.shape[0], 1, generator=generator, device=drawn_on(generator)).to(cdf) * cdf[:, -1:]
        return torch.searchsorted(cdf if similarity == "complement" else cdf[0], u).squeeze(1).clamp(max=n - 1)
    scores = query @ candidates.T
    if similarity == "least":
        scores = -scores
    if topk <= 1:
        return scores.argmax(dim=1)
    top, index = scores.topk(min(topk, n), dim=1)
    probs = torch.softmax(top / temperature, dim=1)
    choice = torch.multinomial(probs.to(drawn_on(generator) or probs.device), 1, generator=generator)
    return index.gather(1, choice.to(index.device)).squeeze(1)


def onehot(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x C x H x W one-hot of a class-id mask; all zero at ignored pixels."""
    valid = mask != IGNORE
    out = F.one_hot(torch.where(valid, mask, 0), num_classes).permute(0, 3, 1, 2).to(torch.float32)
    return out * valid.unsqueeze(1)


def reference_distribution(y_r: torch.Tensor, p_r: Optional[torch.Tensor], num_classes: int) -> torch.Tensor:
    """What the reference contributes per pixel: its one-hot mask, or where that is ignored, its
    (detached) predicted distribution when one is given (`decouple_with: prediction`)."""
    ref = onehot(y_r, num_classes)
    if p_r is not None:
        ref = torch.where((y_r == IGNORE).unsqueeze(1), p_r, ref)
    return ref


def generate_mask(p_m: torch.Tensor, ref: torch.Tensor, lam: torch.Tensor, eps: float = 1e-6):
    """Mask generation: remove the reference's share from the mixed prediction.

    Returns (pseudo mask, confidence). Where lam = 1 (a pasted region) x_u is not visible: those pixels
    get IGNORE."""
    visible = lam < 1 - eps
    q = ((p_m - lam * ref) / (1 - lam).clamp_min(eps)).clamp(0, 1)
    q = q / q.sum(dim=1, keepdim=True).clamp_min(eps)
    confidence, pseudo = q.max(dim=1)
    pseudo = torch.where(visible.squeeze(1), pseudo, torch.full_like(pseudo, IGNORE))
    return pseudo, confidence * visible.squeeze(1)


def most_confident(mask: torch.Tensor, confidence: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` most confident pixels of `mask` (ties kept)."""
    values = confidence[mask]
    if count <= 0:
        return torch.zeros_like(mask)
    return mask & (confidence >= values.kthvalue(max(values.numel() - count + 1, 1)).values)


def masked_bincount(values: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of 0..n-1 among `values` where `mask` holds: `torch.bincount(values[mask])` without the
    boolean indexing, whose result size only the host can know (on a GPU, a wait for the device)."""
    return torch.zeros(n, dtype=torch.long, device=values.device).scatter_add_(
        0, values.flatten().long().clamp(0, n - 1), mask.flatten().long())


def class_shares(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each class's share of the labeled pixels of `y` (ignored pixels left out)."""
    counts = masked_bincount(y, y != IGNORE, num_classes).float()
    return counts / counts.sum().clamp(min=1)


def image_class_shares(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x C: each class's share of each image's labeled pixels (ignored pixels left out); one bincount."""
    b = y.shape[0]
    flat = y.reshape(b, -1)
    valid = flat != IGNORE
    keys = torch.arange(b, device=y.device).unsqueeze(1) * num_classes + flat.clamp(max=num_classes - 1)
    counts = masked_bincount(keys, valid, b * num_classes).view(b, num_classes).float()
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def class_overlap(logits_l: torch.Tensor, y_l: torch.Tensor, num_classes: int) -> torch.Tensor:
    """2 x C: per class, the pixels of the labeled batch where prediction and truth agree (intersection) and
    where either has it (union). Summed over steps and workers they give each class's IoU, the model's own
    running score of what it has learnt (`class_need`)."""
    hard, known = logits_l.detach().argmax(1), y_l != IGNORE
    intersection = masked_bincount(y_l, known & (hard == y_l), num_classes)
    union = masked_bincount(hard, known, num_classes) + masked_bincount(y_l, known, num_classes) - intersection
    return torch.stack([intersection, union]).float()


def class_need(overlap: torch.Tensor) -> torch.Tensor:
    """Per class, 1 - IoU from summed `class_overlap`s; 1 for a class neither predicted nor present yet."""
    intersection, union = overlap
    return torch.where(union > 0, 1 - intersection / union.clamp(min=1e-9), torch.ones_like(union))


def align_distribution(p: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Distribution alignment (ReMixMatch, Berthelot et al. 2020) on one batch: each class's probability
    scaled by its `target` share (the labeled pixels') over its mean predicted probability on the batch, then
    renormalised per pixel. It divides out the teacher's lean towards frequent classes (its confident pixels
    are 89-99% background where the truth has 73-80%). A `smoothing` share of uniform is mixed into the
    target, so that a class absent from this labeled batch is damped, not erased."""
    c = p.shape[1]
    target = (1 - smoothing) * target + smoothing / c
    q = p * (target / p.mean((0, 2, 3)).clamp_min(1e-6)).view(1, c, 1, 1)
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


def earned_classes(logits_l: torch.Tensor, y_l: torch.Tensor, tau: float, precision: float) -> torch.Tensor:
    """Per class: whether the model's confident (>= tau) predictions of it on the labeled batch are right at
    least `precision` of the time. A class it never predicts confidently there is not earned. The labeled
    images are the only pixels whose truth the step knows, so they say which pseudo labels to trust."""
    num_classes = logits_l.shape[1]
    confidence, hard = logits_l.detach().softmax(1).max(1)
    sure = (confidence >= tau) & (y_l != IGNORE)
    predicted = masked_bincount(hard, sure, num_classes)
    right = masked_bincount(hard, sure & (hard == y_l), num_classes)
    return (predicted > 0) & (right >= precision * predicted)


class AdaptiveThresholds:
    """Per-class confidence thresholds that follow the model's learning status (FreeMatch, Wang et al. 2023,
    "self-adaptive thresholding"), over pixels: a global level tau_t, the exponential moving average of the
    teacher's mean max probability on unlabeled pixels, scaled per class by that class's average probability
    relative to the most predicted class's: tau_t(c) = tau_t * p_t(c) / max_k p_t(k). Both start at 1/C, so
    early on most pixels are taught, and a class the model rarely predicts (not yet learnt) is taught at a
    lower confidence than the majority class instead of not at all, as a fixed tau does with a weak
    teacher. `update` takes the sums of a whole global step (every micro-batch of every rank), so the
    thresholds are the same at any world size."""

    def __init__(self, num_classes: int, momentum: float, device=None):
        self.momentum = momentum
        self.level = torch.full((), 1.0 / num_classes, device=device)
        self.class_level = torch.full((num_classes,), 1.0 / num_classes, device=device)

    def per_class(self) -> torch.Tensor:
        return self.class_level / self.class_level.max() * self.level

    def update(self, sums: torch.Tensor) -> None:
        """`sums`: GuidedMixOutput.unlabeled_confidence added up over the step."""
        count = sums[-1].clamp_min(1.0)
        self.level.lerp_(sums[0] / count, 1 - self.momentum)
        self.class_level.lerp_(sums[1:-1] / count, 1 - self.momentum)

    def state_dict(self) -> dict:
        return {"level": self.level, "class_level": self.class_level}

    def load_state_dict(self, state: dict) -> None:
        self.level.copy_(state["level"])
        self.class_level.copy_(state["class_level"])


def confident_pixels(confidence: torch.Tensor, label: torch.Tensor, tau, class_keep: float,
                     valid: Optional[torch.Tensor] = None, prior: Optional[torch.Tensor] = None,
                     earned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixels whose pseudo label is taught: confidence >= tau (a float, or per class: a C tensor), and with
    `class_keep` > 0 also the most
    confident share `class_keep` of the pixels predicted as each class in the batch. A fixed tau teaches
    mostly the easy majority (background); the per-class floor keeps the rarer, less confident classes
    taught (class-balanced self-training, Zou et al. 2018), at the cost of wrong labels where the teacher
    is weak. With `prior` (class shares of the labeled pixels) no class is taught beyond its share: of the
    taught pixels, class c keeps at most prior_c / (1 - prior_c) times the other classes' count, its most
    confident ones. The cap only removes pixels, so a weak teacher is taught less, never more wrongly.
    With `earned` (per class, `earned_classes`) no pixel of a class that is not earned is taught."""
    valid = torch.ones_like(label, dtype=torch.bool) if valid is None else valid
    if earned is not None:
        valid = valid & earned[label.clamp(max=earned.numel() - 1)]
    if isinstance(tau, torch.Tensor):
        tau = tau[label.clamp(max=tau.numel() - 1)]
    keep = (confidence >= tau) & valid
    if class_keep > 0:
        for c in label[valid].unique():
            in_class = valid & (label == c)
            keep |= most_confident(in_class, confidence, math.ceil(class_keep * int(in_class.sum())))
    if prior is not None:
        counts = masked_bincount(label, keep, prior.numel())
        share = prior.clamp(max=0.99)
        allowed = (share / (1 - share) * (counts.sum() - counts)).floor().long()
        for c in (counts > allowed).nonzero().flatten().tolist():
            in_class = keep & (label == c)
            keep = (keep & ~in_class) | most_confident(in_class, confidence, int(allowed[c]))
    return keep


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                       over: str = "taught") -> torch.Tensor:
    """-sum_c target_c log softmax(logits)_c, averaged over the weighted pixels (`taught`), or over all pixels
    (`all`, as FixMatch and UniMatch do): then a teacher confident on few pixels teaches little."""
    per_pixel = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    count = weight.sum().clamp_min(1.0) if over == "taught" else weight.numel()
    return (per_pixel * weight).sum() / count


def guidedmix_loss(model, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, step: int,
                   cfg: "GuidedMixConfig", num_classes: int, teacher=None, find_references: Optional[ReferenceFinder] = None,
                   generator: Optional[torch.Generator] = None,
                   class_tau: Optional[torch.Tensor] = None) -> GuidedMixOutput:
    """One GuidedMix step's loss. `cfg` is the config's `guidedmix` section; `teacher` an EMA copy of the
    model (or None: the model teaches itself); `find_references` pairs from outside (else in-batch);
    `class_tau` per-class thresholds (AdaptiveThresholds) in place of `cfg.tau` for the pseudo labels."""
    b_l, b_u = x_l.shape[0], x_u.shape[0]
    size = x_u.shape[-2:]

    # 1. the first pass: labeled and unlabeled predictions, and the embeddings that pairing compares
    if cfg.shared_bn:  # the paper: one pass, labeled and unlabeled share normalisation statistics
        low, high = model.encode(torch.cat([x_l, x_u]))
        logits_l, logits_u = model.classify(model.decode(low, high), size).split([b_l, b_u])
    else:  # each batch normalised by its own statistics, as in the supervised baseline
        (low_l, high_l), (low_u, high_u) = model.encode(x_l), model.encode(x_u)
        high = torch.cat([high_l, high_u])
        logits_l = model.classify(model.decode(low_l, high_l), size)
        logits_u = model.classify(model.decode(low_u, high_u), size)
    embeddings = model.embed(high).detach()
    with torch.no_grad():  # the teacher's clean view of x_u (what the class criteria pair on, too)
        p_u = logits_u.softmax(1) if teacher is None else teacher(x_u).softmax(1)
        if cfg.align:
            p_u = align_distribution(p_u, class_shares(y_l, num_classes))
        conf_u, hard_u = p_u.max(1)
        unlabeled_confidence = None  # only adaptive thresholds follow it: no work on the fixed-tau step
        if class_tau is not None:
            unlabeled_confidence = torch.cat([conf_u.sum().view(1), p_u.sum((0, 2, 3)),
                                              torch.full((1,), conf_u.numel(), device=p_u.device)])
        shares_l, shares_u = image_class_shares(y_l, num_classes), image_class_shares(hard_u, num_classes)
        overlap = class_overlap(logits_l, y_l, num_classes)

    # 2. pairing (no gradient through the choice), then mixing
    found = find_references(embeddings[b_l:], shares_u) if find_references is not None else None
    if found is None:
        index = pair(embeddings[b_l:], embeddings[:b_l], cfg.pairing.similarity, cfg.pairing.topk,
                     cfg.pairing.temperature, generator, query_shares=shares_u, candidate_shares=shares_l,
                     need=class_need(overlap))
        x_r, y_r = x_l[index], y_l[index]
    else:
        index, (x_r, y_r) = None, found
    lam = sample_lam(b_u, size[0], size[1], cfg.lam_max, cfg.mix, generator, x_u.device, y_r)
    x_m = mix(strong_augment(x_u, generator) if cfg.strong_aug else x_u, x_r, lam)

    # 3. the mixed batch, with MITrans
    with frozen_bn_statistics(model):
        features_m = model.decode(*model.encode(x_m))
    if cfg.mitrans.enabled:
        features_m = model.mitrans(features_m)
    logits_m = model.classify(features_m, size)

    # 4. mask generation, from the teacher's view (the model itself, detached, or its EMA copy)
    with torch.no_grad():
        p_m = (logits_m if teacher is None else teacher(x_m, use_mitrans=cfg.mitrans.enabled)).softmax(1)
        p_r = None
        if cfg.decouple_with == "prediction":
            p_r = (teacher or model)(x_r).softmax(1)
        ref = reference_distribution(y_r, p_r, num_classes)
        pseudo, confidence = generate_mask(p_m, ref, lam)
        # the mixed view's target: the reference's share plus the clean view's prediction of x_u
        prior = class_shares(y_l, num_classes) if cfg.class_cap else None
        earned = earned_classes(logits_l, y_l, cfg.tau, cfg.earn_precision) if cfg.earn_precision > 0 else None
        tau = cfg.tau if class_tau is None else class_tau
        trusted_u = confident_pixels(conf_u, hard_u, tau, cfg.class_keep, lam.squeeze(1) < 1, prior, earned)
        target_u = p_u if cfg.mix_target == "soft" else onehot(hard_u, num_classes)
        target_m = lam * ref + (1 - lam) * target_u
        # pixels whose x_u share is trusted (or absent), and whose reference share is known
        known_ref = (ref.sum(1) > 0) | (lam.squeeze(1) == 0)
        weight_m = ((trusted_u | (lam.squeeze(1) >= 1)) & known_ref).float()

    # 5. losses
    loss_sup = F.cross_entropy(logits_l, y_l, ignore_index=IGNORE)
    w = rampup(step, cfg.warmup_steps, cfg.rampup_steps, cfg.unsup_weight)
    # what the unlabeled pixels are taught: the decoupled pseudo mask (L_unsup), else the clean view's
    # confident argmax that the mixed view learns where x_u shows through
    loss_unsup = logits_u.sum() * 0.0
    if cfg.unsup_loss:
        confident = confident_pixels(confidence, pseudo, tau, cfg.class_keep, pseudo != IGNORE, prior, earned)
        taught = torch.where(confident, pseudo, IGNORE)
        loss_unsup = torch.nan_to_num(F.cross_entropy(logits_u, taught, ignore_index=IGNORE))  # none: 0
    else:
        taught = torch.where(trusted_u & (lam.squeeze(1) < 1), hard_u, IGNORE)
    loss_mix = logits_m.sum() * 0.0
    if cfg.mix_loss:
        loss_mix = soft_cross_entropy(logits_m, target_m, weight_m, cfg.loss_over)
    loss = loss_sup + w * (loss_unsup + loss_mix)
    parts = {"sup": loss_sup.detach(), "weight": w, "taught": (taught != IGNORE).float().mean(), "lam": lam.mean()}
    # only the terms the objective has: a progress line of `unsup 0.000` reads as a broken loss
    parts.update({name: term.detach() for name, term, on in (("unsup", loss_unsup, cfg.unsup_loss),
                                                             ("mix", loss_mix, cfg.mix_loss)) if on})
    return GuidedMixOutput(loss, parts, pseudo=taught, pairing=index, labeled_embeddings=embeddings[:b_l],
                           labeled_shares=shares_l, labeled_overlap=overlap,
                           unlabeled_confidence=unlabeled_confidence)


@torch.no_grad()
def ema_update(teacher, student, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student; buffers (BN statistics) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
