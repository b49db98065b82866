"""prcl speed (pytest-benchmark; ratios to each group's reference are printed at the end).

``prcl-step``: the prcl step against its floor measured in the same run, a CE step on the
labeled + unlabeled batch plus one teacher forward on the unlabeled batch (goals: <= 2x at the
reference sizes, <= 1.1x at the CPU sizes), with the contrast's eager and compiled backends.
``prcl-negative-sampling``: the vectorised anchor/negative sampling against the reference's shape,
a Python loop over anchors and classes drawing indices one (anchor, class) cell at a time.
``prcl-contrast``: one class's contrast (forward + backward) at the reference sizes, 256 anchors x
(512 real + 28 virtual) negatives x 256 dims, blocked (``contrast_loss``, both backends) against
the reference's shape, the gathered [anchors x negatives x dims] tensors through the plain MLS formula.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.losses import masked_cross_entropy
from methods.ce import CE
from methods.prcl import PRCL, contrast_loss, mutual_likelihood_score, sample_contrast_set
from tests.benchmarks.conftest import method_step, synth_ctx




def _optimizer(module):
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


@pytest.mark.benchmark(group="prcl-step")
def test_prcl_floor_ce_on_both_batches_plus_teacher_forward(benchmark, semi_batch):
    """The floor: what any teacher-student method on this batch must do."""
    (data, unlabeled_masks) = semi_batch
    torch.manual_seed(0)
    benchmark.extra_info["reference"] = True
    method = CE(CE.Config(), synth_ctx())
    teacher = copy.deepcopy(method.model).requires_grad_(False)
    opt = _optimizer(method)
    images = torch.cat([data["labeled"]["image"], data["unlabeled"]["image"]])
    masks = torch.cat([data["labeled"]["mask"], unlabeled_masks])

    def step():
        with torch.no_grad():
            teacher(data["unlabeled"]["image"])
        loss = masked_cross_entropy(method.model(images), masks, 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    assert np.isfinite(benchmark(step))



@pytest.mark.parametrize("size,backend", [("reference", "eager"), ("reference", "compiled"), ("cpu", "eager"),
                                          ("cpu", "compiled")])
@pytest.mark.benchmark(group="prcl-step")
def test_prcl_training_step(benchmark, semi_batch, size, backend):
    """``reference``: 256 anchors per class x (512 real + virtual) negatives, the paper's sizes;
    ``cpu``: 32 x 64, the setting of the CPU synth runs in the leaderboard. ``backend``:
    ``prcl.kernels`` (a warm-up step first, so compiling is not timed)."""
    data, _ = semi_batch
    torch.manual_seed(0)
    kw = {} if size == "reference" else {"num_queries": 32, "num_negatives": 64}
    method = PRCL(PRCL.Config(kernels=backend, **kw), synth_ctx())
    step = method_step(method, data)
    step()
    assert np.isfinite(benchmark(step))


@pytest.fixture(scope="module")
def sampling_inputs():
    """A prcl contrast at synth scale: 16 images x 24 x 24 valid pixels, 8 classes, half hard."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (16 * 576,), generator=g)
    hard = torch.rand(len(labels), generator=g) < 0.5
    mu, var = torch.randn(8, 256, generator=g), torch.rand(8, 256, generator=g)
    return labels, hard, mu, var


def _naive_sampling(labels, hard, mu, var, num_queries=256, num_negatives=512, temperature=100.0):
    """The reference's shape: per class, draw negative classes, count them per anchor, then one
    ``randint`` per (anchor, class) cell into that class's pixels."""
    rng = np.random.default_rng(0)
    classes = labels.unique().tolist()
    members = {c: (labels == c).nonzero().squeeze(1) for c in classes}
    out = []
    for c in classes:
        hard_c = members[c][hard[members[c]]]
        anchors = hard_c[torch.randint(len(hard_c), (num_queries,))]
        others = [k for k in classes if k != c]
        sim = torch.stack([mutual_likelihood_score(mu[c], var[c], mu[k], var[k]) for k in others]) / temperature
        dist = torch.distributions.Categorical(probs=torch.softmax(sim, 0))
        drawn = dist.sample((num_queries, num_negatives))
        counts = torch.stack([(drawn == j).sum(1) for j in range(len(others))], 1)
        pool = torch.cat([members[k] for k in others])  # the other classes' pixels, class after class
        offsets = np.cumsum([0] + [len(members[k]) for k in others])
        negative_index = []
        for i in range(num_queries):
            for j in range(len(others)):
                negative_index += rng.integers(offsets[j], offsets[j + 1], size=int(counts[i, j])).tolist()
        out.append((anchors, pool[torch.tensor(negative_index)].view(num_queries, num_negatives)))
    return out


@pytest.mark.benchmark(group="prcl-negative-sampling")
def test_prcl_sampling_naive_reference(benchmark, sampling_inputs):
    benchmark.extra_info["reference"] = True
    out = benchmark(_naive_sampling, *sampling_inputs)
    assert len(out) == 8 and out[0][1].shape == (256, 512)


@pytest.mark.benchmark(group="prcl-negative-sampling")
def test_prcl_sampling_vectorised(benchmark, sampling_inputs):
    """Goal: >= 20x the naive loops."""
    labels, hard, mu, var = sampling_inputs
    classes, anchors, negatives, _ = benchmark(sample_contrast_set, labels, hard, mu, var,
                                               torch.ones(8, dtype=torch.bool), 8, 256, 512, 100.0)
    assert classes.numel() == 8 and negatives.shape == (8, 256, 512)


@pytest.fixture(scope="module")
def contrast_inputs():
    """One anchor class at the reference sizes: 256 anchors, 512 negatives each from a pool of 9,216
    pixels, 28 virtual negatives, 256 dims; unit means, variances in (0.1, 1.1)."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    var = lambda *shape: 0.1 + torch.rand(*shape, generator=g)  # noqa: E731
    return (unit(256, 256), var(256, 256), unit(256), var(256), unit(9216, 256), var(9216, 256),
            torch.randint(0, 9216, (256, 512), generator=g), unit(28, 256), torch.zeros(28, 256))


@pytest.mark.benchmark(group="prcl-contrast")
def test_prcl_contrast_gathered_cube_reference(benchmark, contrast_inputs):
    benchmark.extra_info["reference"] = True
    a_mu, a_var, p_mu, p_var, pool_mu, pool_var, index, v_mu, v_var = contrast_inputs
    a_mu, a_var = a_mu.clone().requires_grad_(), a_var.clone().requires_grad_()

    def step():
        q = len(a_mu)
        neg_mu = torch.cat([pool_mu[index], v_mu.expand(q, -1, -1)], 1)
        neg_var = torch.cat([pool_var[index], v_var.expand(q, -1, -1)], 1)
        logits = torch.cat([mutual_likelihood_score(a_mu, a_var, p_mu, p_var)[:, None],
                            mutual_likelihood_score(a_mu[:, None], a_var[:, None], neg_mu, neg_var)], 1) / 100.0
        loss = F.cross_entropy(logits, torch.zeros(q, dtype=torch.long))
        loss.backward()
        return float(loss.detach())

    assert np.isfinite(benchmark(step))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.benchmark(group="prcl-contrast")
def test_prcl_contrast_blocked(benchmark, contrast_inputs, backend):
    a_mu, a_var, p_mu, p_var, pool_mu, pool_var, index, v_mu, v_var = contrast_inputs
    a_mu, a_var = a_mu.clone().requires_grad_(), a_var.clone().requires_grad_()

    def step():
        loss = contrast_loss(a_mu, a_var, p_mu, p_var, pool_mu, pool_var, index, 100.0, (v_mu, v_var), backend=backend)
        loss.backward()
        return float(loss.detach())

    step()
    assert np.isfinite(benchmark(step))
