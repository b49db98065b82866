"""fixmatch, unimatch and meanteacher steps against their floors (pytest-benchmark; the ratio to each
group's reference is printed at the end). Goal: <= 1.1x.

Each floor is the network passes the method's design needs, with plain cross-entropy against the
true masks and nothing else (no views, no CutMix, no pseudo-labels, no EMA):
``fixmatch``: a no-grad eval-mode forward of the mixing batch, a forward of labeled + weak, a
forward of the strong batch, backward; ``unimatch``: the same with the feature-perturbed decoder
on labeled + weak and one forward of both strong batches; ``meanteacher``: a no-grad teacher
forward of the weak batch, student forwards of the labeled and the strong batch, backward.
"""
import numpy as np
import pytest
import torch

from bench.losses import masked_cross_entropy
from bench.semi import EMATeacher
from methods.fixmatch import FixMatch
from methods.meanteacher import MeanTeacher
from methods.unimatch import UniMatch
from tests.benchmarks.conftest import method_step, synth_ctx




def _optimizer(method):
    return torch.optim.SGD([p for g in method.param_groups() for p in g["params"]], lr=0.01, momentum=0.9)



def _floor_step(method, data, unlabeled_masks, kind):
    model, opt = method.model, _optimizer(method)
    teacher = EMATeacher(model) if kind == "meanteacher" else None
    method.train()
    x, y = data["labeled"]["image"], data["labeled"]["mask"]
    u = data["unlabeled"]["image"]

    def step():
        if kind == "meanteacher":
            with torch.no_grad():
                teacher(u)
            loss = masked_cross_entropy(model(x), y, 255) + masked_cross_entropy(model(u), unlabeled_masks, 255)
        else:
            model.eval()
            with torch.no_grad():
                model(u)
            model.train()
            both, both_masks = torch.cat([x, u]), torch.cat([y, unlabeled_masks])
            if kind == "unimatch":
                logits, logits_fp = model.forward_perturbed(both)
                strong = model(torch.cat([u, u]))
                loss = (masked_cross_entropy(logits, both_masks, 255) + masked_cross_entropy(logits_fp, both_masks, 255)
                        + masked_cross_entropy(strong, torch.cat([unlabeled_masks, unlabeled_masks]), 255))
            else:
                loss = masked_cross_entropy(model(both), both_masks, 255) + masked_cross_entropy(model(u), unlabeled_masks, 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


METHODS = {"fixmatch": FixMatch, "unimatch": UniMatch, "meanteacher": MeanTeacher}


@pytest.mark.parametrize("name", list(METHODS))
def test_semi_floor(benchmark, semi_batch, name):
    data, unlabeled_masks = semi_batch
    torch.manual_seed(0)
    benchmark.group = f"{name}-step"
    benchmark.extra_info["reference"] = True
    cls = METHODS[name]
    assert np.isfinite(benchmark(_floor_step(cls(cls.Config(), synth_ctx()), data, unlabeled_masks, name)))


@pytest.mark.parametrize("name", list(METHODS))
def test_semi_training_step(benchmark, semi_batch, name):
    data, _ = semi_batch
    torch.manual_seed(0)
    benchmark.group = f"{name}-step"
    cls = METHODS[name]
    assert np.isfinite(benchmark(method_step(cls(cls.Config(), synth_ctx()), data)))
