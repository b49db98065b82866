"""``meanteacher``: Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) for segmentation, as the
augmentation-consistency baseline of French et al. (BMVC 2020, "Semi-supervised semantic
segmentation needs strong, varied perturbations"; reference code ``Britefury/cutmix-semisup-seg``,
``train_seg_semisup_aug_mt.py``, ``optim_weight_ema.py``, ``run_pascal_aug_experiments.sh``).

The teacher is an exponential moving average of the student (every floating-point entry of the
state dict: parameters and BatchNorm statistics, decay 0.99 from the first step) and runs in train
mode. It sees the weak view of the unlabeled batch; the student sees a strong (colour) view.
Consistency = per pixel, the squared distance between the two class distributions summed over
classes, zero on the loader's padding, averaged over all pixels, times the share of pixels where the
teacher is >= 0.97 sure (``conf_per_pixel=true``: masked per pixel instead). ``targets=hard``:
confident cross-entropy on the teacher's argmax instead (the pseudo-label variant, divided by the
valid pixels as in ``bench.semi``).
Loss = CE(labeled) + ``unsup_weight`` x consistency; the teacher is evaluated.
"""
from __future__ import annotations

from typing import Literal

import torch

from bench.losses import masked_cross_entropy
from bench.method import Method, MethodConfig
from bench.registry import register_method
from bench.semi import EMATeacher, StrongAugment, confident_cross_entropy, confident_ratio, soft_consistency


class MeanTeacherConfig(MethodConfig):
    ema_decay: float = 0.99  # --teacher_alpha
    ema_schedule: Literal["constant", "ramp"] = "constant"  # ramp: min(1 - 1/(step + 1), ema_decay)
    targets: Literal["soft", "hard"] = "soft"  # --cons_loss_fn=var (soft); hard: confident CE on the argmax
    conf_threshold: float = 0.97  # --conf_thresh in the VOC runs
    conf_per_pixel: bool = False  # --conf_per_pixel (off: the loss is scaled by the confident share)
    unsup_weight: float = 0.003  # --cons_weight of the VOC augmentation-consistency runs
    eval_network: Literal["teacher", "student"] = "teacher"


@register_method
class MeanTeacher(Method):
    name = "meanteacher"
    needs = frozenset({"pixel_labels", "unlabeled_images"})
    output = "classes"
    Config = MeanTeacherConfig
    code_revision = 1  # 1: the loader's padding out of the consistency, as the reference's mask_tea_in_stu

    def __init__(self, cfg: MeanTeacherConfig, ctx):
        super().__init__(cfg, ctx)
        self.model = ctx.build_segmenter()
        self.teacher = EMATeacher(self.model, cfg.ema_decay, cfg.ema_schedule, buffers=True, mode="train")
        # French et al.'s --aug_strong_colour: ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2
        self.strong = StrongAugment(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, gray_p=0.2, blur_p=0.0)
        self.eval_network = "ema_teacher" if cfg.eval_network == "teacher" else "student"

    def training_step(self, batch, step, stage="train"):
        cfg = self.cfg
        images, masks = batch["labeled"]["image"], batch["labeled"]["mask"]
        weak = batch["unlabeled"]["image"]
        # the loader's zoom-out padding is out of the loss (the reference's mask_tea_in_stu), but still
        # counted in the mean over pixels and in the confident share, as the reference counts them
        valid = batch["unlabeled"]["valid"].float()
        with torch.no_grad():
            probs = torch.softmax(self.teacher(weak).float(), 1)
        conf, label = probs.max(1)
        # the student's supervised forward first, then the unsupervised one, as the reference
        sup = masked_cross_entropy(self.model(images), masks, self.ctx.ignore_index)
        student = self.model(self.strong(weak))
        if cfg.targets == "soft":
            confident = (conf >= cfg.conf_threshold).float()
            weight = (confident if cfg.conf_per_pixel else confident.mean()) * valid
            unsup = (soft_consistency(student, probs) * weight).mean()
        else:
            unsup = confident_cross_entropy(student, label, conf, cfg.conf_threshold, valid.bool())
        return {"loss": sup + cfg.unsup_weight * unsup, "sup": sup.detach(), "unsup": unsup.detach(),
                "confident": confident_ratio(conf, cfg.conf_threshold)}

    def on_step_end(self, step):
        self.teacher.update(self.model, step)

    @torch.no_grad()
    def predict(self, images):
        return (self.teacher if self.cfg.eval_network == "teacher" else self.model)(images)
