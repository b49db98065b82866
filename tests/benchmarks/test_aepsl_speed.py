"""aepsl speed (pytest-benchmark; ratios to each group's reference are printed at the end).

``aepsl-step``: the segmentation stage's step (PSL: classification branch, pseudo-mask CE, online
mask and its CE, on-device crop) against a CE step on the same batch (goal <= 1.1x).
``aepsl-cam``: CAM extraction for mining (erase what was mined, forward, normalised CAMs,
threshold) against a plain forward pass of the same classifier on the same images.
"""
import numpy as np
import pytest
import torch

from bench.data import synth
from bench.data.views import normalize
from bench.losses import masked_cross_entropy
from bench.method import RunContext
from bench.protocol import ModelSpec
from methods.aepsl import AEPSL, class_activation_maps, mined_regions
from methods.ce import CE


def _ctx():
    return RunContext(8, synth.CLASSES, 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=128), 800, 0, 0.01, (0.5, 2.0), 8)


@pytest.fixture(scope="module")
def scenes():
    """8 synth scenes at 96 px (the synth protocols' crop and batch), masks and tags."""
    pairs = [synth.make_image(0, i, 96) for i in range(32)]
    images = torch.stack([normalize(torch.from_numpy(img).permute(2, 0, 1)) for img, _ in pairs])
    masks = torch.stack([torch.from_numpy(mask).long() for _, mask in pairs])
    tags = torch.zeros(len(masks), 8)
    for i, m in enumerate(masks):
        tags[i, m[m != 255].unique()] = 1
    return images, masks, tags


def _optimizer(module):
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


@pytest.mark.benchmark(group="aepsl-step")
def test_aepsl_step_reference_ce(benchmark, scenes):
    images, masks, _ = scenes
    torch.manual_seed(0)
    benchmark.extra_info["reference"] = True
    method = CE(CE.Config(), _ctx())
    opt = _optimizer(method)

    def step():
        loss = masked_cross_entropy(method.model(images[:8]), masks[:8], 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    assert np.isfinite(benchmark(step))


@pytest.mark.parametrize("psl", [True, False])
@pytest.mark.benchmark(group="aepsl-step")
def test_aepsl_segment_step(benchmark, scenes, psl):
    """Goal (with PSL): <= 1.1x the CE step. Pseudo masks here are the true masks: the cost does not
    depend on their content."""
    images, masks, tags = scenes
    torch.manual_seed(0)
    method = AEPSL(AEPSL.Config(psl=psl), _ctx())
    method.masks = masks.to(torch.uint8)
    method.train()
    opt = torch.optim.SGD([g for group in method.param_groups("segment") for g in group["params"]], lr=0.01, momentum=0.9)
    batch = {"tagged": {"image": images[:8], "tags": tags[:8], "index": torch.arange(8)}}

    def step():
        out = method.training_step(batch, 10, "segment")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return float(out["loss"].detach())

    assert np.isfinite(benchmark(step))


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    method = AEPSL(AEPSL.Config(), _ctx()).eval()
    n, h = 32, 96 // 8
    method.mined = (torch.rand(n, 8, h, h) < 0.1).to(torch.uint8)  # a step's worth of earlier regions
    return method


@pytest.mark.benchmark(group="aepsl-cam")
def test_cam_reference_plain_forward(benchmark, scenes, classifier):
    images, _, _ = scenes
    benchmark.extra_info["reference"] = True

    @torch.no_grad()
    def forward():
        return classifier.classifier(images)

    assert benchmark(forward).shape == (32, 8)


@pytest.mark.benchmark(group="aepsl-cam")
def test_cam_extraction(benchmark, scenes, classifier):
    """32 images per call: erase, forward to the class score maps, normalise, threshold."""
    images, _, tags = scenes
    index = torch.arange(len(images))

    @torch.no_grad()
    def extract():
        cams = class_activation_maps(classifier.classifier.score_maps(classifier.erased(images, index)), tags)
        return mined_regions(cams, 0.5)

    regions = benchmark(extract)
    assert regions.shape == (32, 8, 12, 12)
