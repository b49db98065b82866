"""Speed, measured with pytest-benchmark (never with timed assertions).

In the normal suite these run once each as smoke tests (``--benchmark-disable`` in pyproject).
To measure: ``python -m pytest tests/benchmarks --benchmark-enable --benchmark-group-by=group``;
compare within a group: each group holds a method's step next to its reference from the same run.
"""
import pytest
import torch

from bench.data import synth
from bench.data.views import normalize
from bench.metrics import ConfusionMatrix
from bench.method import RunContext
from bench.protocol import ModelSpec
from methods.ce import CE
from methods.pixcontrast import PixContrast, sample_anchors, supcon_loss


def _ctx():
    return RunContext(8, [str(i) for i in range(8)], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=128), 100, 0)


@pytest.fixture(scope="module")
def batch():
    """8 synth scenes at 96 px: real region sizes, so pixcontrast's anchor rule admits real pairs
    (random per-pixel labels would leave every class below min_pixels and measure no contrast)."""
    pairs = [synth.make_image(0, i, 96) for i in range(8)]
    images = torch.stack([normalize(torch.from_numpy(img).permute(2, 0, 1)) for img, _ in pairs])
    masks = torch.stack([torch.from_numpy(mask).long() for _, mask in pairs])
    return {"labeled": {"image": images, "mask": masks}}


def _step_fn(method, batch, step_index):
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = method.training_step(batch, step_index)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


@pytest.mark.benchmark(group="train-step")
def test_ce_training_step(benchmark, batch):
    """The reference step every method's step is compared against (synth crop and batch)."""
    torch.manual_seed(0)
    benchmark.extra_info["reference"] = True
    assert torch.isfinite(torch.tensor(benchmark(_step_fn(CE(CE.Config(), _ctx()), batch, 0))))


@pytest.mark.benchmark(group="train-step")
def test_ce_training_step_cpu_autocast(benchmark, batch):
    """The same step under ``train.cpu_amp`` (bf16 autocast on the CPU, as the trainer enters it):
    faster where the CPU computes bf16 natively (AVX512-BF16, AMX), slower where it does not."""
    from bench.device import amp_context

    torch.manual_seed(0)
    autocast, _ = amp_context(torch.device("cpu"), True, cpu=True)
    step = _step_fn(CE(CE.Config(), _ctx()), batch, 0)

    def autocast_step():
        with autocast:
            return step()

    assert torch.isfinite(torch.tensor(benchmark(autocast_step)))


@pytest.mark.benchmark(group="train-step")
def test_pixcontrast_training_step(benchmark, batch):
    """CE + projection head + anchor sampling + contrast, past the warm-up. Goal: <= 1.15x CE."""
    torch.manual_seed(0)
    method = PixContrast(PixContrast.Config(), _ctx())
    out = method.training_step(batch, 99)
    assert out["contrast"] > 0  # the contrast really runs on this batch
    assert torch.isfinite(torch.tensor(benchmark(_step_fn(method, batch, 99))))


@pytest.mark.parametrize("memory_size", [500, 5000])
@pytest.mark.benchmark(group="train-step")
def test_pixcontrast_memory_training_step(benchmark, batch, memory_size):
    """Memory variant in its steady state: both queues full (8 classes x 2 x memory_size entries),
    so every anchor is contrasted with the whole bank, as after the first few hundred steps."""
    torch.manual_seed(0)
    method = PixContrast(PixContrast.Config(memory=True, memory_size=memory_size), _ctx())
    for name in ("pixel_queue", "segment_queue"):
        getattr(method, name).copy_(torch.nn.functional.normalize(torch.randn_like(getattr(method, name)), dim=2))
        getattr(method, f"{name}_fill").fill_(memory_size)
    assert torch.isfinite(torch.tensor(benchmark(_step_fn(method, batch, 99))))


@pytest.fixture(scope="module")
def contrast_inputs():
    """A pixcontrast batch at synth scale: 8 images, 24x24 feature maps, 8 classes, 256-d embeddings."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (8, 24, 24), generator=g)
    labels[:, 8:16, 8:16] = 4 + torch.arange(8).view(8, 1, 1) % 4  # one 64-pixel "thing" per image
    labels = labels.reshape(8, -1)
    preds = torch.where(torch.rand(labels.shape, generator=g) < 0.7, labels, torch.randint(0, 8, labels.shape, generator=g))
    emb = torch.nn.functional.normalize(torch.randn(8 * 576, 256, generator=g), dim=1)
    return labels, preds, emb


def _naive_sampling_and_loss(labels, preds, emb, cfg):
    """The reference's shape: loops over images and classes to sample, over anchors for the loss."""
    b, n = labels.shape
    pairs = [(i, c) for i in range(b) for c in labels[i].unique().tolist()
             if c != 255 and int((labels[i] == c).sum()) > cfg.max_views]
    if not pairs:
        return torch.tensor(0.0)
    views = min(cfg.max_samples // len(pairs), cfg.max_views)
    feats, ys = [], []
    for i, c in pairs:
        hard = ((labels[i] == c) & (preds[i] != c)).nonzero().squeeze(1)
        easy = ((labels[i] == c) & (preds[i] == c)).nonzero().squeeze(1)
        n_hard = min(len(hard), max(views // 2, views - len(easy)))
        idx = torch.cat([hard[torch.randperm(len(hard))[:n_hard]], easy[torch.randperm(len(easy))[:views - n_hard]]])
        feats.append(emb[i * n + idx])
        ys += [c] * views
    x, y = torch.cat(feats), torch.tensor(ys)
    losses = []
    for a in range(len(x)):
        logits = x @ x[a] / cfg.temperature
        logits = logits - logits.max()
        pos = (y == y[a]) & (torch.arange(len(x)) != a)
        neg_sum = (logits.exp() * (y != y[a])).sum()
        log_prob = logits[pos] - torch.log(logits[pos].exp() + neg_sum)
        losses.append(-(cfg.temperature / cfg.base_temperature) * log_prob.mean())
    return torch.stack(losses).mean()


def _vectorised_sampling_and_loss(labels, preds, emb, cfg):
    index, classes = sample_anchors(labels, preds, 8, 255, cfg.max_samples, cfg.max_views, cfg.max_views)
    x = emb[index.reshape(-1)]
    y = classes.repeat_interleave(index.shape[1])
    return supcon_loss(x, y, x, y, cfg.temperature, cfg.base_temperature, exclude_self=True)


@pytest.mark.benchmark(group="contrast-sampling+loss")
def test_contrast_sampling_loss_naive_reference(benchmark, contrast_inputs):
    benchmark.extra_info["reference"] = True
    cfg = PixContrast.Config(max_views=50)  # 50: the 64-pixel things qualify at this scale
    assert torch.isfinite(benchmark(_naive_sampling_and_loss, *contrast_inputs, cfg))


@pytest.mark.benchmark(group="contrast-sampling+loss")
def test_contrast_sampling_loss_vectorised(benchmark, contrast_inputs):
    """Goal: >= 10x the naive loops."""
    cfg = PixContrast.Config(max_views=50)
    assert torch.isfinite(benchmark(_vectorised_sampling_and_loss, *contrast_inputs, cfg))


def _naive_confusion(target, pred, num_classes, ignore=255):
    """Reference: one boolean pass per (target, prediction) class pair."""
    mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    valid = target != ignore
    for t in range(num_classes):
        for p in range(num_classes):
            mat[t, p] = ((target == t) & (pred == p) & valid).sum()
    return mat


@pytest.fixture(scope="module")
def maps():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 21, (4, 256, 256), generator=g), torch.randint(0, 21, (4, 256, 256), generator=g)


@pytest.mark.benchmark(group="confusion-matrix")
def test_confusion_bincount(benchmark, maps):
    target, pred = maps

    def run():
        cm = ConfusionMatrix(21)
        cm.update(target, pred)
        return cm.mat

    assert torch.equal(benchmark(run), _naive_confusion(target, pred, 21))


@pytest.mark.benchmark(group="confusion-matrix")
def test_confusion_naive_reference(benchmark, maps):
    target, pred = maps
    assert benchmark(_naive_confusion, target, pred, 21).sum() == target.numel()
