"""The pieces semi-supervised segmentation methods share: an EMA teacher, weak-to-strong views made
on the device, CutMix boxes and ClassMix masks, confidence-masked cross-entropy and the ratio of
confident pixels.

Each piece is small and does one thing, so a method file reads as its idea: see ``methods/fixmatch.py``
(one network, weak argmax supervises a CutMix strong view), ``methods/unimatch.py`` (two strong views
and a feature-perturbation branch) and ``methods/meanteacher.py`` (an EMA teacher).

Images are ImageNet-normalised float tensors [B, 3, H, W] as the loaders give them; label maps are
long [B, H, W]; masks are bool [B, H, W]. Randomness comes from the global torch RNG unless a
``generator`` is passed, so the engine's checkpointed RNG state makes a resumed run draw the same.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.augment import apply_photometric, draw_photometric, random_crop_theta, warp, warp_labels

# --- the EMA teacher ------------------------------------------------------------------------------


def ramp_decay(step: int, decay: float) -> float:
    """min(1 - 1/(step + 1), decay): 0 at step 0 (the teacher copies the student), then rising to
    ``decay`` (Mean Teacher's warm-up; U2PL, PRCL)."""
    return min(1 - 1 / (step + 1), decay)


def constant_decay(step: int, decay: float) -> float:
    """``decay`` from the first step (French et al.'s mean teacher)."""
    return decay


DECAY_SCHEDULES = {"ramp": ramp_decay, "constant": constant_decay}


class EMATeacher(nn.Module):
    """A frozen copy of a network, updated after every step as
    teacher <- decay(step) * teacher + (1 - decay(step)) * student.

    - ``schedule``: ``"ramp"`` (``ramp_decay``) or ``"constant"`` (``constant_decay``), or any
      callable (step, decay) -> float.
    - ``buffers``: also average the floating-point buffers (BatchNorm running mean and variance);
      integer buffers (``num_batches_tracked``) are copied. False: parameters only, the teacher's
      BatchNorm statistics are its own (PRCL's reference; a teacher in train mode refreshes them at
      every forward, one in eval mode would keep its initial ones).
    - ``mode``: the mode the teacher's network keeps while the method trains, even though the
      engine calls ``method.train()`` (which would otherwise put every sub-module in train mode).
      ``"train"``: BatchNorm normalises with the batch's statistics (and updates its own running
      statistics), as the references' teachers do when the whole model is in train mode; ``"eval"``:
      running statistics. ``method.eval()`` (before evaluation) puts it in eval mode either way.

    Its parameters have ``requires_grad=False``, so ``Method.param_groups`` leaves them out. It is a
    sub-module, so it is in the method's state dict and every checkpoint (keys ``<attr>.network.*``).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, schedule="ramp", buffers: bool = True,
                 mode: Literal["train", "eval"] = "train"):
        super().__init__()
        if mode not in ("train", "eval"):
            raise ValueError(f"EMATeacher mode must be 'train' or 'eval', not {mode!r}")
        self.network = copy.deepcopy(student).requires_grad_(False)
        self.decay, self.buffers, self.mode = decay, buffers, mode
        self.schedule = DECAY_SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        self.network.train(mode == "train")

    def train(self, mode: bool = True):
        super().train(mode)
        # while the method trains, the mode the method chose; evaluation is always in eval mode
        self.network.train(mode and self.mode == "train")
        return self

    def forward(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    def decay_at(self, step: int) -> float:
        return self.schedule(step, self.decay)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """One EMA step with the decay of ``step`` (call it from ``on_step_end``)."""
        d = self.decay_at(step)
        for t, s in zip(self.network.parameters(), student.parameters()):
            t.mul_(d).add_(s.detach(), alpha=1 - d)
        if self.buffers:
            for t, s in zip(self.network.buffers(), student.buffers()):
                if t.is_floating_point():
                    t.mul_(d).add_(s.detach(), alpha=1 - d)
                else:
                    t.copy_(s)


# --- views ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrongAugment:
    """Per-image photometric strong augmentation on the device (``bench/augment.py``): colour jitter
    with probability ``jitter_p`` (brightness, contrast, saturation factors ~ U[1 - a, 1 + a], hue
    shift ~ U[-hue, hue] of a turn), grayscale with probability ``gray_p``, Gaussian blur with
    probability ``blur_p`` (sigma ~ U(blur_sigma), a ``blur_kernel``-tap separable kernel).

    The defaults are UniMatch's (``dataset/semi.py``: ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8,
    RandomGrayscale p 0.2, blur p 0.5 with sigma ~ U(0.1, 2.0)). Differences from torchvision's PIL
    route: the jitter's four operations run in a fixed order (torchvision draws one), hue is a
    rotation in YIQ space (torchvision goes through HSV), and the blur kernel is truncated at
    ``blur_kernel`` taps (PIL's GaussianBlur approximates with box filters).
    """

    jitter_p: float = 0.8
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 13  # 2 * ceil(3 * 2.0) + 1: three sigmas either side at the largest sigma

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        params = draw_photometric(len(images), generator, images.device, jitter_p=self.jitter_p,
                                  brightness=self.brightness, contrast=self.contrast,
                                  saturation=self.saturation, hue=self.hue, gray_p=self.gray_p,
                                  blur_p=self.blur_p, blur_sigma=self.blur_sigma)
        return apply_photometric(images, params, kernel_size=self.blur_kernel)


def random_rescale_crop(images: torch.Tensor, scale_range: tuple[float, float], labels: torch.Tensor | None = None,
                        conf: torch.Tensor | None = None, ignore_index: int = 255):
    """One random rescale (``scale_range``) + crop + flip per image, on the device (one ``grid_sample``).
    Returns (images, labels, conf, valid): ``labels`` follow by nearest neighbour with padding ->
    ``ignore_index``, ``conf`` by nearest neighbour with padding -> 0 (each None if not given);
    ``valid`` [B, H, W] is False on padding (pixels from outside the input)."""
    theta = random_crop_theta(len(images), scale_range, images.device)
    out = warp(images, theta)
    valid = warp(torch.ones_like(images[:, :1]), theta, mode="nearest")[:, 0] > 0.5
    if labels is not None:
        labels = warp_labels(labels, theta, ignore_index)
    if conf is not None:
        conf = warp(conf[:, None], theta, mode="nearest")[:, 0] * valid
    return out, labels, conf, valid


# --- mixing ---------------------------------------------------------------------------------------


def cutmix_boxes(n: int, height: int, width: int, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """UniMatch's ``obtain_cutmix_box`` for a batch: bool [n, H, W], True inside each image's box.

    With probability ``p`` an image gets a box (else an empty mask). Its area is
    ~ U(area) x H x W, drawn once; then, until the box fits, a ratio r ~ U(aspect), width
    int(sqrt(area / r)), height int(sqrt(area x r)) and a top-left corner uniform over all pixels
    are drawn, and the box is kept when it lies inside the image (rejection, as the reference; here
    every image draws its rounds in parallel, 16 at a time).
    """
    dev = device
    has_box = torch.rand(n, generator=generator, device=dev) < p
    size = (area[0] + (area[1] - area[0]) * torch.rand(n, generator=generator, device=dev)) * height * width
    top = torch.zeros(n, dtype=torch.long, device=dev)
    left = torch.zeros_like(top)
    box_h = torch.zeros_like(top)
    box_w = torch.zeros_like(top)
    todo = has_box.clone()
    rounds = 16
    while bool(todo.any()):
        ratio = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(n, rounds, generator=generator, device=dev)
        w = torch.sqrt(size[:, None] / ratio).long()  # int() truncation, as the reference
        h = torch.sqrt(size[:, None] * ratio).long()
        x = torch.randint(0, width, (n, rounds), generator=generator, device=dev)
        y = torch.randint(0, height, (n, rounds), generator=generator, device=dev)
        fits = (x + w <= width) & (y + h <= height)
        first = fits.float().argmax(1)  # the first round that fits
        take = todo & fits.any(1)
        pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
        top = torch.where(take, pick(y), top)
        left = torch.where(take, pick(x), left)
        box_h = torch.where(take, pick(h), box_h)
        box_w = torch.where(take, pick(w), box_w)
        todo &= ~take
    rows = torch.arange(height, device=dev)[None, :, None]
    cols = torch.arange(width, device=dev)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    return inside & has_box[:, None, None]


def class_mix_masks(labels: torch.Tensor, num_classes: int, ignore_index: int,
                    generator: torch.Generator | None = None,
                    count: Literal["ceil_present", "floor_unique"] = "ceil_present") -> torch.Tensor:
    """ClassMix: per image, a random subset of the values in ``labels``; returns the bool [B, H, W]
    mask of the pixels of those values (kept; a method pastes the rest from another image).

    ``count="ceil_present"``: half of the classes present, rounded up; ignore pixels are never
    chosen. ``"floor_unique"``: len(unique values) // 2, the ignore value counted and chosen like a
    class (PRCL's reference ``generate_class_mask``, where padding carries the ignore label). Either
    rule draws one random key per image and value slot (``num_classes`` classes + the ignore value),
    [B, num_classes + 1] from the RNG."""
    if count not in ("ceil_present", "floor_unique"):
        raise ValueError(f"unknown ClassMix count {count!r}; valid: ceil_present, floor_unique")
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    slot = torch.where(flat != ignore_index, flat, num_classes)  # slot num_classes = the ignore value
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device).scatter_(1, slot, True)
    if count == "ceil_present":
        present[:, num_classes] = False
        n_chosen = (present.sum(1, keepdim=True) + 1) // 2
    else:
        n_chosen = present.sum(1, keepdim=True) // 2
    keys = torch.rand(b, num_classes + 1, generator=generator, device=labels.device).masked_fill(~present, 2.0)
    rank = keys.argsort(1).argsort(1)
    return (rank < n_chosen).gather(1, slot).view_as(labels)


def paste(mask: torch.Tensor, onto: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``source`` where ``mask`` [B, H, W] is True, ``onto`` elsewhere; for images [B, C, H, W] or
    maps [B, H, W] (labels, confidences, valid masks)."""
    m = mask[:, None] if onto.dim() == 4 else mask
    return torch.where(m, source, onto)


def next_in_batch(x: torch.Tensor) -> torch.Tensor:
    """Each image's partner: the next image of the batch (the last takes the first)."""
    return torch.roll(x, -1, dims=0)


def mixing_partner(weak: torch.Tensor, partner: Literal["same_image", "next_image"],
                   scale_range: tuple[float, float], valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images CutMix pastes from, and where they are valid (False on padding). ``valid``: where
    ``weak`` itself is valid (the loader's padding map; None: everywhere), carried to the partner.

    ``"same_image"``: another random rescale + crop + flip of each image (``random_rescale_crop``):
    UniMatch's two unlabeled loaders walk the same shuffled order, so its mixing image is the same
    raw image under another weak augmentation (LiheYoung/UniMatch issue #51). Here the second view
    is cut from the loader's crop, not from the raw image. ``"next_image"``: the next image of the
    batch, as it is (every pixel valid)."""
    if valid is None:
        valid = torch.ones_like(weak[:, 0], dtype=torch.bool)
    if partner == "same_image":
        images, _, inside, _ = random_rescale_crop(weak, scale_range, conf=valid.float())
        return images, inside > 0.5  # inside the warped crop and inside the loader's image
    if partner == "next_image":
        return next_in_batch(weak), next_in_batch(valid)
    raise ValueError(f"unknown mixing partner {partner!r}; valid: same_image, next_image")


# --- pseudo-labels and losses ---------------------------------------------------------------------


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, max softmax probability) over classes of logits [B, C, H, W], computed in float32."""
    conf, label = torch.softmax(logits.detach().float(), 1).max(1)
    return label, conf


def confident_cross_entropy(logits: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, threshold: float,
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the pixels with ``conf >= threshold`` that are ``valid``, summed and divided by
    the number of *valid* pixels, confident or not (UniMatch's and FixMatch's
    ``(loss * mask).sum() / (ignore_mask != 255).sum()``): as the teacher grows confident, the
    loss grows with the share of pixels it supervises. ``valid=None``: every pixel. With no valid
    pixel the loss is 0 with a graph (the reference divides by 0)."""
    if valid is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    keep = (conf >= threshold) & valid
    return (loss * keep).sum() / valid.sum().clamp(min=1)


def confident_ratio(conf: torch.Tensor, threshold: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Share of the valid pixels with ``conf >= threshold`` (the references' logged "mask ratio");
    return it as a named part of ``training_step`` so the engine logs it."""
    if valid is None:
        return (conf >= threshold).float().mean()
    return ((conf >= threshold) & valid).sum() / valid.sum().clamp(min=1)


def soft_consistency(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared distance between the student's and the teacher's class probabilities, summed
    over classes: [B, H, W] (Mean Teacher's consistency, French et al.'s ``'var'`` loss)."""
    delta = torch.softmax(student_logits.float(), 1) - teacher_probs.float()
    return (delta * delta).sum(1)

