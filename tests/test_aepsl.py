"""aepsl: CAMs, erasing, the pseudo-mask rule, PSL's online mask, the stopping rule, stage skip on
resume, and that no pixel label reaches the method."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.cli import main
from bench.data.folder import FolderSource
from bench.trainer import Trainer
from methods.aepsl import AEPSL, class_activation_maps, erase, mined_regions, online_mask, pseudo_masks

IGNORE = 255


def test_cam_is_relu_over_the_peak_and_zero_for_untagged_classes():
    scores = torch.tensor([[[[-1.0, 2.0], [4.0, 1.0]], [[3.0, 3.0], [3.0, 3.0]]]])  # [1, 2, 2, 2]
    cams = class_activation_maps(scores, torch.tensor([[1.0, 0.0]]))
    assert torch.equal(cams[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert torch.equal(cams[0, 1], torch.zeros(2, 2))  # untagged: never mined


def test_cam_of_a_toy_classifier_localises_a_planted_object():
    """A small fully convolutional classifier trained on tags alone ("is there a red square?")
    puts its CAM peak, and most of its mined region, on the square."""
    g = torch.Generator().manual_seed(0)

    def scenes(n):
        images = torch.rand(n, 3, 32, 32, generator=g) * 0.5
        tags = (torch.rand(n, generator=g) < 0.5).float()
        boxes = torch.randint(0, 24, (n, 2), generator=g)
        inside = torch.zeros(n, 32, 32, dtype=torch.bool)
        for i in range(n):
            if tags[i]:
                y, x = boxes[i].tolist()
                inside[i, y:y + 8, x:x + 8] = True
                images[i, :, y:y + 8, x:x + 8] = torch.tensor([1.0, 0.1, 0.1])[:, None, None]
        return images, tags[:, None], inside

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    classify = nn.Conv2d(16, 1, 1)
    opt = torch.optim.Adam([*features.parameters(), *classify.parameters()], lr=0.01)
    for _ in range(150):
        images, tags, _ = scenes(16)
        loss = F.binary_cross_entropy_with_logits(classify(features(images)).mean((2, 3)), tags)
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, tags, inside = scenes(64)
    with torch.no_grad():
        cams = class_activation_maps(classify(features(images)), tags)[:, 0]
    present = tags[:, 0] > 0
    peak = cams[present].flatten(1).argmax(1)
    assert inside[present].flatten(1).gather(1, peak[:, None]).float().mean() > 0.95
    region = mined_regions(cams[present][:, None], 0.5)[:, 0]
    precision = (region & inside[present]).sum() / region.sum()
    assert precision > 0.8
    assert cams[~present].sum() == 0  # untagged images mine nothing


def test_erasing_removes_exactly_the_thresholded_region():
    cams = torch.tensor([[[[0.2, 0.5], [0.9, 0.49]], [[0.6, 0.0], [0.0, 0.1]]]])  # [1, 2 classes, 2, 2]
    region = mined_regions(cams, 0.5)
    assert torch.equal(region, torch.tensor([[[[False, True], [True, False]], [[True, False], [False, False]]]]))
    images = torch.randn(1, 3, 2, 2)
    out = erase(images, region.any(1))
    keep = torch.tensor([[False, False], [False, True]])
    assert torch.equal(out[0][:, keep], images[0][:, keep])
    assert (out[0][:, ~keep] == 0).all()
    # a region at the CAM resolution covers whole blocks of the image, nothing else
    big = torch.randn(1, 3, 8, 8)
    out = erase(big, region.any(1))
    block = region.any(1)[0].repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert (out[0][:, block] == 0).all() and torch.equal(out[0][:, ~block], big[0][:, ~block])


def test_pseudo_mask_rule():
    claims = torch.zeros(1, 3, 1, 5, dtype=torch.bool)  # classes: background(0), a(1), b(2)
    claims[0, 1, 0, 0] = True  # only a
    claims[0, 1, 0, 1] = claims[0, 2, 0, 1] = True  # a and b: conflict
    claims[0, 2, 0, 2] = True  # only b
    # pixels 3 and 4: nobody; low CAM at 3 (background), high at 4 (unsure)
    cam_max = torch.tensor([[[0.9, 0.9, 0.9, 0.05, 0.4]]])
    with_bg = pseudo_masks(claims, cam_max, background=0, background_threshold=0.2, ignore_index=IGNORE)
    assert with_bg.tolist() == [[[1, IGNORE, 2, 0, IGNORE]]]
    without_bg = pseudo_masks(claims, cam_max, background=None, background_threshold=0.2, ignore_index=IGNORE)
    assert without_bg.tolist() == [[[1, IGNORE, 2, IGNORE, IGNORE]]]


def test_psl_online_mask_weights_by_class_probability_and_prohibits_absent_classes():
    # one pixel: the segmenter prefers class 1, but the image-level branch is unsure of it
    probs = torch.tensor([0.2, 0.45, 0.35]).log().view(1, 3, 1, 1)
    tags = torch.tensor([[1.0, 1.0, 1.0]])
    assert online_mask(probs, torch.tensor([[0.0, 0.5, 1.0]]), tags, background=0).item() == 2  # .225 < .35
    assert online_mask(probs, torch.tensor([[0.0, 1.0, 1.0]]), tags, background=0).item() == 1
    # with class 2 untagged the pixel cannot be class 2, however confident the segmenter is
    assert online_mask(probs, torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]]), background=0).item() == 1
    # background keeps weight 1 whatever its tag
    assert online_mask(probs, torch.tensor([[0.0, 0.1, 0.1]]), torch.tensor([[0.0, 1.0, 1.0]]), background=0).item() == 0
    # at scale: no pixel ever takes an untagged class
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 7, 7, generator=g) * 3
    tags = (torch.rand(6, 5, generator=g) < 0.5).float()
    tags[:, 1] = 1  # at least one tagged class per image
    mask = online_mask(logits, torch.rand(6, 5, generator=g), tags, background=None)
    assert tags.gather(1, mask.flatten(1)).min() == 1


def _run(tmp_path, protocol, *over, name="r"):
    return main(["run", "--methods", "aepsl", "--protocol", str(protocol), "--seeds", "0",
                 "--results-dir", str(tmp_path / name), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                 "aepsl.erase_epochs=1", *over])


def test_no_pixel_label_reaches_the_method_and_the_record_scores_its_pseudo_masks(tmp_path, tiny_protocol,
                                                                                   monkeypatch):
    training = {"on": False}
    original_load_mask, original_run, original_step = FolderSource.load_mask, Trainer.run, AEPSL.training_step
    seen_stages = set()

    def guarded_load_mask(self, image_id):
        assert not training["on"], "a mask was read while aepsl was training"
        return original_load_mask(self, image_id)

    def flagged_run(self):
        training["on"] = True
        try:
            original_run(self)
        finally:
            training["on"] = False

    def checked_step(self, batch, step, stage):
        assert set(batch) == {"tagged"} and "mask" not in batch["tagged"]
        seen_stages.add(stage)
        return original_step(self, batch, step, stage)

    monkeypatch.setattr(FolderSource, "load_mask", guarded_load_mask)
    monkeypatch.setattr(Trainer, "run", flagged_run)
    monkeypatch.setattr(AEPSL, "training_step", checked_step)
    assert _run(tmp_path, tiny_protocol, "aepsl.max_erase_steps=2", "aepsl.stop_loss_ratio=100") == 0
    assert seen_stages == {"erase1", "erase2", "segment"}
    [path] = (tmp_path / "r").rglob("result.json")
    record = json.loads(path.read_text())
    assert record["supervision"] == ["image_tags"]
    summary = record["method_summary"]
    assert summary["psl"] is True and summary["erasing_steps"] == 2 and summary["stopped_by_loss_at_step"] is None
    pseudo = record["pseudo_labels"]
    assert pseudo["n_images"] == 16 and 0 <= pseudo["coverage"] <= 100
    assert pseudo["all_pixels"]["miou"] <= pseudo["labeled_pixels"]["miou"] + 1e-9


def test_stopping_rule_skips_the_remaining_erasing_steps(tmp_path, tiny_protocol, monkeypatch):
    """A ratio below 1 fires on step 2 unless its loss drops: its regions are dropped, steps 3-4 never train."""
    steps = {}
    original = AEPSL.training_step

    def counting(self, batch, step, stage):
        steps[stage] = steps.get(stage, 0) + 1
        return original(self, batch, step, stage)

    monkeypatch.setattr(AEPSL, "training_step", counting)
    assert _run(tmp_path, tiny_protocol, "aepsl.stop_loss_ratio=0.01", "aepsl.psl=false") == 0
    record = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    summary = record["method_summary"]
    assert summary["stopped_by_loss_at_step"] == 2 and summary["erasing_steps"] == 1
    assert len(summary["step_losses"]) == 2 and summary["psl"] is False
    assert set(steps) == {"erase1", "erase2", "segment"}


def test_finished_stages_are_skipped_on_resume_and_the_result_is_unchanged(tmp_path, tiny_protocol, monkeypatch):
    assert _run(tmp_path, tiny_protocol, "aepsl.max_erase_steps=2", "aepsl.stop_loss_ratio=100", name="straight") == 0
    straight = json.loads(next((tmp_path / "straight").rglob("result.json")).read_text())

    original_step = AEPSL.training_step

    def interrupt(self, batch, step, stage):
        if stage == "segment" and step == 5:  # after step 4's optimiser step, before step 5 trains
            raise KeyboardInterrupt
        return original_step(self, batch, step, stage)

    with monkeypatch.context() as patch:
        patch.setattr(AEPSL, "training_step", interrupt)
        assert _run(tmp_path, tiny_protocol, "aepsl.max_erase_steps=2", "aepsl.stop_loss_ratio=100") == 130
    ran = {}

    def counting(self, batch, step, stage):
        ran[stage] = ran.get(stage, 0) + 1
        return original_step(self, batch, step, stage)

    monkeypatch.setattr(AEPSL, "training_step", counting)
    monkeypatch.setattr(AEPSL, "mine", lambda self, step: pytest.fail("mining ran again on resume"))
    assert _run(tmp_path, tiny_protocol, "aepsl.max_erase_steps=2", "aepsl.stop_loss_ratio=100") == 0
    resumed = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    assert ran == {"segment": 8 - 3}  # the checkpoint every 3 steps holds step 3
    assert resumed["resumed_from_step"] == 3
    assert resumed["metrics"]["miou"] == pytest.approx(straight["metrics"]["miou"], abs=1e-9)
    assert resumed["pseudo_labels"] == straight["pseudo_labels"]


def test_unknown_background_class_is_a_clear_error(tmp_path, tiny_protocol, capsys):
    assert _run(tmp_path, tiny_protocol, "aepsl.background_class=clouds") != 0
    err = capsys.readouterr()
    assert "clouds" in err.out + err.err and "sky" in err.out + err.err


def test_pseudo_masks_are_scored_on_labeled_pixels_and_on_all_pixels(tmp_path):
    """Hand-computed: 3 valid pixels (class 0, 0, 1); the pseudo mask labels two of them rightly
    and leaves one class-0 pixel unlabeled."""
    import numpy as np
    from PIL import Image

    from bench.data.views import ImageDataset
    from bench.evaluation import score_pseudo_labels

    for sub in ("images", "masks", "splits"):
        (tmp_path / sub).mkdir()
    (tmp_path / "classes.txt").write_text("0 a\n1 b\n255 ignore\n")
    (tmp_path / "splits" / "train.txt").write_text("x\n")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    Image.fromarray(np.array([[0, 0], [1, 255]], np.uint8), "L").save(tmp_path / "masks" / "x.png")
    source = FolderSource.open(tmp_path)
    pseudo = torch.tensor([[[0, IGNORE], [1, 1]]], dtype=torch.uint8)
    out = score_pseudo_labels(source, ImageDataset(source, ["x"], None), pseudo)
    assert out["coverage"] == pytest.approx(200 / 3, abs=1e-3)
    assert out["labeled_pixels"]["miou"] == pytest.approx(100.0)
    assert out["all_pixels"]["per_class_iou"] == {"a": 50.0, "b": 100.0}  # a: 1 hit, 1 missed
    assert out["all_pixels"]["miou"] == pytest.approx(75.0)
