"""fixmatch, unimatch, meanteacher: each loss against a hand-written copy of its reference step on
fixed tensors, then a run of each through the CLI on tiny data (no mask reaches the unlabeled
batch; a killed run resumes to the same metrics)."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.method import RunContext
from bench.protocol import ModelSpec
from methods.fixmatch import FixMatch
from methods.meanteacher import MeanTeacher
from methods.unimatch import UniMatch
from tests.conftest import interrupt_and_resume


class StubNet(nn.Module):
    """A fixed 1x1 convolution standing in for the segmenter: the same output in train and eval mode;
    ``forward_perturbed`` adds a fixed offset to the perturbed half."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])[:, :, None, None])
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)

    def forward_perturbed(self, x, dropout):
        out = self.conv(x)
        return out, out.flip(1)

    def param_groups(self):
        return [{"params": [self.conv.weight]}, {"params": [self.conv.bias]}]


def _ctx():
    return RunContext(3, ["a", "b", "c"], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=16), 10, 0, 0.01, (0.75, 1.25))


def _fixed_batch():
    g = torch.Generator().manual_seed(0)
    return {"labeled": {"image": torch.randn(2, 3, 8, 8, generator=g), "mask": torch.randint(0, 3, (2, 8, 8), generator=g)},
            "unlabeled": {"image": torch.randn(2, 3, 8, 8, generator=g), "valid": _padded()}}


def _padded():
    """The loader's map of where the unlabeled crops are image: the first one's last 3 columns and
    the second one's last 2 rows are padding."""
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[0, :, 5:] = False
    valid[1, 6:] = False
    return valid


def _boxes():
    box1 = torch.zeros(2, 8, 8)
    box1[0, 2:6, 1:4] = 1
    box2 = torch.zeros(2, 8, 8)
    box2[1, 0:3, 0:8] = 1
    return [box1.bool(), box2.bool()]


def _stubbed(cls, monkeypatch, **cfg):
    """The method with the stub network, identity strong views, the next image as mixing partner and
    the fixed boxes, so the reference step can be written out on the same tensors."""
    method = cls(cls.Config(mix_partner="next_image", conf_threshold=0.6, **cfg), _ctx())
    method.model = StubNet()
    method.strong = lambda x: x
    boxes = iter(_boxes())
    monkeypatch.setattr(f"{cls.__module__}.cutmix_boxes", lambda *a, **k: next(boxes))
    return method.train()


def _reference_unsup(pred_s, mask_u_w, conf_u_w, ignore_mask, mask_mix, conf_mix, ignore_mix, cutmix_box, t):
    """unimatch.py / fixmatch.py: the mixed pseudo-label, confidence and ignore mask, the masked loss."""
    mask_c, conf_c, ignore_c = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
    mask_c[cutmix_box == 1] = mask_mix[cutmix_box == 1]
    conf_c[cutmix_box == 1] = conf_mix[cutmix_box == 1]
    ignore_c[cutmix_box == 1] = ignore_mix[cutmix_box == 1]
    loss = nn.CrossEntropyLoss(reduction="none")(pred_s, mask_c)
    loss = loss * ((conf_c >= t) & (ignore_c != 255))
    return torch.sum(loss) / torch.sum(ignore_c != 255).item()


def _reference_parts(batch, boxes, t=0.6):
    net = StubNet()
    img_x, mask_x = batch["labeled"]["image"], batch["labeled"]["mask"]
    img_u_w = batch["unlabeled"]["image"]
    img_u_w_mix = torch.roll(img_u_w, -1, 0)
    with torch.no_grad():
        pred_mix = net(img_u_w_mix)
        conf_mix, mask_mix = pred_mix.softmax(dim=1).max(dim=1)
        pred_w = net(img_u_w)
        conf_u_w, mask_u_w = pred_w.softmax(dim=1).max(dim=1)
    ignore = torch.where(batch["unlabeled"]["valid"], 0, 255)  # dataset/semi.py: padding 254 -> ignore_mask 255
    ignore_mix = torch.roll(ignore, -1, 0)
    strong = []
    for box in boxes:
        s = img_u_w.clone()
        s[box.unsqueeze(1).expand(s.shape) == 1] = img_u_w_mix[box.unsqueeze(1).expand(s.shape) == 1]
        strong.append(s)
    loss_x = nn.CrossEntropyLoss(ignore_index=255)(net(img_x), mask_x)
    losses_s = [_reference_unsup(net(s), mask_u_w, conf_u_w, ignore, mask_mix, conf_mix, ignore_mix, box.float(), t)
                for s, box in zip(strong, boxes)]
    loss_fp = nn.CrossEntropyLoss(reduction="none")(net(img_u_w).flip(1), mask_u_w)
    loss_fp = torch.sum(loss_fp * ((conf_u_w >= t) & (ignore != 255))) / torch.sum(ignore != 255).item()
    ratio = ((conf_u_w >= t) & (ignore != 255)).sum().item() / (ignore != 255).sum().item()
    return loss_x, losses_s, loss_fp, ratio


def test_fixmatch_loss_is_the_reference_step(monkeypatch):
    batch = _fixed_batch()
    out = _stubbed(FixMatch, monkeypatch).training_step(batch, 0)
    loss_x, (loss_s, _), _, ratio = _reference_parts(batch, _boxes())
    assert 0 < loss_s < loss_x  # some pixels confident, some not: the formula is exercised
    assert out["loss"].item() == pytest.approx(((loss_x + loss_s) / 2.0).item(), rel=1e-5)
    assert out["unsup"].item() == pytest.approx(loss_s.item(), rel=1e-5)
    assert out["confident"].item() == pytest.approx(ratio) and 0 < ratio < 1


def test_unimatch_loss_is_the_reference_step(monkeypatch):
    batch = _fixed_batch()
    out = _stubbed(UniMatch, monkeypatch).training_step(batch, 0)
    loss_x, (loss_s1, loss_s2), loss_fp, ratio = _reference_parts(batch, _boxes())
    expected = (loss_x + loss_s1 * 0.25 + loss_s2 * 0.25 + loss_fp * 0.5) / 2.0
    assert loss_s1 != loss_s2
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["fp"].item() == pytest.approx(loss_fp.item(), rel=1e-5)
    assert out["confident"].item() == pytest.approx(ratio)


def test_unimatch_pseudo_labels_the_mixing_view_in_eval_mode(monkeypatch):
    method = UniMatch(UniMatch.Config(), _ctx()).train()
    modes = []
    original = method.model.forward

    def spy(x):
        modes.append(method.model.training)
        return original(x)

    monkeypatch.setattr(method.model, "forward", spy)
    g = torch.Generator().manual_seed(0)
    batch = {"labeled": {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": torch.zeros(2, 32, 32, dtype=torch.long)},
             "unlabeled": {"image": torch.randn(2, 3, 32, 32, generator=g), "valid": torch.ones(2, 32, 32, dtype=torch.bool)}}
    out = method.training_step(batch, 0)
    assert modes == [False, True] and method.model.training  # the mixing view, then the strong views
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "sup", "unsup", "fp", "confident"}


@pytest.mark.parametrize("targets, per_pixel", [("soft", False), ("soft", True), ("hard", False)])
def test_meanteacher_loss_is_the_reference_consistency(targets, per_pixel):
    torch.manual_seed(0)
    method = MeanTeacher(MeanTeacher.Config(targets=targets, conf_per_pixel=per_pixel, conf_threshold=0.6,
                                            unsup_weight=0.5), _ctx())
    method.model = StubNet()
    method.teacher.network = StubNet()
    with torch.no_grad():
        method.teacher.network.conv.weight.mul_(0.5)  # teacher and student differ
    method.strong = lambda x: x.flip(-1)
    method.train()
    batch = _fixed_batch()
    out = method.training_step(batch, 0)
    weak = batch["unlabeled"]["image"]
    sup = nn.CrossEntropyLoss(ignore_index=255)(method.model(batch["labeled"]["image"]), batch["labeled"]["mask"])
    logits_tea, logits_stu = method.teacher(weak), method.model(weak.flip(-1))
    prob_tea = F.softmax(logits_tea, dim=1)
    conf_tea = prob_tea.max(dim=1)[0]
    valid = batch["unlabeled"]["valid"].float()
    if targets == "soft":  # train_seg_semisup_aug_mt.py, cons_loss_fn 'var' (the views share geometry here)
        loss_mask = valid[:, None, :, :]  # mask_tea_in_stu: the pixels inside the image in both views
        conf_mask = (conf_tea >= 0.6).float()[:, None, :, :]
        if not per_pixel:
            conf_mask = conf_mask.mean()
        loss_mask = loss_mask * conf_mask
        delta = F.softmax(logits_stu, dim=1) - prob_tea
        unsup = ((delta * delta).sum(dim=1, keepdim=True) * loss_mask).mean()
    else:  # the kit's confident CE: summed over confident valid pixels, divided by the valid ones
        ce = F.cross_entropy(logits_stu, logits_tea.argmax(1), reduction="none")
        unsup = (ce * (conf_tea >= 0.6) * valid).sum() / valid.sum()
    assert 0 < (conf_tea >= 0.6).float().mean() < 1
    assert out["loss"].item() == pytest.approx((sup + 0.5 * unsup).item(), rel=1e-5)


def test_meanteacher_teacher_is_frozen_evaluated_and_averaged():
    torch.manual_seed(0)
    method = MeanTeacher(MeanTeacher.Config(), _ctx())
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert all(p.requires_grad for g in method.param_groups() for p in g["params"])
    method.train()
    assert method.teacher.network.training  # French et al.'s teacher runs in train mode
    with torch.no_grad():
        method.model.classifier.bias += 1.0
    bias = method.teacher.network.classifier.bias.clone()
    method.on_step_end(0)  # constant decay 0.99 from the first step
    assert torch.allclose(method.teacher.network.classifier.bias, 0.99 * bias + 0.01 * method.model.classifier.bias)
    method.eval()
    x = torch.randn(1, 3, 32, 32)
    assert method.eval_network == "ema_teacher" and torch.allclose(method.predict(x), method.teacher(x))


@pytest.mark.parametrize("cls", [FixMatch, UniMatch, MeanTeacher], ids=lambda c: c.name)
def test_run_sees_no_unlabeled_mask_and_resumes_to_the_same_metrics(cls, tmp_path, tiny_protocol, monkeypatch):
    from bench.cli import main

    seen_keys = []
    original_step = cls.training_step

    def spy(self, batch, step, stage="train"):
        seen_keys.append(set(batch["unlabeled"]))
        return original_step(self, batch, step, stage)

    def run(results, cache):
        return main(["run", "--methods", cls.name, "--protocol", str(tiny_protocol), "--results-dir", str(results),
                     "--cache-dir", str(cache), "--no-progress", "train.iterations=6"])

    monkeypatch.setattr(cls, "training_step", spy)
    assert run(tmp_path / "ref", tmp_path / "ref-cache") == 0
    assert len(seen_keys) == 6 and all(keys == {"image", "valid", "index"} for keys in seen_keys)
    [ref] = (tmp_path / "ref").rglob("result.json")
    ref = json.loads(ref.read_text())
    assert ref["supervision"] == ["pixel_labels", "unlabeled_images"]
    state, resumed = interrupt_and_resume(run, cls, tmp_path, monkeypatch)
    assert state["step"] == 3 and resumed["resumed_from_step"] == 3
    assert resumed["metrics"] == ref["metrics"]
    if cls is MeanTeacher:
        assert any(k.startswith("teacher.network.") for k in state["method"]) and ref["eval_network"] == "ema_teacher"


@pytest.mark.parametrize("protocol", ["synth_1_8", "voc_unimatch_92"])
def test_every_method_takes_the_head_lr_from_its_protocol(protocol):
    """UniMatch's 10x head LR is a schedule setting: the voc_unimatch protocols give it to every method
    (train.head_lr_mult: 10), synth to none, so fixmatch and unimatch train as ce does."""
    from bench.protocol import load_protocol
    from bench.trainer import build_optimizer
    from methods.ce import CE

    train = load_protocol(protocol).train
    spec = train.model_copy(update={"optimizer": train.optimizer.model_copy(update={"lr": 0.001})})
    for cls in (CE, FixMatch, UniMatch, MeanTeacher):
        method = cls(cls.Config(), _ctx())
        groups = method.param_groups()
        # Method's default groups: the segmenter's own backbone/head split, in its order (optimiser
        # state in checkpoints keeps lining up); an EMA teacher stays out
        assert [[id(p) for p in g["params"]] for g in groups] == \
            [[id(p) for p in g["params"]] for g in method.model.param_groups()], cls.name
        lrs = {g["name"]: g["lr"] for g in build_optimizer(groups, spec).param_groups}
        expected = 0.001 * spec.head_lr_mult
        assert lrs == pytest.approx({"backbone": 0.001, "head": expected}), cls.name
    assert (spec.head_lr_mult == 10.0) == protocol.startswith("voc_unimatch")
