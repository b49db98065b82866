"""``unimatch``: unified dual-stream perturbations (Yang et al., CVPR 2023, "Revisiting Weak-to-Strong
Consistency in Semi-Supervised Semantic Segmentation"; reference code ``LiheYoung/UniMatch``,
``unimatch.py``, ``dataset/semi.py``, ``dataset/transform.py``, ``model/semseg/deeplabv3plus.py``,
``configs/pascal.yaml``).

FixMatch (``methods/fixmatch.py``) with two strong views of the unlabeled batch, each with its own
CutMix box, and a feature-perturbation branch: the weak batch's encoder maps with channel dropout
(0.5) through the decoder (``Segmenter.forward_perturbed``). Every branch learns from the weak
view's confident argmax. Loss = (l_x + 0.25 l_s1 + 0.25 l_s2 + 0.5 l_fp) / 2.
"""
from __future__ import annotations

import torch

from bench.losses import masked_cross_entropy
from bench.registry import register_method
from bench.semi import confident_cross_entropy, confident_ratio, cutmix_boxes, mixing_partner, paste, pseudo_labels
from methods.fixmatch import FixMatch, FixMatchConfig


class UniMatchConfig(FixMatchConfig):
    fp_dropout: float = 0.5  # deeplabv3plus.py: nn.Dropout2d(0.5) on both encoder maps


@register_method
class UniMatch(FixMatch):
    name = "unimatch"
    Config = UniMatchConfig

    def training_step(self, batch, step, stage="train"):
        cfg, ignore, thr = self.cfg, self.ctx.ignore_index, self.cfg.conf_threshold
        images, masks = batch["labeled"]["image"], batch["labeled"]["mask"]
        weak = batch["unlabeled"]["image"]
        n, h, w = weak.shape[0], *weak.shape[-2:]
        valid = batch["unlabeled"]["valid"]  # the loader's padding stays out of the losses
        mix, mix_valid = mixing_partner(weak, cfg.mix_partner, self.ctx.scale, valid)
        mix_label, mix_conf = self.predict_in_eval_mode(mix)
        # each strong view: its own photometric draws for the image and for its mixing partner
        box1 = cutmix_boxes(n, h, w, p=cfg.cutmix_p, device=weak.device)
        strong1 = paste(box1, self.strong(weak), self.strong(mix))
        box2 = cutmix_boxes(n, h, w, p=cfg.cutmix_p, device=weak.device)
        strong2 = paste(box2, self.strong(weak), self.strong(mix))

        # as the reference: the labeled batch goes through the perturbed decoder too (its BN sees it)
        logits, logits_fp = self.model.forward_perturbed(torch.cat([images, weak]), cfg.fp_dropout)
        pred_x, pred_w = logits.split([len(images), n])
        pred_fp = logits_fp[len(images):]
        pred_s1, pred_s2 = self.model(torch.cat([strong1, strong2])).chunk(2)
        label, conf = pseudo_labels(pred_w)

        sup = masked_cross_entropy(pred_x, masks, ignore)
        s1 = confident_cross_entropy(pred_s1, paste(box1, label, mix_label), paste(box1, conf, mix_conf), thr,
                                     paste(box1, valid, mix_valid))
        s2 = confident_cross_entropy(pred_s2, paste(box2, label, mix_label), paste(box2, conf, mix_conf), thr,
                                     paste(box2, valid, mix_valid))
        fp = confident_cross_entropy(pred_fp, label, conf, thr, valid)
        loss = (sup + 0.25 * s1 + 0.25 * s2 + 0.5 * fp) / 2
        return {"loss": loss, "sup": sup.detach(), "unsup": ((s1 + s2) / 2).detach(), "fp": fp.detach(),
                "confident": confident_ratio(conf, thr, valid)}
