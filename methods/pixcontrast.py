"""``pixcontrast``: cross-image pixel contrast (Wang et al., ICCV 2021, "Exploring Cross-Image Pixel
Contrast for Semantic Segmentation"), on top of the CE baseline.

A projection head (training only) embeds the decoder features; per image and class, anchors are
sampled half "hard" (labeled c, predicted otherwise) and half "easy"; a supervised-contrastive loss
pulls same-class embeddings together across the whole batch, or against class-wise memory queues
of pixel and region embeddings (``memory: true``, with the reference's memory config: its own
temperature, loss weight and anchors per class; the queues are filled from the first step).
Total loss = CE + loss weight x contrast, the contrast switched on after a warm-up.

Everything is vectorised: sampling is a sort by (image, class, hardness) key with random
tie-breaking, queues are device ring buffers written with ``index_copy_``; no Python loop over
pixels, anchors or classes, no host sync per class.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator

from bench import distributed
from bench.losses import masked_cross_entropy, rank_in_groups
from bench.method import Method, MethodConfig
from bench.registry import register_method


class PixContrastConfig(MethodConfig):
    # loss_weight, temperature and max_views are the reference's in-batch config (H_48_D_4.json);
    # with memory=true their memory_* counterparts apply (H_48_D_4_MEM.json). Two sets of fields,
    # not one with mode-dependent defaults, so that each value is in the config hash as it is used.
    loss_weight: float = 0.1
    temperature: float = 0.1
    base_temperature: float = 0.07
    max_samples: int = 1024  # anchors per batch, at most
    max_views: int = 100  # anchors per (image, class), at most
    # an (image, class) pair gives anchors only if it has more than this many pixels at feature
    # stride (the reference uses max_views, or memory_max_views with memory); None = that value
    min_pixels: int | None = None
    proj_dim: int = 256
    # the reference switches the contrast on at iteration 5000 of 40000 (Cityscapes schedule)
    warmup_fraction: float = 0.125
    memory: bool = False
    memory_size: int = 5000  # entries per class in each queue
    pixel_update_freq: int = 10  # pixels enqueued per (image, class) and step
    memory_loss_weight: float = 1.0
    memory_temperature: float = 0.07
    memory_max_views: int = 1
    # the queues at step 0: "random" unit vectors in every slot (the reference), or "empty" slots
    # that take no part until written
    memory_init: Literal["random", "empty"] = "random"
    # the reference neither enqueues class 0 nor contrasts with its queue rows (it treats 0 as
    # background); False keeps class 0 like every other class
    memory_skip_class_0: bool = True

    @model_validator(mode="after")
    def _fields_of_the_other_mode_are_not_set(self):
        """An override that the chosen mode would ignore is an error, not a silent no-op (a full
        dump of a config, every field at the value it had, still validates)."""
        pairs = (("loss_weight", "memory_loss_weight"), ("temperature", "memory_temperature"),
                 ("max_views", "memory_max_views"))
        for plain, mem in pairs:
            ignored = plain if self.memory else mem
            if getattr(self, ignored) != type(self).model_fields[ignored].default:
                used = mem if self.memory else plain
                raise ValueError(f"{ignored} has no effect with memory={self.memory}; set {used}")
        return self

    @property
    def mode(self) -> tuple[float, float, int]:
        """(loss weight, temperature, max views) of the chosen mode."""
        if self.memory:
            return self.memory_loss_weight, self.memory_temperature, self.memory_max_views
        return self.loss_weight, self.temperature, self.max_views


def sample_anchors(labels: torch.Tensor, preds: torch.Tensor, num_classes: int, ignore_index: int,
                   max_samples: int, max_views: int, min_pixels: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard/easy anchor sampling, vectorised.

    ``labels``, ``preds``: [B, N] at feature resolution. Returns ``index`` [P, V] into the flattened
    [B * N] pixels and ``classes`` [P]: P (image, class) pairs with more than ``min_pixels`` pixels,
    V = min(max_samples // P, max_views) anchors each, half hard and half easy, topping up from
    the other kind when one runs short. With the reference's ``min_pixels = max_views`` every pair
    has more than V pixels; with a smaller ``min_pixels``, V also shrinks to the smallest pair's
    pixel count, so that every pair gives the same number of anchors.
    """
    device = labels.device
    b, n = labels.shape
    lab, pred = labels.reshape(-1), preds.reshape(-1)
    valid = lab != ignore_index
    pix = valid.nonzero().squeeze(1)
    pair = (pix // n) * num_classes + lab[pix]  # (image, class) id of every valid pixel
    counts = torch.bincount(pair, minlength=b * num_classes)
    kept_pairs = (counts > min_pixels).nonzero().squeeze(1)
    p = kept_pairs.numel()
    empty = torch.zeros(0, 0, dtype=torch.long, device=device)
    if p == 0:
        return empty, torch.zeros(0, dtype=torch.long, device=device)
    # every pair must be able to give V anchors: the reference's min_pixels = max_views ensures it
    views = min(max_samples // p, max_views, int(counts[kept_pairs].min()))
    if views == 0:
        return empty, torch.zeros(0, dtype=torch.long, device=device)
    easy = (pred[pix] == lab[pix]).long()
    n_easy = torch.bincount(pair, weights=easy.double(), minlength=b * num_classes).long()[kept_pairs]
    n_hard = counts[kept_pairs] - n_easy
    # half hard, half easy; when one kind runs short the other tops up (never an error)
    take_hard = torch.minimum(n_hard, torch.clamp(views - n_easy, min=views // 2))
    take_easy = views - take_hard
    # rank every pixel of a kept pair within its (pair, hardness) group, in random order:
    # sorting by group + uniform noise shuffles within groups and keeps groups contiguous
    slot = torch.full((b * num_classes,), -1, dtype=torch.long, device=device)
    slot[kept_pairs] = torch.arange(p, device=device)
    in_kept = slot[pair] >= 0
    pix, group = pix[in_kept], slot[pair[in_kept]] * 2 + easy[in_kept]
    noise = torch.rand(pix.numel(), generator=generator, dtype=torch.float64, device=device)
    order = torch.argsort(group.double() + noise)
    group_sorted = group[order]
    rank = rank_in_groups(group_sorted, 2 * p)
    quota = torch.stack([take_hard, take_easy], 1).reshape(-1)  # hard quota, easy quota of each pair
    index = pix[order[rank < quota[group_sorted]]].reshape(p, views)  # hard anchors first, then easy
    return index, kept_pairs % num_classes


def supcon_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, contrast: torch.Tensor,
                contrast_labels: torch.Tensor, temperature: float, base_temperature: float,
                exclude_self: bool) -> torch.Tensor:
    """L_i = -(tau / tau_base) * mean_{p in P(i)} [ s_ip/tau - log(e^{s_ip/tau} + sum_{n in N(i)} e^{s_in/tau}) ]

    averaged over anchors that have at least one positive; 0 (with a graph) when none has.
    ``exclude_self``: the contrast set is the anchor set, so an anchor is not its own positive.
    """
    logits = anchors @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = anchor_labels[:, None] == contrast_labels[None, :]
    positive = same
    if exclude_self:
        positive = same & ~torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)
    exp = logits.exp()
    neg_sum = (exp * (~same)).sum(1, keepdim=True)
    log_prob = logits - torch.log(exp + neg_sum)
    n_pos = positive.sum(1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return anchors.sum() * 0.0
    mean_log_prob_pos = (log_prob * positive).sum(1)[has_pos] / n_pos[has_pos]
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def ring_enqueue(queue: torch.Tensor, ptr: torch.Tensor, fill: torch.Tensor, feats: torch.Tensor,
                 classes: torch.Tensor) -> None:
    """Append ``feats`` [N, D] to the per-class ring buffers ``queue`` [C, M, D] in place.

    Each class's pointer advances by the number of entries it received and wraps around, so the
    oldest entries are overwritten; if a class gets more than M at once only its newest M are kept.
    """
    c, m, _ = queue.shape
    if feats.numel() == 0:
        return
    order = torch.argsort(classes, stable=True)
    classes, feats = classes[order], feats[order]
    counts = torch.bincount(classes, minlength=c)
    rank = rank_in_groups(classes, c)
    keep = rank >= counts[classes] - m  # the newest m of each class
    classes, feats, rank = classes[keep], feats[keep], rank[keep]
    slots = classes * m + (ptr[classes] + rank) % m
    queue.view(c * m, -1).index_copy_(0, slots, feats.to(queue.dtype))
    ptr.copy_((ptr + counts) % m)
    fill.copy_(torch.clamp(fill + counts, max=m))


@register_method
class PixContrast(Method):
    name = "pixcontrast"
    needs = frozenset({"pixel_labels"})
    output = "classes"
    Config = PixContrastConfig
    code_revision = 1  # 1: memory mode with the reference memory config, queues filled from step 0 (issue 14)

    @classmethod
    def revision(cls, cfg) -> int:
        return cls.code_revision if cfg.memory else 0  # the batch-only contrast did not change

    def __init__(self, cfg: PixContrastConfig, ctx):
        super().__init__(cfg, ctx)
        self.model = ctx.build_segmenter()
        dim = self.model.feature_dim
        # training-only projection head: 1x1 conv -> BN -> ReLU -> 1x1 conv to proj_dim
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim, cfg.proj_dim, 1))
        self.warmup_steps = round(cfg.warmup_fraction * ctx.iterations)
        c = ctx.num_classes
        if cfg.memory:
            # random slots (the reference) are full from the start; a generator of their own keeps
            # the global random stream (and so everything drawn after) as it was
            gen = torch.Generator().manual_seed(ctx.seed)
            for name in ("pixel_queue", "segment_queue"):
                if cfg.memory_init == "random":
                    queue = F.normalize(torch.randn(c, cfg.memory_size, cfg.proj_dim, generator=gen), dim=2)
                    fill = torch.full((c,), cfg.memory_size, dtype=torch.long)
                else:
                    queue = torch.zeros(c, cfg.memory_size, cfg.proj_dim)
                    fill = torch.zeros(c, dtype=torch.long)
                self.register_buffer(name, queue)
                self.register_buffer(f"{name}_ptr", torch.zeros(c, dtype=torch.long))
                self.register_buffer(f"{name}_fill", fill)

    def param_groups(self, stage="train"):
        return self.model.param_groups() + [{"params": list(self.proj.parameters()), "name": "projection"}]

    def unused_parameters(self, stage="train"):
        # the projection head has no gradient during the warm-up (no contrast, or queue filling only)
        return self.warmup_steps > 0

    def training_step(self, batch, step, stage="train"):
        cfg, ignore = self.cfg, self.ctx.ignore_index
        loss_weight, temperature, max_views = cfg.mode
        images, masks = batch["labeled"]["image"], batch["labeled"]["mask"]
        feats = self.model.features(images)
        logits = self.model.classify(feats)
        up = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        ce = masked_cross_entropy(up, masks, ignore)
        out = {"loss": ce, "ce": ce.detach()}
        warmup = step < self.warmup_steps
        if warmup and not cfg.memory:
            return out
        # the reference fills the queues from the first step, warm-up included
        with torch.set_grad_enabled(torch.is_grad_enabled() and not warmup):
            emb = F.normalize(self.proj(feats).float(), dim=1)
        b, d, h, w = emb.shape
        # labels nearest-downsampled to the feature grid; predictions = argmax of logits there
        small = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().reshape(b, -1)
        flat = emb.permute(0, 2, 3, 1).reshape(-1, d)
        if warmup:
            self._enqueue(flat.detach(), small.reshape(-1), b)
            return out
        pred = logits.detach().argmax(1).reshape(b, -1)
        min_pixels = max_views if cfg.min_pixels is None else cfg.min_pixels
        index, classes = sample_anchors(small, pred, self.ctx.num_classes, ignore, cfg.max_samples,
                                        max_views, min_pixels)
        if index.numel() == 0:
            contrast = emb.sum() * 0.0
        else:
            anchors = flat[index.reshape(-1)]
            anchor_labels = classes.repeat_interleave(index.shape[1])
            if cfg.memory:
                contrast = self._memory_contrast(anchors, anchor_labels)
            else:
                contrast = supcon_loss(anchors, anchor_labels, anchors, anchor_labels, temperature,
                                       cfg.base_temperature, exclude_self=True)
        if cfg.memory:
            self._enqueue(flat.detach(), small.reshape(-1), b)
        out["loss"] = ce + loss_weight * contrast
        out["contrast"] = contrast.detach()
        return out

    def _memory_contrast(self, anchors, anchor_labels):
        """Anchors against the filled slots of both queues; empty slots take no part."""
        c, m, d = self.pixel_queue.shape
        bank = torch.cat([self.segment_queue, self.pixel_queue], 1).reshape(-1, d)
        bank_labels = torch.arange(c, device=bank.device).repeat_interleave(2 * m)
        slot = torch.arange(m, device=bank.device)
        filled = torch.cat([slot[None] < self.segment_queue_fill[:, None],
                            slot[None] < self.pixel_queue_fill[:, None]], 1)
        if self.cfg.memory_skip_class_0:
            filled[0] = False
        filled = filled.reshape(-1)
        if not filled.any():
            return anchors.sum() * 0.0
        return supcon_loss(anchors, anchor_labels, bank[filled], bank_labels[filled], self.cfg.memory_temperature,
                           self.cfg.base_temperature, exclude_self=False)

    @torch.no_grad()
    def _enqueue(self, flat, labels, batch_size):
        """One region mean per (image, class) into the segment queue, ``pixel_update_freq`` random
        pixels per (image, class) into the pixel queue; class 0 too unless ``memory_skip_class_0``."""
        c, ignore = self.ctx.num_classes, self.ctx.ignore_index
        n = labels.numel() // batch_size
        kept = labels != ignore
        if self.cfg.memory_skip_class_0:
            kept &= labels != 0
        pix = kept.nonzero().squeeze(1)
        pair = (pix // n) * c + labels[pix]
        counts = torch.bincount(pair, minlength=batch_size * c)
        sums = torch.zeros(batch_size * c, flat.shape[1], device=flat.device).index_add_(0, pair, flat[pix])
        present = (counts > 0).nonzero().squeeze(1)
        means = F.normalize(sums[present] / counts[present, None], dim=1)
        order = torch.argsort(pair.double() + torch.rand(pair.numel(), dtype=torch.float64, device=flat.device))
        chosen = order[rank_in_groups(pair[order], batch_size * c) < self.cfg.pixel_update_freq]
        # under torchrun every rank enqueues every rank's entries, so the queues stay identical
        gather = distributed.all_gather_cat
        ring_enqueue(self.segment_queue, self.segment_queue_ptr, self.segment_queue_fill, gather(means),
                     gather(present % c))
        ring_enqueue(self.pixel_queue, self.pixel_queue_ptr, self.pixel_queue_fill, gather(flat[pix[chosen]]),
                     gather(labels[pix[chosen]]))

    @torch.no_grad()
    def predict(self, images):
        return self.model(images)
