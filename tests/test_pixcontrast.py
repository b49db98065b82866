"""pixcontrast: the loss against its formula, the sampler's hard/easy rules, the queues."""
import math

import pytest
import torch
import torch.nn.functional as F

from bench.method import RunContext
from bench.protocol import ModelSpec
from methods.pixcontrast import PixContrast, ring_enqueue, sample_anchors, supcon_loss
from tests.conftest import interrupt_and_resume


def naive_supcon(anchors, labels_a, contrast, labels_c, tau, tau_base, exclude_self):
    """The paper's formula, one anchor at a time."""
    losses = []
    for i in range(len(anchors)):
        sims = [float(anchors[i] @ contrast[j]) for j in range(len(contrast))]
        pos = [j for j in range(len(contrast)) if labels_c[j] == labels_a[i] and not (exclude_self and j == i)]
        neg = [j for j in range(len(contrast)) if labels_c[j] != labels_a[i]]
        if not pos:
            continue
        terms = [sims[p] / tau - math.log(math.exp(sims[p] / tau) + sum(math.exp(sims[n] / tau) for n in neg))
                 for p in pos]
        losses.append(-(tau / tau_base) * sum(terms) / len(terms))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_loss_equals_the_per_anchor_formula(exclude_self):
    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (12,), generator=g)
    if exclude_self:
        contrast, contrast_labels = anchors, labels
    else:
        contrast = torch.nn.functional.normalize(torch.randn(9, 8, generator=g, dtype=torch.float64), dim=1)
        contrast_labels = torch.randint(0, 3, (9,), generator=g)
    ours = supcon_loss(anchors, labels, contrast, contrast_labels, 0.1, 0.07, exclude_self)
    ref = naive_supcon(anchors, labels, contrast, contrast_labels, 0.1, 0.07, exclude_self)
    assert float(ours) == pytest.approx(ref, rel=1e-9)


def test_loss_with_one_class_is_finite_and_zero():
    x = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    y = torch.zeros(6, dtype=torch.long)
    loss = supcon_loss(x, y, x, y, 0.1, 0.07, exclude_self=True)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(0.0, abs=1e-6)  # no negatives: log 1


def _maps(b=2, n=400, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (b, n), generator=g)
    labels[torch.rand(b, n, generator=g) < 0.1] = 255
    preds = torch.where(torch.rand(b, n, generator=g) < 0.7, labels.clamp(max=classes - 1),
                        torch.randint(0, classes, (b, n), generator=g))
    return labels, preds


def test_sampling_respects_pairs_caps_and_the_hard_easy_split():
    labels, preds = _maps()
    index, classes = sample_anchors(labels, preds, 3, 255, max_samples=60, max_views=20, min_pixels=20)
    p, v = index.shape
    assert p == 6 and v == 10  # 2 images x 3 classes; V = min(60 // 6, 20)
    flat_l, flat_p = labels.reshape(-1), preds.reshape(-1)
    for row, cls in zip(index, classes):
        assert len(set(row.tolist())) == v  # no pixel twice
        assert (flat_l[row] == cls).all()  # every anchor has the pair's class
        assert len({int(i) // 400 for i in row}) == 1  # and lies in the pair's image
        hard = (flat_p[row] != cls).sum()
        assert hard == v // 2  # plenty of both kinds here: exactly half hard


def test_sampling_tops_up_when_hard_pixels_run_short():
    labels = torch.zeros(1, 100, dtype=torch.long)
    preds = labels.clone()
    preds[0, :3] = 1  # only 3 hard pixels of class 0
    index, classes = sample_anchors(labels, preds, 2, 255, max_samples=1024, max_views=40, min_pixels=40)
    assert index.shape == (1, 40) and classes.tolist() == [0]
    assert set(range(3)) <= set(index[0].tolist())  # all hard ones, the easy ones fill the rest
    preds[0, :] = 1  # now no easy pixel at all: hard tops up
    index, _ = sample_anchors(labels, preds, 2, 255, max_samples=1024, max_views=40, min_pixels=40)
    assert index.shape == (1, 40)


def test_sampling_skips_small_classes_and_handles_ignore_only():
    labels = torch.full((2, 50), 255)
    labels[0, :5] = 1  # a class with 5 pixels, below min_pixels
    index, classes = sample_anchors(labels, labels.clone(), 3, 255, 1024, 100, min_pixels=10)
    assert index.numel() == 0 and classes.numel() == 0
    index, classes = sample_anchors(labels, labels.clone(), 3, 255, 1024, 100, min_pixels=1)
    assert index.shape == (1, 5) and classes.tolist() == [1]  # fewer pixels than asked: V shrinks


def test_ring_buffer_wraps_and_keeps_the_newest():
    queue, ptr, fill = torch.zeros(3, 4, 1), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    ring_enqueue(queue, ptr, fill, torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 0, 0]))
    assert ptr.tolist() == [3, 0, 0] and fill.tolist() == [3, 0, 0]  # advanced by K = 3, class 0 included
    ring_enqueue(queue, ptr, fill, torch.tensor([[4.0], [5.0], [9.0]]), torch.tensor([0, 0, 2]))
    # class 0 wrapped: slot 3 <- 4, slot 0 <- 5 (the oldest, 1, is gone)
    assert queue[0, :, 0].tolist() == [5.0, 2.0, 3.0, 4.0]
    assert ptr.tolist() == [1, 0, 1] and fill.tolist() == [4, 0, 1]
    ring_enqueue(queue, ptr, fill, torch.arange(10.0, 16.0)[:, None], torch.zeros(6, dtype=torch.long))
    assert sorted(queue[0, :, 0].tolist()) == [12.0, 13.0, 14.0, 15.0]  # more than M at once: newest M


def _ctx():
    return RunContext(3, ["a", "b", "c"], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=16), 10, 0)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 3, (2, 32, 32), generator=g)
    mask[:, :4] = 255
    return {"labeled": {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": mask}}


@pytest.mark.parametrize("memory, switches", [(False, {}), (True, {}),
                                               (True, {"memory_init": "empty", "memory_skip_class_0": False})])
def test_training_step_is_finite_in_degenerate_batches(memory, switches):
    cfg = PixContrast.Config(memory=memory, memory_size=16, warmup_fraction=0.0, min_pixels=2, **switches)
    method = PixContrast(cfg, _ctx())
    batches = [_batch()]
    one_class = _batch(1)
    one_class["labeled"]["mask"][:] = 2
    batches.append(one_class)
    only_ignore = _batch(2)
    only_ignore["labeled"]["mask"][:] = 255
    batches.append(only_ignore)
    for step, batch in enumerate(batches):
        out = method.training_step(batch, step)
        assert torch.isfinite(out["loss"]), out
        out["loss"].backward()
    if switches:  # empty slots fill as entries come; class 0 enqueued like the others
        assert method.pixel_queue_fill[2] > 0 and 0 < method.segment_queue_fill[0] < 16
    elif memory:  # the reference's random slots: full from the start, class 0 never written
        assert (method.pixel_queue_fill == 16).all() and method.segment_queue_ptr[0] == 0


def test_warmup_and_inference_without_projection():
    method = PixContrast(PixContrast.Config(warmup_fraction=0.5), _ctx())
    assert "contrast" not in method.training_step(_batch(), 4)  # before step 5 of 10: CE only
    assert "contrast" in method.training_step(_batch(), 5)
    method.eval()
    calls = []
    method.proj.register_forward_hook(lambda *a: calls.append(1))
    assert method.predict(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert not calls  # the projection head is training-only


def test_queues_are_in_the_state_dict():
    method = PixContrast(PixContrast.Config(memory=True, memory_size=8, warmup_fraction=0.0, min_pixels=2), _ctx())
    method.training_step(_batch(), 0)
    state = method.state_dict()
    fresh = PixContrast(PixContrast.Config(memory=True, memory_size=8), _ctx())
    fresh.load_state_dict(state)
    for name in ("pixel_queue", "pixel_queue_ptr", "pixel_queue_fill", "segment_queue", "segment_queue_ptr"):
        assert torch.equal(getattr(fresh, name), getattr(method, name))
    assert method.pixel_queue_fill.sum() > 0


def test_killed_memory_run_resumes_with_the_same_queues_and_metrics(tmp_path, tiny_protocol, monkeypatch):
    """The queues and their pointers are checkpointed: a resumed run ends where an uninterrupted one does."""
    import json

    from bench.cli import main

    over = ["pixcontrast.memory=true", "pixcontrast.warmup_fraction=0", "pixcontrast.min_pixels=2",
            "pixcontrast.memory_size=16"]

    def run(results, cache):
        return main(["run", "--methods", "pixcontrast", "--protocol", str(tiny_protocol), "--results-dir",
                     str(results), "--cache-dir", str(cache), "--no-progress", *over])

    assert run(tmp_path / "ref", tmp_path / "ref-cache") == 0
    [ref] = (tmp_path / "ref").rglob("result.json")

    state, resumed = interrupt_and_resume(run, PixContrast, tmp_path, monkeypatch)
    assert state["step"] == 3 and state["method"]["pixel_queue_fill"].sum() > 0
    assert state["method"]["segment_queue_ptr"].sum() > 0
    ref = json.loads(ref.read_text())
    assert resumed["resumed_from_step"] == 3 and resumed["metrics"] == ref["metrics"]
    assert ref["config"]["method"]["memory"] is True


# --- against the reference code (tfzhou/ContrastiveSeg, memory config H_48_D_4_MEM.json) ---------

def test_memory_mode_uses_the_memory_configs_values_and_refuses_ignored_overrides():
    cfg = PixContrast.Config(memory=True)
    assert cfg.mode == (1.0, 0.07, 1)  # loss_weight 1, temperature 0.07, max_views 1
    assert PixContrast.Config().mode == (0.1, 0.1, 100)  # H_48_D_4.json
    assert PixContrast.Config(memory=True, memory_temperature=0.1).mode == (1.0, 0.1, 1)
    for bad in ({"memory": True, "temperature": 0.2}, {"memory_loss_weight": 0.5}):
        with pytest.raises(ValueError, match="has no effect with memory"):
            PixContrast.Config(**bad)


def test_queues_are_filled_during_the_warmup_as_the_reference_does():
    """trainer_contrastive._dequeue_and_enqueue runs on every step, warm-up included: per image and
    class > 0, the L2-normalised mean embedding goes to segment_queue[class, ptr] (ptr + 1), and
    min(n, pixel_update_freq) of its pixels to the pixel queue. Written out here for one step."""
    torch.manual_seed(0)
    cfg = PixContrast.Config(memory=True, memory_size=32, warmup_fraction=0.5)
    method = PixContrast(cfg, _ctx())
    before = method.segment_queue.clone()
    embeddings = []
    method.proj.register_forward_hook(lambda m, i, o: embeddings.append(o.detach()))
    batch = _batch()
    out = method.training_step(batch, 0)  # step 0 of a 5-step warm-up
    assert "contrast" not in out and len(embeddings) == 1
    emb = F.normalize(embeddings[0].float(), dim=1)
    b, d, h, w = emb.shape
    labels = F.interpolate(batch["labeled"]["mask"][:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    segment, ptr = before.clone(), torch.zeros(3, dtype=torch.long)
    pixels_expected = torch.zeros(3, dtype=torch.long)
    for bs in range(b):
        feat, lab = emb[bs].reshape(d, -1), labels[bs].reshape(-1)
        for lb in [x for x in lab.unique().tolist() if 0 < x < 255]:  # the reference: x > 0 (ignore is -1 there)
            idxs = (lab == lb).nonzero().squeeze(1)
            segment[lb, ptr[lb]] = F.normalize(feat[:, idxs].mean(1), dim=0)
            ptr[lb] += 1
            pixels_expected[lb] += min(len(idxs), cfg.pixel_update_freq)
    assert torch.allclose(method.segment_queue, segment, atol=1e-6)
    assert method.segment_queue_ptr.tolist() == ptr.tolist() and ptr[1:].sum() > 0
    assert method.pixel_queue_ptr.tolist() == pixels_expected.tolist()
    assert torch.equal(method.segment_queue[0], before[0])  # class 0 never enqueued


def reference_memory_contrast(anchors, y_anchor, queue, temperature, base_temperature):
    """loss_contrast_mem.PixelContrastLoss._contrastive with a queue, written out, minus its two
    broken parts (the bank rows left at zero with label 0 by _sample_negative, and the diagonal
    'self' mask that removes anchor i's i-th bank entry from its positives)."""
    c, m, d = queue.shape
    bank = queue[1:].reshape(-1, d)  # _sample_negative skips class 0
    y_bank = torch.arange(1, c).repeat_interleave(m)
    mask = (y_anchor[:, None] == y_bank[None]).float()
    logits = anchors @ bank.T / temperature
    logits = logits - logits.max(1, keepdim=True).values
    neg = (torch.exp(logits) * (1 - mask)).sum(1, keepdim=True)
    log_prob = logits - torch.log(torch.exp(logits) + neg)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def test_memory_contrast_equals_the_reference_with_the_memory_config():
    torch.manual_seed(0)
    method = PixContrast(PixContrast.Config(memory=True, memory_size=6, proj_dim=8), _ctx())
    g = torch.Generator().manual_seed(1)
    anchors = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    labels = torch.tensor([1, 2, 1, 2, 2])
    ours = method._memory_contrast(anchors, labels)
    queue = torch.cat([method.segment_queue, method.pixel_queue], 1)
    reference = reference_memory_contrast(anchors, labels, queue, 0.07, 0.07)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
