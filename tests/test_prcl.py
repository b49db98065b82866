"""prcl: the probabilistic pieces against hand values and the paper's invariants, the sampling,
the strong view, and a real run through the harness (kill + resume included)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import methods.prcl as prcl
from bench import BenchError
from bench.augment import apply_photometric, crop_theta, draw_photometric, random_crop_theta, warp, warp_labels
from bench.method import RunContext
from bench.protocol import ModelSpec
from bench.semi import class_mix_masks
from methods.prcl import (PRCL, VarianceHead, contrast_loss, draw_categorical, fuse_gaussians, mutual_likelihood_score,
                          sample_contrast_set, sample_members, virtual_negatives)
from tests.conftest import interrupt_and_resume


def test_mls_equals_its_formula_on_hand_values_and_is_symmetric():
    mu0, var0 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.25])
    mu1, var1 = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.75])
    # d1: (1)^2 / 1 + log 1 = 1;  d2: (1)^2 / 1 + log 1 = 1  -> -1/2 * mean = -0.5
    assert mutual_likelihood_score(mu0, var0, mu1, var1).item() == pytest.approx(-0.5)
    var1 = torch.tensor([0.25, 0.25])  # d1: 1/0.75 + log 0.75; d2: 1/0.5 + log 0.5
    expected = -0.5 * ((1 / 0.75 + math.log(0.75)) + (1 / 0.5 + math.log(0.5))) / 2
    assert mutual_likelihood_score(mu0, var0, mu1, var1).item() == pytest.approx(expected)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    va, vb = torch.rand(5, 8, generator=g), torch.rand(5, 8, generator=g)
    assert torch.allclose(mutual_likelihood_score(a, va, b, vb), mutual_likelihood_score(b, vb, a, va))
    # the same mean scores higher with less variance, and a closer mean scores higher
    assert mutual_likelihood_score(a, va * 0.5, a, va * 0.5).gt(mutual_likelihood_score(a, va, a, va)).all()


def test_prototype_is_the_precision_weighted_product_and_the_mean_for_equal_variances():
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    var = torch.tensor([[0.5, 0.25], [0.25, 0.25], [0.1, 0.1]])
    groups = torch.tensor([0, 0, 2])
    mu_p, var_p, count = fuse_gaussians(mu, var, groups, 3)
    # class 0, d1: precisions 2, 4 -> var 1/6, mu = (2*1 + 4*0)/6;  d2: 4, 4 -> var 1/8, mu = 4/8
    assert torch.allclose(var_p[0], torch.tensor([1 / 6, 1 / 8]))
    assert torch.allclose(mu_p[0], torch.tensor([2 / 6, 0.5]))
    assert count.tolist() == [2, 0, 1]
    assert torch.allclose(mu_p[2], mu[2]) and torch.allclose(var_p[2], var[2])  # one member: itself
    assert torch.equal(var_p[1], torch.ones(2)) and torch.equal(mu_p[1], torch.zeros(2))  # no member
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=g)
    mu_p, var_p, _ = fuse_gaussians(x, torch.full((7, 4), 0.3), torch.zeros(7, dtype=torch.long), 1)
    assert torch.allclose(mu_p[0], x.mean(0), atol=1e-6) and torch.allclose(var_p[0], torch.full((4,), 0.3 / 7))


def test_variance_head_stays_strictly_inside_0_1():
    head = VarianceHead(4, 8)
    for scale in (1.0, 1e3, 1e6):
        x = torch.randn(2, 4, 5, 5) * scale
        x[0, :, 0, 0] = 1e30  # an extreme pixel: the log(e^x + 1e-6) must not overflow to NaN
        var = head(x)
        assert var.shape == (2, 8, 5, 5) and torch.isfinite(var).all()
        assert (var > 0).all() and (var < 1).all()


def test_sample_members_draws_only_the_wanted_class():
    member_class = torch.tensor([2, 0, 2, 1, 0, 2])
    wanted = torch.tensor([[0, 2, 1], [2, 2, 0]]).repeat(50, 1)
    index = sample_members(member_class, wanted, 3, torch.Generator().manual_seed(0))
    assert index.shape == wanted.shape and torch.equal(member_class[index], wanted)
    assert set(index[wanted == 2].tolist()) == {0, 2, 5}  # every member reachable


def _searchsorted_draws(probs, n, generator):
    """The inverse-CDF draw written with searchsorted (prcl's sampling before it counted CDF steps)."""
    cdf = torch.cumsum(probs, 1)
    u = torch.rand(len(probs), n, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[1] - 1)


def _indexed_members(member_class, wanted, num_classes, generator):
    """sample_members written with advanced indexing (before its per-class tables)."""
    order = torch.argsort(member_class, stable=True)
    counts = torch.bincount(member_class, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    n = counts[wanted]
    r = torch.rand(wanted.shape, generator=generator)
    return order[starts[wanted] + torch.minimum((r * n).long(), n - 1)]


def test_sampling_makes_the_same_draws_as_searchsorted_and_indexing():
    """The faster sampling consumes the same random numbers and makes the same draws, so runs
    keep their numbers: categorical draws (zero-probability classes, an absent last class, a row
    of one class) and member draws, compared draw for draw."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 6, generator=g), 1)
    probs[:, [2, 5]] = 0
    probs[torch.arange(4), torch.arange(4)] = 0
    probs[3] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    for seed in range(3):
        ours = draw_categorical(probs, 5000, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, _searchsorted_draws(probs, 5000, torch.Generator().manual_seed(seed)))
        assert (probs.gather(1, ours) > 0).all()
    # random rows with random zeros, and 300 classes (the count no longer fits a byte)
    for trial, classes in enumerate([2, 7, 21, 29, 300]):
        probs = torch.softmax(3 * torch.randn(5, classes, generator=g), 1) * (torch.rand(5, classes, generator=g) < 0.6)
        probs[probs.sum(1) == 0, 0] = 1.0
        probs = probs / probs.sum(1, keepdim=True)
        ours = draw_categorical(probs, 2000, torch.Generator().manual_seed(trial))
        assert torch.equal(ours, _searchsorted_draws(probs, 2000, torch.Generator().manual_seed(trial)))
    member_class = torch.randint(0, 5, (300,), generator=g)
    member_class[member_class == 3] = 4  # class 3 has no member (never wanted)
    wanted = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (7, 50), generator=g)]
    for seed in range(3):
        ours = sample_members(member_class, wanted, 5, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, _indexed_members(member_class, wanted, 5, torch.Generator().manual_seed(seed)))


def test_contrast_set_anchors_are_hard_and_negatives_are_other_present_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 20 + [3] * 10)
    hard = torch.rand(60, generator=g) < 0.5
    hard[30:50] = False  # class 1 has no hard pixel: it gives no anchors but can be a negative
    mu, var = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g)
    classes, anchors, negatives, probs = sample_contrast_set(labels, hard, mu, var, torch.ones(5, dtype=torch.bool),
                                                              5, 16, 32, 0.5, g)
    assert classes.tolist() == [0, 3]
    assert anchors.shape == (2, 16) and negatives.shape == (2, 16, 32)
    for i, c in enumerate(classes.tolist()):
        assert (labels[anchors[i]] == c).all() and hard[anchors[i]].all()
        neg_classes = set(labels[negatives[i]].unique().tolist())
        assert c not in neg_classes and neg_classes <= {0, 1, 3}
        assert probs[i, c] == 0 and probs[i, [2, 4]].sum() == 0  # absent classes never drawn
    # one class present: nothing to contrast
    classes, anchors, negatives, _ = sample_contrast_set(torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.bool),
                                                         mu, var, torch.ones(5, dtype=torch.bool), 5, 16, 32, 0.5)
    assert classes.numel() == 0 and negatives.shape == (0, 16, 32)


def test_virtual_negatives_have_the_right_shape_and_centre():
    mu = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [5.0, 5.0, 5.0]])
    var = torch.full((4, 3), 0.04)
    seen = torch.tensor([True, True, True, False])
    torch.manual_seed(0)
    v_mu, v_var = virtual_negatives(mu, var, seen, anchor_class=1, per_class=4000, radius=1.0)
    assert v_mu.shape == (8000, 3) and torch.equal(v_var, torch.zeros(8000, 3))
    first, second = v_mu[:4000], v_mu[4000:]  # classes 0 and 2 (not the anchor's, not the unseen one)
    assert torch.allclose(first.mean(0), mu[0], atol=0.02) and torch.allclose(second.mean(0), mu[2], atol=0.02)
    assert first.std(0).sub(0.2).abs().max() < 0.02  # sigma = sqrt(0.04)
    v_mu, _ = virtual_negatives(mu, torch.zeros(4, 3), seen, 0, 3, 1.0)
    assert torch.equal(v_mu, mu[[1, 1, 1, 2, 2, 2]])  # zero variance: exactly the prototypes


def test_contrast_loss_is_the_cross_entropy_of_mls_logits():
    g = torch.Generator().manual_seed(0)
    a_mu, a_var = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g)
    p_mu, p_var = torch.randn(4, generator=g), torch.rand(4, generator=g)
    pool_mu, pool_var = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g)
    index = torch.randint(0, 6, (3, 5), generator=g)
    loss = contrast_loss(a_mu, a_var, p_mu, p_var, pool_mu, pool_var, index, 0.5)
    expected = []
    for q in range(3):
        logits = [mutual_likelihood_score(a_mu[q], a_var[q], p_mu, p_var) / 0.5]
        logits += [mutual_likelihood_score(a_mu[q], a_var[q], pool_mu[j], pool_var[j]) / 0.5 for j in index[q]]
        logits = torch.stack(logits)
        expected.append(-(logits[0] - torch.logsumexp(logits, 0)))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("block", [1, 200, 10 ** 9])  # one anchor, 3 anchors (of 7), all anchors per block
def test_blocked_contrast_has_the_reference_values_and_gradients_in_float64(block, backend):
    """The blocked contrast (no [anchors x negatives x dims] tensor), with either backend
    (``prcl.kernels``), against the reference's formula written out (``reference_mls``: means
    L2-normalised inside, then the cube), on fixed float64 tensors: the same loss and the same
    gradients for the raw anchor means and variances. Keys carry no gradient, as the reference
    builds them under no_grad."""
    g = torch.Generator().manual_seed(3)
    q, n, r, v, d, t = 7, 9, 11, 4, 6, 0.3
    a_raw = (2 * torch.randn(q, d, generator=g, dtype=torch.float64)).requires_grad_()
    a_var = (0.1 + torch.rand(q, d, generator=g, dtype=torch.float64)).requires_grad_()
    pool_raw, pool_var = 2 * torch.randn(r, d, generator=g, dtype=torch.float64), 0.1 + torch.rand(r, d, generator=g, dtype=torch.float64)
    p_raw, p_var = torch.randn(d, generator=g, dtype=torch.float64), 0.1 + torch.rand(d, generator=g, dtype=torch.float64)
    v_raw, v_var = torch.randn(v, d, generator=g, dtype=torch.float64), torch.zeros(v, d, dtype=torch.float64)
    index = torch.randint(0, r, (q, n), generator=g)

    keys_mu = torch.cat([p_raw.expand(q, 1, d), pool_raw[index], v_raw.expand(q, v, d)], 1)
    keys_var = torch.cat([p_var.expand(q, 1, d), pool_var[index], v_var.expand(q, v, d)], 1)
    logits = reference_mls(a_raw[:, None], keys_mu, a_var[:, None], keys_var) / t
    reference = F.cross_entropy(logits, torch.zeros(q, dtype=torch.long))
    ref_grads = torch.autograd.grad(reference, [a_raw, a_var])

    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731  (prcl normalises every mean once, before the MLS)
    ours = contrast_loss(unit(a_raw), a_var, unit(p_raw), p_var, unit(pool_raw), pool_var, index, t,
                         (unit(v_raw), v_var), block=block * (1 + n + v) * d, backend=backend)
    our_grads = torch.autograd.grad(ours, [a_raw, a_var])
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    for ours_g, ref_g in zip(our_grads, ref_grads):
        assert torch.allclose(ours_g, ref_g, rtol=1e-10, atol=1e-14)
        assert ref_g.abs().max() > 1e-4  # a gradient that really flows


def test_compiled_kernels_match_eager_in_float32_at_the_reference_shape_and_fail_in_one_line(monkeypatch):
    """``prcl.kernels=compiled`` against ``eager`` in float32 on one class at the reference's
    shape (256 anchors, 512 + 28 keys; 64 dims instead of 256 to keep the test short): the same
    loss and gradients to float rounding; the variance head's tail too. A torch.compile that fails
    says in one line which switch to change."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    var = lambda *s: 0.1 + torch.rand(*s, generator=g)  # noqa: E731
    q, d, r = 256, 64, 2000
    inputs = (unit(q, d), var(q, d), unit(d), var(d), unit(r, d), var(r, d), torch.randint(0, r, (q, 512), generator=g))
    virtual = (unit(28, d), var(28, d))
    results = {}
    for backend in ("eager", "compiled"):
        a_mu, a_var = inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()
        loss = contrast_loss(a_mu, a_var, *inputs[2:], 100.0, virtual, backend=backend)
        results[backend] = (loss.detach(), *torch.autograd.grad(loss, [a_mu, a_var]))
    for eager, compiled in zip(results["eager"], results["compiled"]):
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-6 * eager.abs().max().item())

    # the compiled backend copies the pool into its key table once per pool tensor: other classes'
    # positives and virtual negatives with the same pool, and the pool changed in place, are seen
    pool_mu, pool_var = inputs[4].clone(), inputs[5].clone()
    for change in ("another class", "fewer virtual", "pool changed in place"):
        if change == "pool changed in place":
            pool_mu.copy_(unit(r, d))
            pool_var.copy_(var(r, d))
        pos, virtual = (unit(d), var(d)), (unit(28, d), var(28, d))
        if change == "fewer virtual":
            virtual = (virtual[0][:4], virtual[1][:4])
        losses = [contrast_loss(*inputs[:2], *pos, pool_mu, pool_var, inputs[6], 0.01, virtual, backend=b)
                  for b in ("eager", "compiled")]
        assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5), change

    head, head_eager = VarianceHead(4, 8, kernels="compiled"), VarianceHead(4, 8)
    head_eager.load_state_dict(head.state_dict())
    x = torch.randn(2, 4, 5, 5, generator=g)
    compiled_var, eager_var = head(x), head_eager(x)
    assert torch.allclose(compiled_var, eager_var, rtol=1e-5, atol=1e-7)
    assert compiled_var.is_contiguous(memory_format=torch.channels_last)

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run
    monkeypatch.setattr(prcl, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(BenchError, match=r"^prcl.kernels=compiled: torch.compile failed \(RuntimeError: no C\+\+ compiler found\); use prcl.kernels=eager$"):
        contrast_loss(*inputs[:2], *inputs[2:], 100.0, virtual, backend="compiled")


def test_contrast_loss_refuses_keys_that_require_grad():
    x = torch.rand(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="must not require grad"):
        contrast_loss(x, x, x[0], x[0], x, x, torch.zeros(2, 1, dtype=torch.long), 1.0)


def test_class_mix_switch_takes_half_the_present_classes_rounded_up():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[3, 3, 3, 3], [3, 3, 3, 3]]])
    mask = class_mix_masks(labels, 4, 255, torch.Generator().manual_seed(0), count="ceil_present")
    chosen0 = {c for c in (0, 1, 2) if mask[0][labels[0] == c].all()}
    assert len(chosen0) == 2  # ceil(3 / 2)
    for c in (0, 1, 2):  # a class is taken whole or not at all
        assert mask[0][labels[0] == c].all() or not mask[0][labels[0] == c].any()
    assert not mask[0][labels[0] == 255].any()
    assert mask[1].all()  # one class: ceil(1/2) = 1


def test_crop_theta_identity_flip_and_zoom():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    one, zero, no, yes = torch.ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool)
    assert torch.allclose(warp(img, crop_theta(one, zero, zero, no)), img)
    assert torch.allclose(warp(img, crop_theta(one, zero, zero, yes)), img.flip(-1))
    # scale 2, window at the bottom-right quarter: the nearest upscale of that quarter
    out = warp_labels(img[:, 0].long(), crop_theta(2 * one, one, one, no), 255)
    assert torch.equal(out[0], img[0, 0, 2:, 2:].repeat_interleave(2, 0).repeat_interleave(2, 1).long())
    # scale 0.5: the image lands in the top-left quarter, the rest is padding (ignore)
    out = warp_labels(img[:, 0].long(), crop_theta(0.5 * one, zero, zero, no), 255)
    assert (out[0, 2:] == 255).all() and (out[0, :, 2:] == 255).all() and (out[0, :2, :2] != 255).all()


def _ctx(num_classes=3):
    return RunContext(num_classes, [str(i) for i in range(num_classes)], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=16), 10, 0, 0.01, (0.75, 1.25))


def _batch(seed=0, one_class=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 3, (2, 32, 32), generator=g)
    if one_class:
        mask[:] = 1
    return {"labeled": {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": mask},
            "unlabeled": {"image": torch.randn(2, 3, 32, 32, generator=g)}}


@pytest.mark.parametrize("gdp, vn, classmix", [(True, True, "floor_unique"), (False, False, "ceil_present"),
                                               (True, False, "floor_unique"), (False, True, "floor_unique")])
def test_training_step_is_finite_with_one_class_or_no_confident_pixels(gdp, vn, classmix):
    torch.manual_seed(0)
    method = PRCL(PRCL.Config(gdp=gdp, vn=vn, num_queries=8, num_negatives=16, temperature=0.5,
                              classmix_count=classmix), _ctx())
    method.train()
    for step, batch in enumerate([_batch(0), _batch(1, one_class=True), _batch(2)]):
        out = method.training_step(batch, step)
        assert torch.isfinite(out["loss"]) and out["contrast"] >= 0, out
        out["loss"].backward()
        method.on_step_end(step)
    # an untrained teacher is never 0.97 sure: the unsupervised CE weight is 0, the loss finite
    assert out["unsup"] == 0
    assert method.gdp_seen.all() == (gdp or vn)


def test_global_prototypes_accumulate_every_batch():
    method = PRCL(PRCL.Config(rep_dim=4), _ctx(2))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 4, generator=g), torch.rand(2, 4, generator=g) + 0.1) for _ in range(3)]
    for mu, var in batches:
        method.update_global_prototypes(mu, var, torch.tensor([True, False]))
    mu_all = torch.stack([b[0][0] for b in batches])
    var_all = torch.stack([b[1][0] for b in batches])
    expect_mu, expect_var, _ = fuse_gaussians(mu_all, var_all, torch.zeros(3, dtype=torch.long), 1)
    assert torch.allclose(method.gdp_mu[0], expect_mu[0]) and torch.allclose(1 / method.gdp_precision[0], expect_var[0])
    assert method.gdp_seen.tolist() == [True, False] and torch.equal(method.gdp_mu[1], torch.zeros(4))


def test_eval_network_is_a_config_field():
    torch.manual_seed(0)
    teacher = PRCL(PRCL.Config(), _ctx())
    student = PRCL(PRCL.Config(eval_network="student"), _ctx())
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        teacher.model.classifier.bias += 1.0  # make the two networks differ
        student.model.classifier.bias += 1.0
    teacher.eval(), student.eval()
    x = torch.randn(1, 3, 32, 32)
    assert teacher.eval_network == "ema_teacher" and student.eval_network == "student"
    assert torch.allclose(teacher.predict(x), teacher.teacher(x))
    assert torch.allclose(student.predict(x), student.model(x))
    assert not torch.allclose(teacher.predict(x), student.predict(x))


@pytest.mark.parametrize("count", ["floor_unique", "ceil_present"])
def test_strong_view_is_the_recipe_written_out(count):
    """The kit's pieces draw and compute what prcl's own strong view did before it moved onto them:
    warp + nearest labels and confidences, ClassMix with the next image, jitter and blur."""
    method = PRCL(PRCL.Config(classmix_count=count), _ctx())
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 3, (3, 32, 32), generator=g)
    conf = torch.rand(3, 32, 32, generator=g)
    torch.manual_seed(5)
    got = method.strong_view(images, labels, conf)
    torch.manual_seed(5)
    theta = random_crop_theta(3, (0.75, 1.25))
    x, y = warp(images, theta), warp_labels(labels, theta, 255)
    c = warp(conf[:, None], theta, mode="nearest")[:, 0] * (y != 255)
    mask = class_mix_masks(y, 3, 255, count=count)
    partner = [1, 2, 0]
    x, y, c = (torch.where(mask[:, None] if t.dim() == 4 else mask, t, t[partner]) for t in (x, y, c))
    photo = draw_photometric(3, jitter_p=0.8, brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25,
                             gray_p=0.0, blur_p=0.5, blur_sigma=(0.15, 1.15))
    expected = (apply_photometric(x, photo, kernel_size=7), y, c)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_checkpoint_with_the_old_teacher_keys_loads():
    """Before bench.semi the teacher was a bare network (keys ``teacher.*``); such a checkpoint loads."""
    torch.manual_seed(0)
    saved = PRCL(PRCL.Config(), _ctx())
    with torch.no_grad():
        saved.teacher.network.classifier.bias += 1.0
    new = saved.state_dict()
    old = type(new)((k.replace("teacher.network.", "teacher.", 1), v) for k, v in new.items())
    old._metadata = type(new._metadata)((k.replace("teacher.network", "teacher", 1), v)
                                        for k, v in new._metadata.items() if k != "teacher")
    loaded = PRCL(PRCL.Config(), _ctx())
    loaded.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), new.values()))
    assert list(loaded.state_dict()) == list(new)


def test_prcl_run_resumes_with_teacher_and_prototypes(tmp_path, tiny_protocol, monkeypatch):
    """A killed prcl run resumes from its checkpoint (teacher, global prototypes, optimiser) and
    ends with the metrics of an uninterrupted run; the unlabeled batches never carried masks."""
    from bench.cli import main

    over = ["prcl.num_queries=8", "prcl.num_negatives=16"]
    seen_keys = []
    original_step = PRCL.training_step

    def spy(self, batch, step, stage="train"):
        seen_keys.append(set(batch["unlabeled"]))
        return original_step(self, batch, step, stage)

    def run(results, cache):
        return main(["run", "--methods", "prcl", "--protocol", str(tiny_protocol), "--results-dir",
                     str(results), "--cache-dir", str(cache), "--no-progress", *over])

    monkeypatch.setattr(PRCL, "training_step", spy)
    assert run(tmp_path / "ref", tmp_path / "ref-cache") == 0
    assert seen_keys and all(keys == {"image", "valid", "index"} for keys in seen_keys)
    [ref] = (tmp_path / "ref").rglob("result.json")
    state, resumed = interrupt_and_resume(run, PRCL, tmp_path, monkeypatch)
    assert state["step"] == 3 and state["method"]["gdp_seen"].any()
    assert any(k.startswith("teacher.network.") for k in state["method"])
    ref = json.loads(ref.read_text())
    assert resumed["resumed_from_step"] == 3 and resumed["metrics"] == ref["metrics"]
    assert ref["eval_network"] == "ema_teacher" and ref["supervision"] == ["pixel_labels", "unlabeled_images"]


# --- against the reference code (Haoyu-Xie/PRCL, generalframeworks/loss/loss.py) ------------------

def reference_mls(mu_0, mu_1, sigma_0, sigma_1):
    """The reference's mutual_likelihood_score, written out: it L2-normalises both means first."""
    mu_0, mu_1 = F.normalize(mu_0, dim=-1), F.normalize(mu_1, dim=-1)
    down = sigma_0 + sigma_1
    return -0.5 * ((mu_0 - mu_1) ** 2 / down + torch.log(down)).mean(-1)


def reference_prototype(mu, sigma):
    """Prcl_Loss's prototype of one class from its pixels' raw means and variances."""
    proto_sigma = 1 / torch.sum(1 / sigma, dim=0)
    return torch.sum(proto_sigma / sigma * mu, dim=0), proto_sigma


def _contrast_inputs():
    """Fixed tensors: 3 classes present (4 pixels each), class 1 with no hard pixel (own-class
    probability 0.9 >= 0.8), raw means of norm ~3, variances in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(0)
    d = 8
    labels = torch.tensor([[[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]]])
    mu = 3 * torch.randn(1, d, 2, 6, generator=g)
    var = 0.1 + 0.8 * torch.rand(1, d, 2, 6, generator=g)
    own = torch.where(labels == 1, 0.9, 0.5)
    prob = ((1 - own) / 2)[:, None].repeat(1, 3, 1, 1)
    prob.scatter_(1, labels[:, None], own[:, None])
    return mu, var, labels, torch.ones_like(labels, dtype=torch.bool), prob


def test_contrast_divides_by_present_classes_and_uses_unit_prototypes_of_raw_means(monkeypatch):
    """Against a hand-written copy of the reference's Prcl_Loss (same anchors and negatives): the
    sum over anchor classes is divided by the number of PRESENT classes (3 here, although class 1
    gives no anchors), prototypes are fused from raw means, and the MLS normalises every mean."""
    import methods.prcl as prcl

    mu, var, labels, valid, prob = _contrast_inputs()
    t = 0.5
    method = PRCL(PRCL.Config(rep_dim=8, gdp=False, vn=False, num_queries=5, num_negatives=7, temperature=t), _ctx())
    drawn, positives = [], []
    sample, loss_fn = prcl.sample_contrast_set, prcl.contrast_loss
    monkeypatch.setattr(prcl, "sample_contrast_set", lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])
    monkeypatch.setattr(prcl, "contrast_loss", lambda *a, **k: positives.append(a[2]) or loss_fn(*a, **k))
    torch.manual_seed(0)
    ours = method.contrast(mu, var, labels, valid, prob)

    classes, anchor_index, negative_index, _ = drawn[0]
    assert classes.tolist() == [0, 2]  # class 1 is present but has no hard pixel
    flat_mu, flat_var, flat_lab = mu.permute(0, 2, 3, 1).reshape(-1, 8), var.permute(0, 2, 3, 1).reshape(-1, 8), labels.reshape(-1)
    total = 0.0
    for i, k in enumerate(classes.tolist()):
        proto_mu, proto_sigma = reference_prototype(flat_mu[flat_lab == k], flat_var[flat_lab == k])
        # the prototype our contrast used is the unit-length version of the reference's raw fusion
        assert torch.allclose(positives[i], F.normalize(proto_mu, dim=0), atol=1e-6)
        assert positives[i].norm().item() == pytest.approx(1.0, abs=1e-6)
        a, n = anchor_index[i], negative_index[i]
        all_mu = torch.cat([proto_mu.expand(5, 1, 8), flat_mu[n]], 1)
        all_sigma = torch.cat([proto_sigma.expand(5, 1, 8), flat_var[n]], 1)
        logits = reference_mls(flat_mu[a][:, None], all_mu, flat_var[a][:, None], all_sigma)
        total = total + F.cross_entropy(logits / t, torch.zeros(5, dtype=torch.long))
    reference = total / 3  # valid_num = len(num_list): every present class
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert ours.item() == pytest.approx((total / 2).item() * 2 / 3, rel=1e-5)  # not the mean over the 2 anchor classes


def test_class_mix_takes_half_of_the_unique_values_rounded_down_ignore_included():
    """The reference's generate_class_mask: labels[randperm(len(unique))][:len(unique) // 2]."""
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[3, 3, 3, 3], [3, 3, 3, 3]],
                           [[0, 0, 1, 1], [1, 1, 255, 255]]])
    kept_ignore = 0
    for seed in range(40):
        mask = class_mix_masks(labels, 4, 255, torch.Generator().manual_seed(seed), count="floor_unique")
        for img in range(3):
            unique = labels[img].unique()
            chosen = [v for v in unique.tolist() if mask[img][labels[img] == v].all()]
            assert len(chosen) == len(unique) // 2  # 4 // 2, 1 // 2 = 0 (nothing kept), 3 // 2
            for v in unique.tolist():  # a value is taken whole or not at all
                assert mask[img][labels[img] == v].all() or not mask[img][labels[img] == v].any()
        kept_ignore += int(mask[0][labels[0] == 255].all())
    assert not mask[1].any() and 0 < kept_ignore < 40  # the ignore value is chosen like a class

