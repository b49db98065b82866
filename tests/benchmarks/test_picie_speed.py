"""picie speed (pytest-benchmark; ratios to each group's reference are printed at the end).

``picie-kmeans``: one clustering (20 Lloyd rounds) of the same pixel features with faiss-cpu's
k-means (its random seeds) and with bench.kmeans (k-means++ seeds) on either backend, same K,
rounds and threads (goal: not slower).
``picie-step``: the picie step against its floor, two CE-sized forward + backward passes of the
protocol's segmenter on the same batch (goal <= 1.1x).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.data import synth
from bench.data.views import normalize
from bench.kmeans import KMeans
from bench.losses import masked_cross_entropy
from bench.method import RunContext
from bench.protocol import ModelSpec
from methods.ce import CE
from methods.picie import PiCIE, inverse_frequency_weights

faiss = pytest.importorskip("faiss")


def _ctx():
    return RunContext(8, [str(i) for i in range(8)], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=128), 800, 0,
                      datasets={"images": [None] * 8})


@pytest.fixture(scope="module")
def features():
    """100k 128-d unit vectors around 8 directions: the size of one synth epoch's pixels (a quarter)."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(8, 128, generator=g), dim=1)
    x = centres[torch.randint(0, 8, (100_000,), generator=g)] + 0.3 * torch.randn(100_000, 128, generator=g) / 128 ** 0.5
    return F.normalize(x, dim=1)


@pytest.mark.benchmark(group="picie-kmeans")
def test_kmeans_faiss_reference(benchmark, features):
    benchmark.extra_info["reference"] = True
    x = features.numpy()
    faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads as torch: a fair ratio

    def run():
        km = faiss.Kmeans(x.shape[1], 8, niter=20, seed=0, spherical=True, max_points_per_centroid=len(x))
        km.train(x)
        return km.centroids

    assert np.isfinite(benchmark(run)).all()


@pytest.mark.benchmark(group="picie-kmeans")
def test_kmeans_bench(benchmark, features):
    centroids = benchmark(lambda: KMeans(8, seed=0).fit(features, 20).centroids)
    assert torch.isfinite(centroids).all()


@pytest.mark.benchmark(group="picie-kmeans")
def test_kmeans_bench_faiss_backend(benchmark, features):
    """picie.kmeans_backend=faiss: the k-means++ seeds in torch, the Lloyd rounds in faiss."""
    centroids = benchmark(lambda: KMeans(8, seed=0, backend="faiss").fit(features, 20).centroids)
    assert torch.isfinite(centroids).all()


@pytest.fixture(scope="module")
def batch():
    pairs = [synth.make_image(0, i, 96) for i in range(8)]
    images = torch.stack([normalize(torch.from_numpy(img).permute(2, 0, 1)) for img, _ in pairs])
    masks = torch.stack([torch.from_numpy(mask).long() for _, mask in pairs])
    return images, masks


@pytest.mark.benchmark(group="picie-step")
def test_picie_floor_two_ce_passes(benchmark, batch):
    images, masks = batch
    torch.manual_seed(0)
    benchmark.extra_info["reference"] = True
    model = CE(CE.Config(), _ctx())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = sum(masked_cross_entropy(model.model(images), masks, 255) for _ in range(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    assert np.isfinite(benchmark(step))


@pytest.mark.benchmark(group="picie-step")
def test_picie_training_step(benchmark, batch):
    images, _ = batch
    torch.manual_seed(0)
    method = PiCIE(PiCIE.Config(), _ctx())
    method.epoch = 0
    g = torch.Generator().manual_seed(0)
    c = F.normalize(torch.randn(8, 128, generator=g), dim=1)
    labels = torch.randint(0, 8, (8, 24, 24), generator=g).to(torch.uint8)
    w = inverse_frequency_weights(torch.bincount(labels.flatten().long(), minlength=8))
    method.state = {"labels1": labels, "labels2": labels.clone(), "centroids1": c, "centroids2": c.clone(),
                    "weights1": w, "weights2": w.clone()}
    method.train()
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    data = {"images": {"image": images, "index": torch.arange(8)}}

    def step():
        loss = method.training_step(data, 0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    assert np.isfinite(benchmark(step))
