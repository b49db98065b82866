"""The semi-supervised kit (bench/semi.py) against hand-written copies of the reference formulas."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.models import Segmenter
from bench.semi import (EMATeacher, StrongAugment, class_mix_masks, confident_cross_entropy, confident_ratio,
                        cutmix_boxes, mixing_partner, paste, pseudo_labels, ramp_decay, random_rescale_crop,
                        soft_consistency)


def test_confident_cross_entropy_divides_by_every_valid_pixel_as_unimatch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    conf = torch.rand(2, 5, 6, generator=g)
    ignore_mask = torch.zeros(2, 5, 6)
    ignore_mask[0, :2] = 255
    # unimatch.py: criterion_u(pred, mask) * ((conf >= t) & (ignore_mask != 255)), summed,
    # / torch.sum(ignore_mask != 255)
    loss_u = nn.CrossEntropyLoss(reduction="none")(logits, target)
    loss_u = loss_u * ((conf >= 0.5) & (ignore_mask != 255))
    expected = torch.sum(loss_u) / torch.sum(ignore_mask != 255).item()
    assert confident_cross_entropy(logits, target, conf, 0.5, ignore_mask != 255).item() == pytest.approx(expected.item())
    # not a mean over the confident pixels only
    assert expected < loss_u[(conf >= 0.5) & (ignore_mask != 255)].mean()
    assert confident_cross_entropy(logits, target, conf, 2.0).item() == 0  # nobody confident
    none_valid = confident_cross_entropy(logits.requires_grad_(), target, conf, 0.5, torch.zeros_like(conf, dtype=torch.bool))
    assert none_valid.item() == 0 and none_valid.requires_grad


def test_confident_ratio_is_the_logged_mask_share():
    conf = torch.tensor([[[0.99, 0.5], [0.96, 0.2]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    assert confident_ratio(conf, 0.95, valid).item() == pytest.approx(2 / 3)
    assert confident_ratio(conf, 0.95).item() == pytest.approx(2 / 4)
    label, c = pseudo_labels(torch.tensor([[[[2.0]], [[0.0]]]]))
    assert label.item() == 0 and c.item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))


def _reference_cutmix_box(img_size, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3):
    """UniMatch dataset/transform.py obtain_cutmix_box, written out again here."""
    mask = torch.zeros(img_size, img_size)
    if random.random() > p:
        return mask
    size = np.random.uniform(size_min, size_max) * img_size * img_size
    while True:
        ratio = np.random.uniform(ratio_1, ratio_2)
        cutmix_w = int(np.sqrt(size / ratio))
        cutmix_h = int(np.sqrt(size * ratio))
        x = np.random.randint(0, img_size)
        y = np.random.randint(0, img_size)
        if x + cutmix_w <= img_size and y + cutmix_h <= img_size:
            break
    mask[y:y + cutmix_h, x:x + cutmix_w] = 1
    return mask


def _box_stats(boxes):
    boxes = boxes.bool()
    has = boxes.flatten(1).any(1)
    area = boxes[has].flatten(1).float().mean(1)
    rows, cols = boxes[has].any(2).sum(1).float(), boxes[has].any(1).sum(1).float()
    centre_y = (boxes[has].any(2).float() * torch.arange(boxes.shape[1])).sum(1) / rows
    return has.float().mean().item(), area.mean().item(), area.std().item(), (cols / rows).log().mean().item(), \
        centre_y.mean().item()


def test_cutmix_boxes_match_the_reference_draw_statistics():
    random.seed(0)
    np.random.seed(0)
    reference = torch.stack([_reference_cutmix_box(32) for _ in range(3000)])
    ours = cutmix_boxes(3000, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ours.shape == (3000, 32, 32) and ours.dtype == torch.bool
    ref_stats, our_stats = _box_stats(reference), _box_stats(ours)
    # probability of a box, mean and spread of its area, mean log aspect, mean centre row
    for ref, got, tol in zip(ref_stats, our_stats, (0.03, 0.01, 0.01, 0.05, 0.4)):
        assert got == pytest.approx(ref, abs=tol), (ref_stats, our_stats)
    # every box is one axis-aligned rectangle inside the image
    for box in ours[:200]:
        if box.any():
            r, c = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
            assert box[r.min():r.max() + 1, c.min():c.max() + 1].all() and box.sum() == len(r) * len(c)
    assert not cutmix_boxes(50, 8, 8, p=0.0).any()
    assert cutmix_boxes(50, 8, 8, p=1.0).flatten(1).any(1).float().mean() > 0.8  # tiny boxes can round to 0


def test_ema_teacher_averages_parameters_and_buffers_and_stays_frozen_in_its_mode():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    teacher = EMATeacher(student, decay=0.9, schedule="constant", buffers=True, mode="train")
    student(torch.randn(2, 3, 4, 4) * 3 + 1)  # moves the student's BN running statistics
    with torch.no_grad():
        student[0].weight.add_(1.0)
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    teacher.update(student, step=0)
    for k, s in student.state_dict().items():
        t = teacher.network.state_dict()[k]
        if s.is_floating_point():  # every float entry: 0.9 * teacher + 0.1 * student
            assert torch.allclose(t, 0.9 * before[k] + 0.1 * s), k
        else:
            assert torch.equal(t, s), k  # num_batches_tracked: copied
    assert not any(p.requires_grad for p in teacher.parameters())
    # parameters only: BN statistics are the teacher's own
    teacher2 = EMATeacher(student, 0.5, buffers=False)
    running = teacher2.network[1].running_mean.clone()
    student(torch.randn(2, 3, 4, 4) + 5)
    teacher2.update(student, step=5)
    assert torch.equal(teacher2.network[1].running_mean, running)
    # the mode: fixed while the owner trains, eval when it evaluates
    owner = nn.Module()
    owner.a = EMATeacher(student, mode="eval")
    owner.b = EMATeacher(student, mode="train")
    owner.train()
    assert not owner.a.network.training and owner.b.network.training
    owner.eval()
    assert not owner.a.network.training and not owner.b.network.training
    assert any(k.startswith("a.network.") for k in owner.state_dict())  # checkpointed with its owner


def test_ramp_decay_and_a_parameters_only_update_are_the_formula():
    """teacher <- d * teacher + (1 - d) * student with d = min(1 - 1/(step + 1), 0.99), parameters
    only (prcl's teacher): BatchNorm statistics stay the teacher's own."""
    assert [ramp_decay(s, 0.99) for s in (0, 1, 3, 1000)] == [0.0, 0.5, 0.75, 0.99]
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    kit = EMATeacher(student, 0.99, "ramp", buffers=False)
    by_hand = [p.detach().clone() for p in student.parameters()]
    buffers = [b.clone() for b in kit.network.buffers()]
    for step in range(4):
        with torch.no_grad():
            student[0].weight.mul_(1.1).add_(0.1)
        student(torch.randn(2, 3, 4, 4))
        kit.update(student, step)
        d = min(1 - 1 / (step + 1), 0.99)
        by_hand = [t * d + s.detach() * (1 - d) for t, s in zip(by_hand, student.parameters())]
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(kit.network.parameters(), by_hand))
    assert all(torch.equal(a, b) for a, b in zip(kit.network.buffers(), buffers))


def test_class_mix_and_paste():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[3, 3, 3, 3], [3, 3, 3, 3]]])
    mask = class_mix_masks(labels, 4, 255, torch.Generator().manual_seed(0))
    assert len({c for c in (0, 1, 2) if mask[0][labels[0] == c].all()}) == 2  # ceil(3 / 2)
    for c in (0, 1, 2):
        assert mask[0][labels[0] == c].all() or not mask[0][labels[0] == c].any()
    assert not mask[0][labels[0] == 255].any() and mask[1].all()
    # "floor_unique" (PRCL's reference): len(unique) // 2 values, the ignore value one of them
    mask = class_mix_masks(labels, 4, 255, torch.Generator().manual_seed(0), count="floor_unique")
    assert len({v for v in (0, 1, 2, 255) if mask[0][labels[0] == v].all()}) == 2 and not mask[1].any()
    with pytest.raises(ValueError, match="ceil_present, floor_unique"):
        class_mix_masks(labels, 4, 255, count="half")
    box = torch.zeros(2, 2, 4, dtype=torch.bool)
    box[:, 0, :2] = True
    a, b = torch.zeros(2, 3, 2, 4), torch.ones(2, 3, 2, 4)
    mixed = paste(box, a, b)
    assert mixed[:, :, 0, :2].eq(1).all() and mixed.sum() == 2 * 3 * 2
    assert torch.equal(paste(box, labels[:, :, :4] * 0, labels[:, :, :4] + 1)[box], (labels[:, :, :4] + 1)[box])


def test_views_mark_padding_invalid_and_strong_augment_keeps_shape():
    images = torch.randn(3, 3, 16, 16)
    torch.manual_seed(0)
    out, labels, conf, valid = random_rescale_crop(images, (0.5, 0.5), torch.zeros(3, 16, 16, dtype=torch.long),
                                                   torch.ones(3, 16, 16))
    # scale 0.5: an 8 x 8 image at the top, left or right (flip), padding elsewhere
    assert out.shape == images.shape and valid.sum((1, 2)).eq(64).all() and not valid[:, 8:].any()
    assert (labels[~valid] == 255).all() and (conf[~valid] == 0).all() and (conf[valid] == 1).all()
    partner, ok = mixing_partner(images, "next_image", (0.5, 2.0))
    assert torch.equal(partner[0], images[1]) and torch.equal(partner[2], images[0]) and ok.all()
    strong = StrongAugment()(images, torch.Generator().manual_seed(0))
    assert strong.shape == images.shape and torch.isfinite(strong).all() and not torch.allclose(strong, images)
    with pytest.raises(ValueError, match="same_image"):
        mixing_partner(images, "other", (0.5, 2.0))


def test_soft_consistency_is_the_summed_squared_probability_difference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.softmax(torch.randn(2, 3, 4, 4, generator=g), 1)
    delta = F.softmax(s, dim=1) - t  # Britefury/cutmix-semisup-seg cons_loss_fn 'var'
    assert torch.allclose(soft_consistency(s, t), (delta * delta).sum(dim=1))


def test_segmenter_feature_perturbation():
    torch.manual_seed(0)
    net = Segmenter(3, "resnet18", 16, 16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        clean, same = net.forward_perturbed(x, 0.0)
        assert torch.allclose(clean, net(x), atol=1e-5) and torch.allclose(same, clean, atol=1e-5)
        clean, perturbed = net.forward_perturbed(x, 0.5)  # dropout is on in eval mode too
    assert clean.shape == perturbed.shape == (2, 3, 32, 32) and not torch.allclose(clean, perturbed)
