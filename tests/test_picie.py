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
from methods.picie import (PHOTOMETRIC, PiCIE, apply_geometry, frequency_weights, geometric_params,
                          inverse_frequency_weights)
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
    assert (p["scale"] >= 1).all() and (p["scale"] <= 2 + 1e-6).all()  # side >= half the image's
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


def _ctx(images=None):
    """``images``: the "images" view's training dataset (only its length matters to these tests)."""
    return RunContext(3, ["a", "b", "c"], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=16), 10, 0,
                      datasets={"images": [None] * 4 if images is None else images})


def test_loss_is_finite_with_degenerate_clusters():
    method = PiCIE(PiCIE.Config(feature_dim=8), _ctx())
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

    def spy(self, batch, step, stage="train"):
        seen.append(set(batch) | set(batch["images"]))
        return original(self, batch, step, stage)

    monkeypatch.setattr(PiCIE, "training_step", spy)
    assert _run(tiny_protocol, tmp_path / "ref", tmp_path / "ref-cache") == 0
    assert seen and all(keys == {"images", "image", "index", "valid"} for keys in seen)
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


# --- against the reference code (janghyuncho/PiCIE) --------------------------------------------

def test_loss_is_the_reference_four_term_average():
    """train_picie.py: loss_across = (l12 + l21) / 2, loss_within = (l11 + l22) / 2,
    loss = (loss_across + loss_within) / 2, each l a CrossEntropyLoss(weight) over the flattened
    logits of a frozen 1x1 classifier whose weight is the (unnormalised) centroids, bias 0."""
    torch.manual_seed(0)
    method = PiCIE(PiCIE.Config(feature_dim=8), _ctx())
    method.epoch = 0
    g = torch.Generator().manual_seed(1)
    y1, y2 = torch.randint(0, 3, (4, 8, 8), generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)
    c1, c2 = 0.7 * torch.randn(3, 8, generator=g), 0.7 * torch.randn(3, 8, generator=g)
    w1, w2 = frequency_weights(torch.bincount(y1.flatten(), minlength=3)), frequency_weights(torch.bincount(y2.flatten(), minlength=3))
    method.state = {"labels1": y1.to(torch.uint8), "labels2": y2.to(torch.uint8), "centroids1": c1, "centroids2": c2,
                    "weights1": w1, "weights2": w2}
    batch = {"images": {"image": torch.randn(2, 3, 32, 32, generator=g), "index": torch.tensor([0, 3])}}
    index = batch["images"]["index"]
    out = method.training_step(batch, 0)
    with torch.no_grad():
        z1, z2 = method.views(batch["images"]["image"], index, method.epoch_params(0, 4))

    def flatten(x):  # the reference's feature_flatten: [B, C, H, W] -> [B * H * W, C]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def classifier(c):
        return lambda z: F.conv2d(z, c[:, :, None, None], torch.zeros(len(c)))

    l12 = F.cross_entropy(flatten(classifier(c2)(z1)), y2[index].flatten(), weight=w2)
    l21 = F.cross_entropy(flatten(classifier(c1)(z2)), y1[index].flatten(), weight=w1)
    l11 = F.cross_entropy(flatten(classifier(c1)(z1)), y1[index].flatten(), weight=w1)
    l22 = F.cross_entropy(flatten(classifier(c2)(z2)), y2[index].flatten(), weight=w2)
    reference = ((l12 + l21) / 2. + (l11 + l22) / 2.) / 2.
    assert out["loss"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * (l11 + l22 + l12 + l21).item() / 2, rel=1e-5)


def test_crop_range_is_a_fraction_of_the_side_as_in_the_reference():
    """custom_transforms.RandomResizedCrop: rscale ~ U(0.5, 1), crop side = int(rscale * side):
    the mean crop area is E[s^2] = 7/12 ~ 0.58 of the image, not 0.75 (uniform area)."""
    import numpy as np

    rng = np.random.default_rng(0)
    res1 = 320
    reference = np.mean([(int(s * res1) / res1) ** 2 for s in rng.uniform(0.5, 1.0, 20000)])
    side = geometric_params(20000, (0.5, 1.0), torch.Generator().manual_seed(0), "side")
    area = geometric_params(20000, (0.5, 1.0), torch.Generator().manual_seed(0), "area")
    side_area, area_area = (1 / side["scale"] ** 2).mean().item(), (1 / area["scale"] ** 2).mean().item()
    assert reference == pytest.approx(7 / 12, abs=0.01)
    assert side_area == pytest.approx(reference, abs=0.01) and side_area == pytest.approx(7 / 12, abs=0.005)
    assert area_area == pytest.approx(0.75, abs=0.005)  # the crop_range_of="area" switch


def test_jitter_is_drawn_per_operation_by_default():
    """coco_train_dataset.init_transforms: brightness, contrast, saturation, hue each with p 0.8."""
    per_op = draw_photometric(20000, torch.Generator().manual_seed(0), jitter_per_operation=True, **PHOTOMETRIC)
    joint = draw_photometric(20000, torch.Generator().manual_seed(0), **PHOTOMETRIC)
    on = torch.stack([per_op["brightness"] != 1, per_op["contrast"] != 1, per_op["saturation"] != 1,
                      per_op["hue"] != 0]).float()
    assert ((on.mean(1) - 0.8).abs() < 0.01).all()
    assert on.prod(0).mean().item() == pytest.approx(0.8 ** 4, abs=0.01)  # independent: all four ~0.41
    joint_on = torch.stack([joint["brightness"] != 1, joint["hue"] != 0]).float()
    assert torch.equal(joint_on[0], joint_on[1]) and joint_on[0].mean().item() == pytest.approx(0.8, abs=0.01)


def test_reference_defaults_and_every_switch_run_a_clustering_epoch():
    """Defaults: FPN without smoothing, Euclidean k-means with raw (non-unit) centroids and
    Euclidean labels, weights = cluster sizes / total. Every switch flipped: the epoch (clustering
    + a step) still runs, with unit centroids and inverse-frequency weights."""

    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)

    class Images(torch.utils.data.Dataset):  # the harness's view datasets take (index, sample seed)
        def __len__(self):
            return 6

        def __getitem__(self, key):
            return {"image": images[key[0]], "index": key[0]}

    from bench.kmeans import faiss_available

    flipped = dict(crop_range_of="area", fpn_smoothing=True, kmeans_metric="spherical",
                   cluster_weights="inverse_frequency", jitter_draw="joint",
                   **({"kmeans_backend": "faiss"} if faiss_available() else {}))
    batch = {"images": {"image": images[:2], "index": torch.tensor([0, 1])}}
    for switches in ({}, flipped):
        torch.manual_seed(0)
        method = PiCIE(PiCIE.Config(feature_dim=8, cluster_batch_size=3, kmeans_init_batches=1, kmeans_iters=3,
                                    **switches), _ctx(Images()))
        method.on_epoch_start(0)
        norms = method.state["centroids1"].norm(dim=1)
        counts = torch.bincount(method.state["labels1"].flatten().long(), minlength=3).float()
        if switches:
            assert isinstance(method.net.smooth, torch.nn.Conv2d) and torch.allclose(norms, torch.ones(3), atol=1e-5)
            assert torch.allclose(method.state["weights1"], inverse_frequency_weights(counts))
        else:
            assert isinstance(method.net.smooth, torch.nn.Identity) and (norms < 1 - 1e-3).all()
            assert torch.allclose(method.state["weights1"], counts / counts.sum())
            # labels = the nearest centroid in Euclidean distance (the reference's IndexFlatL2)
            method.eval()
            with torch.no_grad():
                z1, _ = method.views(images[:2], torch.tensor([0, 1]), method.epoch_params(0, 6))
            flat = z1.permute(0, 2, 3, 1).reshape(-1, 8)
            centroids = method.state["centroids1"]
            nearest = torch.cdist(flat, centroids).argmin(1)
            assert torch.equal(nearest.view(2, 8, 8).to(torch.uint8), method.state["labels1"][:2])
            method.train()
        out = method.training_step(batch, 0)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()


def test_faiss_backend_without_faiss_is_a_config_error(monkeypatch):
    import pydantic

    import methods.picie as picie

    monkeypatch.setattr(picie, "faiss_available", lambda: False)
    with pytest.raises(pydantic.ValidationError, match="faiss is not installed"):
        PiCIE.Config(kmeans_backend="faiss")
    assert PiCIE.Config().kmeans_backend == "torch"
