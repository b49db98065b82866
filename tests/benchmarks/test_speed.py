"""Speed, measured with pytest-benchmark (never with timed assertions).

In the normal suite these run once each as smoke tests (``--benchmark-disable`` in pyproject).
To measure: ``python -m pytest tests/benchmarks --benchmark-enable --benchmark-group-by=group``;
compare within a group: each group holds a method's step next to its reference from the same run.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.metrics import ConfusionMatrix
from bench.method import RunContext
from bench.protocol import ModelSpec
from methods.ce import CE


def _ctx():
    return RunContext(8, [str(i) for i in range(8)], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=128), 100, 0)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return {"labeled": {"image": torch.randn(8, 3, 96, 96, generator=g),
                        "mask": torch.randint(0, 8, (8, 96, 96), generator=g)}}


@pytest.mark.benchmark(group="train-step")
def test_ce_training_step(benchmark, batch):
    """The reference step every method's step is compared against (synth crop and batch)."""
    torch.manual_seed(0)
    method = CE(CE.Config(), _ctx())
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = method.training_step(batch, 0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    assert torch.isfinite(torch.tensor(benchmark(step)))


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
