"""``fixmatch``: weak-to-strong consistency with one network (Sohn et al., NeurIPS 2020), as the
segmentation baseline of UniMatch (Yang et al., CVPR 2023; reference code ``LiheYoung/UniMatch``,
``fixmatch.py``, ``dataset/semi.py``, ``dataset/transform.py``, ``configs/pascal.yaml``).

Per step: the model's argmax on the weakly augmented unlabeled batch, where its confidence is
>= 0.95, supervises a strong view of the same batch (colour jitter, grayscale, blur, and CutMix
with a second view whose pseudo-labels the model makes in eval mode).
Loss = (CE(labeled) + confident CE(strong view)) / 2.
"""
from __future__ import annotations

from typing import Literal

import torch

from bench.losses import masked_cross_entropy
from bench.method import Method, MethodConfig
from bench.registry import register_method
from bench.semi import (StrongAugment, confident_cross_entropy, confident_ratio, cutmix_boxes, mixing_partner, paste,
                        pseudo_labels)


class FixMatchConfig(MethodConfig):
    conf_threshold: float = 0.95  # configs/pascal.yaml conf_thresh
    cutmix_p: float = 0.5  # obtain_cutmix_box(p=0.5)
    mix_partner: Literal["same_image", "next_image"] = "same_image"  # see bench.semi.mixing_partner


@register_method
class FixMatch(Method):
    name = "fixmatch"
    needs = frozenset({"pixel_labels", "unlabeled_images"})
    output = "classes"
    Config = FixMatchConfig

    def __init__(self, cfg: FixMatchConfig, ctx):
        super().__init__(cfg, ctx)
        self.model = ctx.build_segmenter()
        self.strong = StrongAugment()  # UniMatch's strong augmentation

    @torch.no_grad()
    def predict_in_eval_mode(self, images):
        """The reference pseudo-labels the mixing images with ``model.eval()`` (running BN statistics)."""
        self.model.eval()
        try:
            return pseudo_labels(self.model(images))
        finally:
            self.model.train(self.training)

    def mixed_views(self, weak, valid):
        """(strong view with a CutMix box from the mixing view, the box, the mixing view's pseudo-labels,
        confidences and valid mask)."""
        cfg = self.cfg
        mix, mix_valid = mixing_partner(weak, cfg.mix_partner, self.ctx.scale, valid)
        mix_label, mix_conf = self.predict_in_eval_mode(mix)
        box = cutmix_boxes(len(weak), *weak.shape[-2:], p=cfg.cutmix_p, device=weak.device)
        strong = paste(box, self.strong(weak), self.strong(mix))
        return strong, box, mix_label, mix_conf, mix_valid

    def training_step(self, batch, step, stage="train"):
        cfg, ignore = self.cfg, self.ctx.ignore_index
        images, masks = batch["labeled"]["image"], batch["labeled"]["mask"]
        weak = batch["unlabeled"]["image"]
        valid = batch["unlabeled"]["valid"]  # padding of the loader's zoom-out: out of the losses, as the reference
        strong, box, mix_label, mix_conf, mix_valid = self.mixed_views(weak, valid)

        pred_x, pred_w = self.model(torch.cat([images, weak])).split([len(images), len(weak)])
        pred_s = self.model(strong)
        label, conf = pseudo_labels(pred_w)

        sup = masked_cross_entropy(pred_x, masks, ignore)
        unsup = confident_cross_entropy(pred_s, paste(box, label, mix_label), paste(box, conf, mix_conf),
                                        cfg.conf_threshold, paste(box, valid, mix_valid))
        return {"loss": (sup + unsup) / 2, "sup": sup.detach(), "unsup": unsup.detach(),
                "confident": confident_ratio(conf, cfg.conf_threshold, valid)}

    @torch.no_grad()
    def predict(self, images):
        return self.model(images)
