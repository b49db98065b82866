"""picie: equivariance bookkeeping, the loss and its weights, the photometric fixes, Hungarian
invariance, and real runs through the harness (resume included)."""
import json

import pytest
import torch
import torch.nn.functional as F

from bench.augment import apply_photometric, draw_photometric, to_unit
from bench.metrics import cluster_scores
from bench.method import RunContext
from bench.protocol import ModelSpec
from methods.picie import PHOTOMETRIC, PiCIE, apply_geometry, geometric_params, inverse_frequency_weights
from tests.conftest import interrupt_and_resume


def test_feature_space_crop_and_flip_equal_image_space_crop_and_flip():
    """On a block-constant image and a 'network' that averages 4x4 blocks (constant features per
    block), G applied to the feature map equals the features of G applied to the image."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(2, 3, 8, 8, generator=g)
    image = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3)  # 32 x 32, constant 4 x 4 blocks
    net = lambda x: F.avg_pool2d(x, 4)  # noqa: E731
    geo = {"scale": torch.tensor([2.0, 1.0]), "top": torch.tensor([0.5, 0.0]), "left": torch.tensor([0.25, 0.0]),
           "flip": torch.tensor([True, True])}
    image_space = net(apply_geometry(image, geo, mode="nearest"))
    feature_space = apply_geometry(net(image), geo, mode="nearest")
    assert torch.allclose(image_space, feature_space)
    # the drawn parameters keep the crop inside the image (zoom in only) and are per image
    p = geometric_params(1000, (0.5, 1.0), torch.Generator().manual_seed(1))
    assert (p["scale"] >= 1).all() and (p["scale"] <= 2 ** 0.5 + 1e-6).all()
    assert (p["top"] <= p["scale"] - 1 + 1e-6).all() and (p["top"] >= 0).all() and 400 < p["flip"].sum() < 600


def test_grayscale_and_blur_are_really_applied():
    p = draw_photometric(2000, torch.Generator().manual_seed(0), **PHOTOMETRIC)
    assert 0.15 < p["gray"].float().mean() < 0.25 and 0.45 < p["blur"].float().mean() < 0.55
    assert (p["sigma"] >= 0.1).all() and (p["sigma"] <= 2.0).all()  # never a negative radius
    images = torch.randn(2, 3, 16, 16)
    params = {"brightness": torch.ones(2), "contrast": torch.ones(2), "saturation": torch.ones(2),
              "hue": torch.zeros(2), "gray": torch.tensor([True, False]), "blur": torch.tensor([False, True]),
              "sigma": torch.tensor([1.0, 1.0])}
    out = to_unit(apply_photometric(images, params, kernel_size=7))
    assert torch.allclose(out[0, 0], out[0, 1], atol=1e-5) and torch.allclose(out[0, 1], out[0, 2], atol=1e-5)
    assert not torch.allclose(out[1], to_unit(images[1]).clamp(0, 1))  # blurred
    assert out[1].var() < to_unit(images[1]).clamp(0, 1).var()


def test_cluster_weights_are_inverse_frequency():
    w = inverse_frequency_weights(torch.tensor([10, 0, 30]))
    assert torch.allclose(w, torch.tensor([1.5, 0.0, 0.5]))


def test_hungarian_matching_is_invariant_to_cluster_permutation():
    g = torch.Generator().manual_seed(0)
    mat = torch.randint(0, 100, (4, 4), generator=g) + torch.eye(4, dtype=torch.long) * 300
    perm = torch.tensor([2, 0, 3, 1])
    a, b = cluster_scores(mat), cluster_scores(mat[:, perm])
    assert a["miou"] == pytest.approx(b["miou"]) and a["pixel_acc"] == pytest.approx(b["pixel_acc"])


def _ctx():
    return RunContext(3, ["a", "b", "c"], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=16), 10, 0)


def test_loss_is_finite_with_degenerate_clusters():
    method = PiCIE(PiCIE.Config(feature_dim=8), _ctx())
    method.datasets = {"images": [None] * 4}
    method.epoch = 0
    c = F.normalize(torch.randn(3, 8), dim=1)
    method.state = {"labels1": torch.zeros(4, 8, 8, dtype=torch.uint8), "labels2": torch.zeros(4, 8, 8, dtype=torch.uint8),
                    "centroids1": c, "centroids2": c.clone(),
                    "weights1": inverse_frequency_weights(torch.tensor([256, 0, 0])),
                    "weights2": inverse_frequency_weights(torch.tensor([256, 0, 0]))}
    batch = {"images": {"image": torch.randn(2, 3, 32, 32), "index": torch.tensor([0, 3])}}
    out = method.training_step(batch, 0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def _run(protocol, results, cache, *extra):
    from bench.cli import main
    return main(["run", "--methods", "picie", "--protocol", str(protocol), "--results-dir", str(results),
                 "--cache-dir", str(cache), "--no-progress", "picie.cluster_batch_size=4",
                 "picie.kmeans_init_batches=2", "picie.feature_dim=16", *extra])


def test_picie_run_resumes_to_identical_metrics(tmp_path, tiny_protocol, monkeypatch):
    """The epoch's labels and centroids are in the checkpoint: a resumed run ends exactly where an
    uninterrupted one does, and the images view never carries masks."""
    seen = []
    original = PiCIE.training_step

    def spy(self, batch, step):
        seen.append(set(batch) | set(batch["images"]))
        return original(self, batch, step)

    monkeypatch.setattr(PiCIE, "training_step", spy)
    assert _run(tiny_protocol, tmp_path / "ref", tmp_path / "ref-cache") == 0
    assert seen and all(keys == {"images", "image", "index"} for keys in seen)
    [ref] = (tmp_path / "ref").rglob("result.json")
    ref = json.loads(ref.read_text())
    assert ref["output"] == "clusters" and ref["metrics"]["matching"] == "hungarian"
    assert ref["supervision"] == []

    state, resumed = interrupt_and_resume(lambda results, cache: _run(tiny_protocol, results, cache), PiCIE,
                                          tmp_path, monkeypatch)
    assert state["step"] == 3 and "labels1" in state["method"]["_extra_state"]
    assert resumed["resumed_from_step"] == 3 and resumed["metrics"] == ref["metrics"]

def test_random_init_baseline_and_over_clustering(tmp_path, tiny_protocol):
    assert _run(tiny_protocol, tmp_path / "r", tmp_path / "c", "picie.random_init_baseline=true",
                "picie.num_clusters=12") == 0
    [path] = (tmp_path / "r").rglob("result.json")
    record = json.loads(path.read_text())
    assert record["train_images_per_s"] == 0 or record["train_time_s"] == 0  # no training stage ran
    assert record["metrics"]["matching"] == "hungarian" and "majority" in record["metrics"]  # K = 12 > C = 8
    assert len(record["metrics"]["cluster_to_class"]) == 12
