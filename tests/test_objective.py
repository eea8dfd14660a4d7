"""Unit tests of the pure-PyTorch algorithm: model, pairing, mixing, mask generation, losses, mIoU."""
import io

import pytest
import torch
import torch.nn.functional as F

from trainer import evaluate, guidedmix, ssl
from trainer.config import Config
from trainer.model import DeepLabV3Plus, load_backbone_weights


def small_model(num_classes=5, output_stride=16, backbone="tiny"):
    return DeepLabV3Plus(num_classes, backbone, output_stride, 32, 32, (1, 2, 3))


def test_pairing_picks_the_brute_force_argmax():
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(16, 12, generator=g), dim=1)
    bank = F.normalize(torch.randn(40, 12, generator=g), dim=1)
    chosen = guidedmix.pair(query, bank)
    for i in range(16):
        sims = [float(query[i] @ bank[j]) for j in range(40)]
        assert chosen[i].item() == max(range(40), key=sims.__getitem__)
    least = guidedmix.pair(query, bank, similarity="least")
    assert all(float(query[i] @ bank[least[i]]) == min(float(query[i] @ b) for b in bank) for i in range(16))


def test_topk_pairing_stays_inside_the_top_k():
    g = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(8, 6, generator=g), dim=1)
    bank = F.normalize(torch.randn(30, 6, generator=g), dim=1)
    top3 = (query @ bank.T).topk(3, dim=1).indices
    for _ in range(5):
        chosen = guidedmix.pair(query, bank, topk=3, temperature=1.0, generator=g)
        assert all(chosen[i] in top3[i] for i in range(8))


def test_mixing_with_lam_zero_returns_the_unlabeled_image():
    x_u, x_r = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.equal(ssl.mix(x_u, x_r, torch.zeros(2, 1, 8, 8)), x_u)
    lam = ssl.sample_lam(64, 8, 8, 0.5, "interp")
    assert lam.min() >= 0 and lam.max() < 0.5 and lam.std() > 0


def test_region_lam_is_a_box_of_ones():
    lam = ssl.sample_lam(16, 32, 32, 0.5, "region", torch.Generator().manual_seed(3))
    assert set(lam.unique().tolist()) <= {0.0, 1.0}
    assert (lam.mean(dim=(1, 2, 3)) <= 0.5 + 1e-6).all() and lam.sum() > 0


def test_class_pairing_draws_the_partner_with_the_lacking_or_needed_classes():
    # four candidate masks over 4 classes (0 is the background every image holds)
    candidate_masks = torch.zeros(4, 8, 8, dtype=torch.long)
    for k, c in enumerate((1, 2, 3)):
        candidate_masks[k + 1, :4] = c  # candidate k+1 holds class c on half its pixels; candidate 0 only background
    candidate_masks[0, 0, 0] = ssl.IGNORE  # ignored pixels are left out of the shares
    shares = guidedmix.image_class_shares(candidate_masks, 4)
    assert torch.allclose(shares.sum(1), torch.ones(4))
    assert torch.allclose(shares[2], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert torch.allclose(shares[0], guidedmix.class_shares(candidate_masks[0], 4))
    embeddings = F.normalize(torch.randn(4, 6), dim=1)
    query = F.normalize(torch.randn(3, 6), dim=1)
    # the queries' predictions: background plus classes 1 and 2, so only class 3 is lacking
    predicted = torch.zeros(3, 8, 8, dtype=torch.long)
    predicted[:, :2], predicted[:, 2:4] = 1, 2
    g = torch.Generator().manual_seed(0)
    chosen = torch.cat([guidedmix.pair(query, embeddings, "complement", temperature=0.05, generator=g,
                                       query_shares=guidedmix.image_class_shares(predicted, 4),
                                       candidate_shares=shares) for _ in range(50)])
    assert (chosen == 3).float().mean() > 0.95  # the one partner holding class 3
    # need: the model does worst on class 2
    need = torch.tensor([0.05, 0.2, 0.9, 0.2])
    chosen = torch.cat([guidedmix.pair(query, embeddings, "need", temperature=0.05, generator=g,
                                       candidate_shares=shares, need=need) for _ in range(50)])
    assert (chosen == 2).float().mean() > 0.9
    # the same need everywhere: every partner is as good (each mask's shares sum to one), a uniform draw
    chosen = torch.cat([guidedmix.pair(query, embeddings, "need", generator=g, candidate_shares=shares,
                                       need=torch.full((4,), 0.5)) for _ in range(200)])
    assert torch.bincount(chosen, minlength=4).min() > 100
    with pytest.raises(ValueError, match="complement needs class shares"):
        guidedmix.pair(query, embeddings, "complement", candidate_shares=shares)


def test_class_need_is_one_minus_the_iou_of_each_class_on_the_labeled_batch():
    y_l = torch.tensor([[[0, 0, 1, 1], [0, 0, 2, ssl.IGNORE]]])
    hard = torch.tensor([[[0, 1, 1, 1], [0, 0, 0, 3]]])  # the ignored pixel's prediction does not count
    logits = F.one_hot(hard, 5).permute(0, 3, 1, 2).float()
    overlap = guidedmix.class_overlap(logits, y_l, 5)
    # class 0: 3 right of 4 true and 4 predicted -> IoU 3/5; class 1: 2 of 3 -> 2/3; class 2: missed -> 0
    assert overlap.tolist() == [[3, 2, 0, 0, 0], [5, 3, 1, 0, 0]]
    need = guidedmix.class_need(overlap)
    assert need.tolist() == pytest.approx([0.4, 1 / 3, 1.0, 1.0, 1.0])  # classes 3, 4: never seen, needed most


def test_class_mix_pastes_whole_classes_of_the_partner_within_lam_max():
    g = torch.Generator().manual_seed(4)
    y_r = torch.zeros(6, 16, 16, dtype=torch.long)
    y_r[:, :4], y_r[:, 4:6, :8], y_r[:, 12:, 8:] = 1, 2, 3  # shares 1/4, 1/16, 1/8, the rest background
    y_r[:, 15, 0] = ssl.IGNORE
    lam = ssl.sample_lam(6, 16, 16, 0.3, "class", g, y_r=y_r)
    assert lam.shape == (6, 1, 16, 16) and set(lam.unique().tolist()) <= {0.0, 1.0}
    assert (lam.mean(dim=(1, 2, 3)) <= 0.3).all()
    pasted = lam.squeeze(1).bool()
    for i in range(6):
        for c in range(4):  # a class is pasted whole or not at all
            in_class = y_r[i] == c
            assert pasted[i][in_class].all() or not pasted[i][in_class].any()
        assert not pasted[i][y_r[i] == 0].any()  # the background (0.56 of the image) is over the budget
        assert pasted[i][y_r[i] == ssl.IGNORE].sum() == 0
    assert pasted.any(dim=(1, 2)).all()  # something always fits: class 1 alone, or classes 2 and 3
    assert len({tuple(pasted[i].flatten().tolist()) for i in range(6)}) > 1  # which, by a random order


@pytest.mark.parametrize("mode", ["interp", "region", "class"])
def test_mask_generation_recovers_the_unlabeled_one_hot(mode):
    c, g = 6, torch.Generator().manual_seed(2)
    y_u = torch.randint(0, c, (4, 16, 16), generator=g)
    y_r = torch.randint(0, c, (4, 16, 16), generator=g)
    lam = ssl.sample_lam(4, 16, 16, 0.5, mode, g, y_r=y_r)
    ref = guidedmix.onehot(y_r, c)
    p_m = lam * ref + (1 - lam) * guidedmix.onehot(y_u, c)  # the true mixture
    pseudo, confidence = guidedmix.generate_mask(p_m, ref, lam)
    visible = lam.squeeze(1) < 1
    assert torch.equal(pseudo[visible], y_u[visible])
    assert torch.allclose(confidence[visible], torch.ones(()))
    assert (pseudo[~visible] == 255).all()


class _GivenLogits(torch.nn.Module):
    """A "model" that answers every input with the logits it was given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_losses_ignore_255():
    """The project's losses on a mask whose left half is 255: the supervised loss equals the loss on the
    right half alone, and nothing in the left half (however wrong) moves it; the mixed view's soft loss
    weights those pixels by zero; their one-hot is zero."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    marked = target.clone()
    marked[:, :, :4] = 255
    right_half = ssl.supervised_loss(_GivenLogits(logits[..., 4:]), None, target[..., 4:]).loss
    assert torch.allclose(ssl.supervised_loss(_GivenLogits(logits), None, marked).loss, right_half)
    wild = logits.clone()
    wild[..., :4] = 100 * torch.randn(2, 4, 8, 4, generator=g)
    assert torch.allclose(ssl.supervised_loss(_GivenLogits(wild), None, marked).loss, right_half)
    weight = (marked != 255).float()
    assert torch.allclose(guidedmix.soft_cross_entropy(wild, guidedmix.onehot(marked, 4), weight), right_half)
    assert guidedmix.onehot(marked, 4)[..., :4].abs().sum() == 0


def test_mitrans_keeps_shapes_gets_gradients_and_is_unused_at_inference():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    features = model.decode(*model.encode(x))
    refined = model.mitrans(features)
    assert refined.shape == features.shape
    refined.square().mean().backward()
    assert model.mitrans.out.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        plain = model(x)
        model.mitrans.out.weight.data.normal_()  # a non-identity MITrans changes nothing at inference
        assert torch.equal(model(x), plain)
        assert not torch.equal(model(x, use_mitrans=True), plain)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_size_equals_input_size(output_stride):
    model = small_model(output_stride=output_stride).eval()
    for shape in [(1, 3, 64, 64), (2, 3, 50, 77)]:
        assert model(torch.randn(shape)).shape == (shape[0], 5, shape[2], shape[3])


def test_saved_state_dict_restores_identical_outputs():
    model = small_model().eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(model(x), other(x))
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(model(x), other(x))


def test_backbone_weights_in_torchvision_format_load():
    source = small_model(backbone="resnet18")
    state = {**source.backbone.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    target = small_model(backbone="resnet18")
    load_backbone_weights(target, state)
    assert torch.equal(target.backbone.conv1.weight, source.backbone.conv1.weight)
    with pytest.raises(ValueError, match="do not match"):
        load_backbone_weights(small_model(backbone="tiny"), state)


def test_miou_equals_a_hand_computed_confusion_matrix():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 0]])
    target = torch.tensor([[0, 1, 1, 1], [2, 255, 2, 0]])
    cm = evaluate.confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[2, 0, 0], [1, 2, 0], [0, 1, 1]]
    miou, per_class = evaluate.iou(cm)
    # class 0: tp 2, union 3; class 1: tp 2, union 4; class 2: tp 1, union 2
    assert per_class == pytest.approx([2 / 3, 2 / 4, 1 / 2])
    assert miou == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)


def test_sliding_window_matches_whole_image_for_a_pointwise_model():
    model = torch.nn.Conv2d(3, 4, 1)  # no spatial context: windows must agree with the whole image
    images = torch.randn(1, 3, 40, 70)
    whole = evaluate.predict(model, images, 4)
    slide = evaluate.predict(model, images, 4, mode="slide", window=32, stride=20)
    assert torch.allclose(whole, slide, atol=1e-6)
    flipped = evaluate.predict(model, images, 4, flip=True)
    assert torch.allclose(flipped, whole, atol=1e-6)


def test_guidedmix_step_returns_parts_and_learns():
    cfg = Config().guidedmix.model_copy(update={"rampup_steps": 0})
    torch.manual_seed(0)
    model = small_model()
    x_l, y_l = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4, 32, 32))
    y_l[:, :2] = 255
    x_u = torch.randn(4, 3, 32, 32)
    out = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 10, cfg, 5)
    assert set(out.parts) >= {"sup", "mix", "weight"} and out.parts["weight"] == 1.0
    assert "unsup" not in out.parts  # the default objective has no L_unsup: no term shown as 0
    both = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 10, cfg.model_copy(update={"unsup_loss": True}), 5)
    assert set(both.parts) >= {"sup", "unsup", "mix"}
    assert out.pairing.shape == (4,) and out.pseudo.shape == (4, 32, 32)
    out.loss.backward()
    assert model.mitrans.out.weight.grad.abs().sum() > 0


def test_references_from_outside_replace_in_batch_pairing():
    """The pairing service's hook gets the unlabeled embeddings; its answer is what gets mixed in, and
    None means pairing in-batch for that step."""
    cfg = Config().guidedmix.model_copy(update={"mix": "region", "lam_max": 0.9, "unsup_loss": False})
    model = small_model()
    x_l, y_l, x_u = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)), torch.randn(3, 3, 32, 32)
    refs = (torch.randn(3, 3, 32, 32), torch.full((3, 32, 32), 4))
    seen = []

    def find(embeddings, shares):
        seen.append((embeddings, shares))
        return refs

    torch.manual_seed(0)  # the same dropout in both calls below
    out = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 0, cfg, 5, find_references=find,
                                   generator=torch.Generator().manual_seed(0))
    embeddings, shares = seen[0]
    assert embeddings.shape == (3, model.backbone.high_channels)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3))
    # the class shares of each unlabeled image's prediction, for the class criteria
    assert shares.shape == (3, 5) and torch.allclose(shares.sum(1), torch.ones(3))
    assert out.pairing is None and out.labeled_embeddings.shape == (2, model.backbone.high_channels)
    # the pasted boxes' target is the references' mask: another mask, another mix loss
    torch.manual_seed(0)
    other = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 0, cfg, 5, find_references=lambda e, s: (refs[0], refs[1] - 4),
                                     generator=torch.Generator().manual_seed(0))
    assert other.parts["mix"] != pytest.approx(out.parts["mix"])
    fallback = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 0, cfg, 5, find_references=lambda e, s: None)
    assert fallback.pairing.shape == (3,) and fallback.pairing.max() < 2


def test_rampup_is_zero_in_warmup_then_rises_to_the_weight():
    assert ssl.rampup(5, 10, 100, 1.0) == 0.0
    values = [ssl.rampup(s, 10, 100, 2.0) for s in range(10, 120, 10)]
    assert values == sorted(values) and values[-1] == 2.0 and values[0] < 0.02


def test_strong_augment_changes_pixels_but_not_geometry():
    g = torch.Generator().manual_seed(4)
    x = torch.zeros(8, 3, 16, 16)
    x[:, :, 4:8, 4:8] = 2.0  # a bright square
    y = ssl.strong_augment(x, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    inside, outside = y[:, :, 5:7, 5:7].mean(dim=(1, 2, 3)), y[:, :, 12:, 12:].mean(dim=(1, 2, 3))
    assert (inside > outside).all()  # the square stays where it was


def test_mixed_pass_leaves_running_bn_statistics_alone():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    before = [b.clone() for b in model.buffers()]
    with ssl.frozen_bn_statistics(model):
        model(x * 0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()) if a.is_floating_point())
    model(x)  # outside the context the statistics move again
    assert not all(torch.equal(a, b) for a, b in zip(before, model.buffers()) if a.is_floating_point())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_guidedmix_at_zero_weight_with_separate_bn_is_the_supervised_step():
    """The baseline comparison is fair: with the unlabeled weight at 0 and one BN pass per batch, GuidedMix
    updates every parameter used at inference exactly as supervised-only does (dropout off)."""
    cfg = Config().guidedmix.model_copy(update={"unsup_weight": 0.0, "shared_bn": False})
    torch.manual_seed(0)
    a = small_model(7)
    for m in a.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    b = small_model(7)
    b.load_state_dict(a.state_dict())
    for m in b.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x_l, y_l = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 7, (4, 32, 32), generator=g)
        x_u = torch.randn(4, 3, 32, 32, generator=g)
        ssl.supervised_loss(a, x_l, y_l).loss.backward()
        guidedmix.guidedmix_loss(b, x_l, y_l, x_u, step, cfg, 7).loss.backward()
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if not name.startswith("mitrans"):
            assert torch.allclose(p, q, atol=1e-6), name


def test_pseudo_mask_score_against_a_hand_count():
    score = evaluate.PseudoMaskScore(3)
    pseudo = torch.tensor([[[0, 1, 255], [2, 2, 1]]])
    truth = torch.tensor([[[0, 2, 1], [2, 255, 1]]])
    score.add(pseudo, truth)
    out = score.summary()
    assert out["pseudo_coverage"] == pytest.approx(5 / 6, abs=1e-4)
    assert out["pseudo_class_freq"] == pytest.approx([1 / 5, 2 / 5, 2 / 5], abs=1e-4)
    assert out["pseudo_accuracy"] == pytest.approx(3 / 4, abs=1e-4)  # (1,1) has no truth: not scored
    assert out["true_class_freq"] == pytest.approx([1 / 5, 2 / 5, 2 / 5], abs=1e-4)
    score.reset()
    score.add(pseudo)  # no withheld masks: frequencies only
    assert set(score.summary()) == {"pseudo_coverage", "pseudo_class_freq"}


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("mix", ["interp", "region"])
def test_what_the_unlabeled_pixels_are_taught_without_l_unsup(mix):
    """With only the mixed view learning, x_u's pixels are taught the clean view's argmax where it is
    confident, and nothing where a pasted box hides x_u."""
    cfg = Config().guidedmix.model_copy(update={"unsup_loss": False, "tau": 0.0, "mix": mix, "shared_bn": False})
    torch.manual_seed(0)
    model = _no_dropout(small_model())
    x_l, y_l, x_u = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)), torch.randn(3, 3, 32, 32)
    out = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 0, cfg, 5, generator=torch.Generator().manual_seed(1))
    clean = model(x_u).argmax(1)  # train mode: the same batch statistics as the step's clean pass
    taught = out.pseudo != 255
    assert torch.equal(out.pseudo[taught], clean[taught])
    if mix == "interp":
        assert taught.all()
    else:
        assert 0 < taught.float().mean() < 1  # the boxes are not taught


def test_class_balanced_floor_teaches_each_classes_most_confident_share():
    # class 0 is confident everywhere; class 1 never reaches tau; 255 marks pixels with no pseudo label
    confidence = torch.tensor([[0.99, 0.95, 0.90, 0.85, 0.4, 0.3, 0.2, 0.1, 0.9]])
    label = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 255]])
    valid = label != 255
    fixed = guidedmix.confident_pixels(confidence, label, 0.8, 0.0, valid)
    assert fixed.tolist() == [[True] * 4 + [False] * 5]  # the rare class is never taught
    balanced = guidedmix.confident_pixels(confidence, label, 0.8, 0.5, valid)
    # class 0 keeps everything above tau, class 1 its 2 most confident pixels, the invalid one nothing
    assert balanced.tolist() == [[True] * 6 + [False] * 3]
    assert guidedmix.confident_pixels(confidence, label, 1.0, 0.25, valid).tolist() == \
        [[True, False, False, False, True, False, False, False, False]]  # ceil(0.25 * 4) = 1 per class


def test_the_prior_cap_teaches_no_class_beyond_its_labeled_share():
    # the teacher is confident on 6 background pixels and 2 of class 1; the labeled pixels are half and half
    confidence = torch.tensor([[0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.5]])
    label = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1]])
    prior = guidedmix.class_shares(torch.tensor([[0, 0, 1, 1, 255]]), 2)
    assert prior.tolist() == [0.5, 0.5]
    capped = guidedmix.confident_pixels(confidence, label, 0.9, 0.0, prior=prior)
    # background keeps its 2 most confident pixels (0.5 / 0.5 x the 2 of class 1); the cap adds nothing
    assert capped.tolist() == [[True, True, False, False, False, False, True, True, False]]
    # a prior that the taught pixels already respect changes nothing; a class the labeled batch lacks goes
    assert guidedmix.confident_pixels(confidence, label, 0.9, 0.0, prior=torch.tensor([0.75, 0.25])).sum() == 8
    assert guidedmix.confident_pixels(confidence, label, 0.9, 0.0, prior=torch.tensor([1.0, 0.0])).tolist() == \
        [[True] * 6 + [False] * 3]


def test_a_class_is_taught_only_once_its_labeled_predictions_earn_it():
    # 3 classes on 7 labeled pixels: class 0 predicted confidently and right 3 of 3; class 1 confidently and
    # right 1 of 2 (a third, on an ignored pixel, does not count); class 2 only below tau
    y_l = torch.tensor([[[0, 0, 0, 1, 2, 255, 2]]])
    predicted, confident = [0, 0, 0, 1, 1, 1, 2], [True] * 6 + [False]
    logits = torch.zeros(1, 3, 1, 7)
    for i, (c, sure) in enumerate(zip(predicted, confident)):
        logits[0, c, 0, i] = 10.0 if sure else 0.5  # softmax 0.9999 or 0.45
    assert guidedmix.earned_classes(logits, y_l, 0.8, 0.9).tolist() == [True, False, False]
    earned = guidedmix.earned_classes(logits, y_l, 0.8, 0.5)
    assert earned.tolist() == [True, True, False]
    # on the unlabeled pixels, class 2's confident pixel is not taught
    confidence = torch.tensor([[0.99, 0.95, 0.99, 0.2, 0.99]])
    label = torch.tensor([[0, 1, 2, 0, 255]])
    assert guidedmix.confident_pixels(confidence, label, 0.8, 0.0, label != 255, earned=earned).tolist() == \
        [[True, True, False, False, False]]
    assert guidedmix.confident_pixels(confidence, label, 0.8, 0.0, label != 255).tolist() == \
        [[True, True, True, False, False]]


def test_adaptive_thresholds_follow_each_classes_learning_status():
    """FreeMatch's thresholds over pixels, against a hand computation: tau_t = EMA of the mean max probability,
    tau_t(c) = tau_t * p_t(c) / max_k p_t(k), both starting at 1/C. A class the teacher rarely predicts gets a
    lower threshold than the majority class; the pixels taught are those at or above their own class's threshold."""
    thresholds = guidedmix.AdaptiveThresholds(3, momentum=0.9)
    assert torch.allclose(thresholds.per_class(), torch.full((3,), 1 / 3))
    # 4 pixels: class 0 predicted with 0.9 on three, class 1 with 0.6 on one; class 2 never
    p = torch.tensor([[0.9, 0.05, 0.05]] * 3 + [[0.3, 0.6, 0.1]]).T.reshape(1, 3, 2, 2)
    conf = p.max(1).values
    sums = torch.cat([conf.sum().view(1), p.sum((0, 2, 3)), torch.tensor([4.0])])
    thresholds.update(sums)
    level = 0.9 / 3 + 0.1 * (0.9 * 3 + 0.6) / 4
    class_level = torch.tensor([0.9 / 3 + 0.1 * 3.0 / 4, 0.9 / 3 + 0.1 * 0.75 / 4, 0.9 / 3 + 0.1 * 0.25 / 4])
    expected = class_level / class_level.max() * level
    assert torch.allclose(thresholds.per_class(), expected)
    assert expected[0] > expected[1] > expected[2]
    confidence = torch.tensor([[expected[0] - 0.01, expected[1] + 0.01, expected[2] - 0.01]])
    assert guidedmix.confident_pixels(confidence, torch.tensor([[0, 1, 2]]), expected, 0.0).tolist() == \
        [[False, True, False]]


def test_adaptive_thresholds_reach_the_objective():
    """`guidedmix.threshold: adaptive`: the thresholds given replace tau, and the step reports the unlabeled
    batch's confidence sums the next thresholds follow (max-probability sum, class sums, pixel count)."""
    cfg = Config().guidedmix.model_copy(update={"rampup_steps": 0, "threshold": "adaptive"})
    torch.manual_seed(0)
    model = small_model()
    x_l, y_l, x_u = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4, 32, 32)), torch.randn(4, 3, 32, 32)
    taught = {}
    for name, class_tau in (("none", torch.ones(5) * 1.01), ("all", torch.zeros(5))):
        torch.manual_seed(1)
        out = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 10, cfg, 5, generator=torch.Generator().manual_seed(0),
                                       class_tau=class_tau)
        taught[name] = float(out.parts["taught"])
    assert taught["none"] == 0.0 and taught["all"] > 0.3
    sums = out.unlabeled_confidence
    assert sums.shape == (7,) and sums[-1] == 4 * 32 * 32 and torch.isclose(sums[1:-1].sum(), sums[-1])
    assert sums[-1] / 5 < sums[0] <= sums[-1]


def test_distribution_alignment_moves_the_batch_towards_the_labeled_shares():
    # a teacher that predicts class 0 on 90% of its mass where the labeled pixels hold 60%
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1]]).view(2, 2, 1, 1)
    aligned = guidedmix.align_distribution(p, torch.tensor([0.6, 0.4]), smoothing=0.0)
    # by hand: x (0.6/0.9, 0.4/0.1) = (0.6, 0.4) per pixel, already normalised
    assert torch.allclose(aligned.view(2, 2), torch.tensor([[0.6, 0.4], [0.6, 0.4]]))
    # a batch whose mean is the target is left as it is; probabilities stay probabilities
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 5, 8, 8, generator=g), 1)
    same = guidedmix.align_distribution(p, p.mean((0, 2, 3)), smoothing=0.0)
    assert torch.allclose(same, p, atol=1e-6)
    smoothed = guidedmix.align_distribution(p, torch.tensor([1.0, 0, 0, 0, 0]))
    assert torch.allclose(smoothed.sum(1), torch.ones(4, 8, 8)) and (smoothed[:, 1:] > 0).all()


@pytest.mark.parametrize("seed", range(20))
def test_the_prior_cap_only_removes_pixels_and_holds_every_class_to_its_share(seed):
    g = torch.Generator().manual_seed(seed)
    confidence, label = torch.rand(2, 16, 16, generator=g), torch.randint(0, 4, (2, 16, 16), generator=g)
    prior = torch.rand(4, generator=g)
    prior /= prior.sum()
    plain = guidedmix.confident_pixels(confidence, label, 0.3, 0.0)
    capped = guidedmix.confident_pixels(confidence, label, 0.3, 0.0, prior=prior)
    assert not (capped & ~plain).any()
    counts = torch.bincount(label[capped], minlength=4).float()
    # each class at most prior/(1-prior) x the others' count before capping, so at most its share of those
    before = torch.bincount(label[plain], minlength=4).float()
    assert (counts <= prior / (1 - prior) * (before.sum() - before) + 1e-6).all()


def test_the_mixed_loss_over_all_pixels_shrinks_with_what_is_taught():
    logits, target = torch.randn(2, 3, 4, 4), torch.softmax(torch.randn(2, 3, 4, 4), 1)
    weight = torch.zeros(2, 4, 4)
    weight[:, :2] = 1  # half the pixels taught
    taught = guidedmix.soft_cross_entropy(logits, target, weight, "taught")
    assert guidedmix.soft_cross_entropy(logits, target, weight, "all") == pytest.approx(taught.item() / 2)
    assert guidedmix.soft_cross_entropy(logits, target, torch.ones(2, 4, 4), "all") == \
        pytest.approx(guidedmix.soft_cross_entropy(logits, target, torch.ones(2, 4, 4), "taught").item())


def test_unimatch_teaches_only_confident_pixels_and_learns():
    """`method: unimatch`: at tau 1 nothing is confident enough, so the unlabeled losses are zero and the
    step is the supervised one; at tau 0 every pixel of x_u is taught, and a few steps lower the loss."""
    from trainer import unimatch

    torch.manual_seed(0)
    model = small_model()
    x_l, x_u, x_mix = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    y_l = torch.randint(0, 5, (4, 32, 32))
    cfg = Config()
    strict = cfg.unimatch.model_copy(update={"tau": 1.0})
    out = unimatch.unimatch_loss(model, x_l, y_l, x_u, x_mix, strict)
    assert float(out.parts["unsup"]) == 0 and float(out.parts["fp"]) == 0 and (out.pseudo == 255).all()
    assert out.loss.item() == pytest.approx(float(out.parts["sup"]) / 2, rel=1e-6)  # (L_x + 0) / 2
    everything = cfg.unimatch.model_copy(update={"tau": 0.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        out = unimatch.unimatch_loss(model, x_l, y_l, x_u, x_mix, everything, torch.Generator().manual_seed(step))
        assert (out.pseudo != 255).all() and float(out.parts["unsup"]) > 0 and float(out.parts["fp"]) > 0
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


def test_unimatch_as_the_reference_weighs_and_perturbs(monkeypatch):
    """UniMatch's reference: two strong views, each its own perturbation and its own CutMix box of the second
    batch's own strong view, and L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 from the first step; batch
    norm updates on the clean pass and the strong views' pass, not on the second batch's eval-mode pass."""
    from trainer import unimatch

    torch.manual_seed(0)
    model = small_model()
    x_l, x_u, x_mix = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    y_l = torch.randint(0, 5, (4, 32, 32))
    drawn = {"boxes": [], "augmented": []}
    boxes, strong = unimatch.cutmix_boxes, unimatch.strong_augment

    def counted_boxes(*args, **kwargs):
        drawn["boxes"].append(boxes(*args, **kwargs))
        return drawn["boxes"][-1]

    def counted_views(x, *args, **kwargs):
        drawn["augmented"].append(x)
        return strong(x, *args, **kwargs)
    monkeypatch.setattr(unimatch, "cutmix_boxes", counted_boxes)
    monkeypatch.setattr(unimatch, "strong_augment", counted_views)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    cfg = Config().unimatch.model_copy(update={"tau": 0.0, "cutmix_p": 1.0})
    out = unimatch.unimatch_loss(model, x_l, y_l, x_u, x_mix, cfg, torch.Generator().manual_seed(3))
    sup, unsup, fp = (float(out.parts[k]) for k in ("sup", "unsup", "fp"))
    assert out.loss.item() == pytest.approx((sup + 0.25 * 2 * unsup + 0.5 * fp) / 2, rel=1e-5)
    assert len(drawn["boxes"]) == 2 and not torch.equal(*drawn["boxes"])
    # each view: x_u and x_mix, each strongly perturbed on its own
    assert [x is x_u for x in drawn["augmented"]] == [True, False, True, False]
    assert all(x is x_mix for x in drawn["augmented"][1::2])
    assert norm.num_batches_tracked.item() == 2  # the clean pass and the strong views' pass both update it
    assert model.training  # back in train mode after the second batch's eval-mode pass


def test_unimatch_pastes_in_the_second_batch_with_its_eval_mode_pseudo_masks(monkeypatch):
    """Inside each box a strong view holds the second batch's pixels and is taught the second batch's pseudo
    mask, as the model predicts it in eval mode; outside, x_u's own pixels and pseudo mask."""
    from trainer import unimatch

    torch.manual_seed(0)
    model = small_model()
    x_l, x_u, x_mix = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) + 3
    y_l = torch.randint(0, 5, (4, 32, 32))
    monkeypatch.setattr(unimatch, "strong_augment", lambda x, generator=None: x)  # the views as they are mixed
    seen = {"eval": [], "train": [], "taught": []}
    forward, masked_ce = model.forward, unimatch._masked_ce

    def watched_forward(x):
        out = forward(x)
        seen["train" if model.training else "eval"].append((x, out.argmax(1)))
        return out

    def watched_ce(logits, target, keep):
        seen["taught"].append(target)
        return masked_ce(logits, target, keep)
    monkeypatch.setattr(model, "forward", watched_forward)
    monkeypatch.setattr(unimatch, "_masked_ce", watched_ce)
    cfg = Config().unimatch.model_copy(update={"tau": 0.0, "cutmix_p": 1.0})
    out = unimatch.unimatch_loss(model, x_l, y_l, x_u, x_mix, cfg, torch.Generator().manual_seed(5))
    # the boxes are the generator's first draws (the patched perturbation draws nothing)
    generator = torch.Generator().manual_seed(5)
    boxes = [unimatch.cutmix_boxes(4, 32, 32, 1.0, generator) for _ in range(2)]
    [(eval_input, pseudo_mix)], [(views, _)] = seen["eval"], seen["train"]
    assert eval_input is x_mix and model.training
    for box, view, taught in zip(boxes, views.chunk(2), seen["taught"]):
        assert box.any() and (~box).any()
        inside = box.unsqueeze(1).expand_as(x_u)
        assert torch.equal(view[inside], x_mix[inside]) and torch.equal(view[~inside], x_u[~inside])
        assert torch.equal(taught[box], pseudo_mix[box]) and torch.equal(taught[~box], out.pseudo[~box])
    assert not torch.equal(pseudo_mix, out.pseudo)  # the second batch's masks are its own


def test_cutmix_boxes_are_drawn_as_the_reference_draws_them():
    """`obtain_cutmix_box`: with probability p one box, of U(0.02, 0.4) of the image; its aspect ratio
    U(0.3, 1/0.3) and its corner drawn again until it fits inside (never clipped); here as tensors."""
    from trainer.unimatch import cutmix_boxes

    height = width = 64
    boxes = cutmix_boxes(4000, height, width, 0.5, torch.Generator().manual_seed(0))
    area = boxes.sum((1, 2)).double()
    present = area > 0
    assert abs(present.double().mean().item() - 0.5) < 0.03
    rows, cols = boxes.any(2).sum(1)[present].double(), boxes.any(1).sum(1)[present].double()
    assert torch.equal(rows * cols, area[present])  # whole rectangles
    share = area[present] / (height * width)
    assert share.min() > 0.01 and share.max() <= 0.4 and abs(share.mean().item() - 0.21) < 0.02
    ratio = rows / cols
    assert ratio.min() > 0.25 and ratio.max() < 1 / 0.25  # U(0.3, 1/0.3), floored to whole pixels
    # drawn again until it fits: large boxes lean to square (a single draw: 37% in [0.6, 1/0.6], redrawn: 64%),
    # and few span the whole image (clipped to it: 4.7%, redrawn: 0.1%)
    large = share > 0.3
    assert ((ratio[large] > 0.6) & (ratio[large] < 1 / 0.6)).double().mean() > 0.5
    assert ((rows == height) | (cols == width)).double().mean() < 0.01
    assert not cutmix_boxes(100, height, width, 0.0, torch.Generator().manual_seed(0)).any()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# each objective path that draws at random or moves a tensor between the labeled batch, the references and
# the teacher: mixing modes, pairing criteria, the EMA teacher, the decoupled loss and the class selections
OBJECTIVES = {
    "default": {},
    "class-mix-need": {"mix": "class", "pairing": {"similarity": "need"}},
    "interp-complement-soft-cap": {"mix": "interp", "mix_target": "soft", "class_cap": True,
                                   "pairing": {"similarity": "complement"}},
    "most-topk-unsup": {"pairing": {"similarity": "most", "topk": 3}, "unsup_loss": True, "class_keep": 0.5},
    "ema-prediction-align": {"teacher": "ema", "decouple_with": "prediction", "align": True},
    "earned": {"earn_precision": 0.1},
}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_objective_runs_where_the_model_is(device, bf16):
    """The loop's generator lives on the worker's device (a CUDA generator draws only CUDA tensors) and a GPU
    worker trains in bf16 (fp32 weights, the forward under autocast): every objective path takes its draws
    there, keeps its tensors on the device and mixes autocast's bf16 outputs with its own fp32 tensors."""
    from trainer import unimatch

    cfg = Config()
    torch.manual_seed(0)
    model = small_model().to(device)
    x_l, x_u = torch.randn(4, 3, 32, 32, device=device), torch.randn(4, 3, 32, 32, device=device)
    y_l = torch.randint(0, 5, (4, 32, 32), device=device)
    y_l[0, :4] = 255
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    for name, update in OBJECTIVES.items():
        gm = Config.model_validate({"guidedmix": {"rampup_steps": 0, "tau": 0.0, **update}}).guidedmix
        teacher = small_model().to(device).eval() if gm.teacher == "ema" else None
        with autocast():
            out = guidedmix.guidedmix_loss(model, x_l, y_l, x_u, 10, gm, 5, teacher,
                                           generator=torch.Generator(device=device).manual_seed(1))
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.loss.device.type == device, name
        assert out.pseudo.device.type == device and float(out.parts["taught"]) > 0, name
        assert model.classifier.weight.grad.abs().sum() > 0, name
        model.zero_grad()
    with autocast():
        out = unimatch.unimatch_loss(model, x_l, y_l, x_u, x_u.flip(0), cfg.unimatch.model_copy(update={"tau": 0.0}),
                                     torch.Generator(device=device).manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.pseudo.device.type == device


def test_masked_counts_are_the_counts_of_the_masked_values():
    """The step's counts by class, taken without boolean indexing (a wait for the device on a GPU), are the
    counts the indexing gave, ignored pixels and all."""
    torch.manual_seed(0)
    for _ in range(20):
        y = torch.randint(0, 7, (4, 16, 16))
        y[torch.rand(4, 16, 16) < 0.2] = 255
        mask = torch.rand(4, 16, 16) < 0.5
        assert torch.equal(guidedmix.masked_bincount(y, mask & (y != 255), 7),
                           torch.bincount(y[mask & (y != 255)], minlength=7))
        assert torch.equal(guidedmix.class_shares(y, 7),
                           torch.bincount(y[y != 255], minlength=7).float() / (y != 255).sum())
