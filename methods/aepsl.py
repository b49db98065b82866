"""``aepsl``: segmentation from image-level tags by adversarial erasing (AE) and prohibitive
segmentation learning (PSL), Wei et al., CVPR 2017. The method sees images and their tags only.

Stage ``erase1`` .. ``eraseT`` (mining): a multi-label classifier (the protocol's backbone at
output stride 8, a 1x1 class layer on its deepest map, global average pooling, sigmoid BCE on the
tags; no ASPP, whose image-pooling branch would let it classify without localising) is trained on
the training images with everything mined so far erased (set to the normalisation mean, i.e. 0).
Its CAMs are the class layer applied before pooling, ReLU'd and divided by their per-image max;
for each tagged class the pixels with CAM >= ``erase_threshold`` are that step's mined region.
Every step starts from a fresh classifier (the protocol's initialisation), so a step's loss says
whether what is left of the images can still be classified: when its final loss exceeds
``stop_loss_ratio`` x the first step's, the step's regions are dropped and erasing stops (the
paper's 4th step raised the loss and hurt); ``max_erase_steps`` caps it.

Stage ``pseudo``: pseudo mask per image at the crop resolution. A pixel mined for exactly one
class gets that class; mined for several -> 255. Unmined pixels: if the dataset has a background
class (``background_class``; "auto" = a class named "background"), pixels whose highest CAM over
every step and tagged class is below ``background_threshold`` become background (the low-CAM
stand-in for the paper's saliency model, which is not available offline); the rest -> 255.

Stage ``segment``: the protocol's segmenter plus an image-level branch (global average pooling of
the decoder features, linear). With PSL the online mask is argmax_c(p_seg(c|x) * w_c), where
w_c = sigmoid(branch logit c) for tagged classes, 0 for untagged ones (prohibited), 1 for the
background; loss = BCE(branch, tags) + CE(seg, pseudo) + CE(seg, online). Without PSL (``psl:
false``, the paper's "w/o PSL" row): loss = CE(seg, pseudo).

Views are made on the device: the loader gives whole images resized to the crop (mined regions
and pseudo masks live in that frame), then a random rescale/crop/flip per image. The classifier
only zooms out (scale <= 1) so the tags stay true of what it sees; the segmenter uses the
protocol's full range, as ``ce`` does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import BenchError, distributed
from bench.augment import random_crop_theta, warp, warp_labels
from bench.data.views import whole_set_loader
from bench.losses import masked_cross_entropy
from bench.method import Method, MethodConfig, Stage
from bench.registry import register_method


class AEPSLConfig(MethodConfig):
    erase_threshold: float = 0.5  # mined region of a class: CAM / max CAM >= this
    max_erase_steps: int = 4  # cap on erasing steps (the paper fused 3; its 4th raised the loss)
    erase_epochs: float = 5.0  # classifier training per erasing step, in epochs of the training set
    stop_loss_ratio: float = 2.0  # stop when a step's final BCE > this x the first step's
    background_class: Optional[str] = "auto"  # "auto": the class named "background" if any; None: no background
    background_threshold: float = 0.2  # unmined pixel with max CAM below this -> background
    psl: bool = True  # False: segmentation on the pseudo masks alone
    cls_weight: float = 1.0  # weight of the image-level BCE in the segmentation stage
    class_layer_lr_mult: float = 10.0  # new class layers (CAM layer, image-level branch) learn 10x faster,
    # as the classification layer (fc8) of the DeepLab Caffe models the paper builds on
    cam_output_stride: int = 8  # CAMs at 1/8 of the input
    batch_size_cam: int = 32  # images per forward pass while mining / making pseudo masks


# --- the method's pieces, as plain functions (unit-tested) ------------------------------------------

def class_activation_maps(score_maps: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] class score maps -> CAMs in [0, 1]: ReLU, divided by each map's max; untagged 0."""
    cam = score_maps.float().relu()
    peak = cam.flatten(2).amax(-1).clamp(min=1e-5)[..., None, None]
    return cam / peak * tags[:, :, None, None].to(cam)


def mined_regions(cams: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool [B, C, h, w]: where a tagged class's CAM reaches the threshold (CAMs are 0 for untagged)."""
    return cams >= threshold


def erase(images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Set the pixels of ``region`` (bool [B, h, w], e.g. on the CAM grid) to the mean (0 after
    normalisation). A coarser region is resized to the image by nearest neighbour, so exactly the
    image pixels under its cells are erased."""
    if region.shape[-2:] != images.shape[-2:]:
        region = F.interpolate(region[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0] > 0.5
    return images.masked_fill(region[:, None], 0.0)


def pseudo_masks(claims: torch.Tensor, cam_max: torch.Tensor | None, background: int | None,
                 background_threshold: float, ignore_index: int) -> torch.Tensor:
    """claims: bool [B, C, H, W] (pixel mined for class c). One claim -> that class; several -> ignore;
    none -> background where ``cam_max`` < threshold (if there is a background class), else ignore."""
    count = claims.sum(1)
    out = torch.full(count.shape, ignore_index, dtype=torch.long, device=claims.device)
    single = count == 1
    out[single] = claims.float().argmax(1)[single]
    if background is not None and cam_max is not None:
        out[(count == 0) & (cam_max < background_threshold)] = background
    return out


def online_mask(seg_logits: torch.Tensor, class_prob: torch.Tensor, tags: torch.Tensor,
                background: int | None) -> torch.Tensor:
    """PSL's online mask: argmax over classes of p_seg(c) * w_c, with w_c the image-level
    probability for tagged classes, 0 for untagged ones, 1 for the background class."""
    weights = class_prob.float() * tags.float()
    if background is not None:
        weights[:, background] = 1.0
    return (seg_logits.float().softmax(1) * weights[:, :, None, None]).argmax(1)


# --- the method ----------------------------------------------------------------------------------

@register_method
class AEPSL(Method):
    name = "aepsl"
    needs = frozenset({"image_tags"})
    output = "classes"
    Config = AEPSLConfig
    augment_in_loader = False  # mined regions and pseudo masks are kept in the whole-image frame
    eval_network = "segmenter"

    def __init__(self, cfg: AEPSLConfig, ctx):
        super().__init__(cfg, ctx)
        self.classifier = ctx.build_cam_classifier(cfg.cam_output_stride)
        # each erasing step starts from this (the protocol's init); rebuilt identically on resume
        self._classifier_init = {k: v.clone() for k, v in self.classifier.state_dict().items()}
        self.segmenter = ctx.build_segmenter()
        self.cls_branch = nn.Linear(self.segmenter.feature_dim, ctx.num_classes)
        self.background = self._background_index(cfg.background_class, ctx.class_names)
        # mining state (checkpointed): per image and class, the erasing step that first mined each
        # pixel (0 = never) at the CAM resolution; highest CAM seen; each step's final loss
        self.mined: torch.Tensor | None = None
        self.cam_max: torch.Tensor | None = None
        self.step_losses: list[float] = []
        self.stopped_at: int | None = None  # the step whose loss fired the stopping rule
        self.masks: torch.Tensor | None = None  # pseudo masks, uint8 [N, H, W]
        self._tail = [0.0, 0]  # sum and count of the current step's losses over its last tenth

    @staticmethod
    def _background_index(name: str | None, class_names: list[str]) -> int | None:
        if name is None:
            return None
        if name == "auto":
            return class_names.index("background") if "background" in class_names else None
        if name not in class_names:
            raise BenchError(f"aepsl.background_class {name!r} is not a class of this dataset; "
                             f"valid: {class_names} (or auto, or null)")
        return class_names.index(name)

    # stages -------------------------------------------------------------------------------------

    def erase_iterations(self) -> int:
        n = len(self.ctx.datasets["tagged"]) if self.ctx.datasets else self.ctx.batch_size
        return max(1, math.ceil(self.cfg.erase_epochs * n / self.ctx.batch_size))

    def stages(self):
        erase_steps = [Stage(f"erase{t}", self.erase_iterations()) for t in range(1, self.cfg.max_erase_steps + 1)]
        return erase_steps + [Stage("pseudo", 0), Stage("segment")]

    def skip_stage(self, stage):
        return stage.name.startswith("erase") and self.stopped_at is not None

    @property
    def steps_taken(self) -> int:
        """Erasing steps whose regions were kept."""
        return len(self.step_losses) - (self.stopped_at is not None)

    def param_groups(self, stage="train"):
        fast = {"name": "class_layer", "lr_mult": self.cfg.class_layer_lr_mult}
        if stage.startswith("erase"):
            return [{"params": list(self.classifier.backbone.parameters()), "name": "classifier_backbone"},
                    {"params": list(self.classifier.classifier.parameters()), **fast}]
        return self.segmenter.param_groups() + [{"params": list(self.cls_branch.parameters()), **fast}]

    def unused_parameters(self, stage="train"):
        # psl=false: the segmentation stage trains without the classification branch it optimises
        return stage == "segment" and not self.cfg.psl

    # mining -------------------------------------------------------------------------------------

    def _whole_set(self):
        return whole_set_loader(self.ctx.datasets["tagged"], self.cfg.batch_size_cam)

    def erased(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.mined is None:
            return images
        return erase(images, (self.mined[index.cpu()] > 0).any(1).to(images.device))

    @torch.no_grad()
    def mine(self, step: int) -> None:
        """CAMs of the step's classifier on the erased training images; keep the new regions."""
        was_training = self.training
        self.classifier.eval()
        for batch in self._whole_set():
            images, tags, index = batch["image"].to(self.ctx.device), batch["tags"].to(self.ctx.device), batch["index"]
            cams = class_activation_maps(self.classifier.score_maps(self.erased(images, index)), tags)
            if self.mined is None:
                n = len(self.ctx.datasets["tagged"])
                self.mined = torch.zeros(n, cams.shape[1], *cams.shape[-2:], dtype=torch.uint8)
                self.cam_max = torch.zeros(n, *cams.shape[-2:], dtype=torch.float16)
            new = mined_regions(cams, self.cfg.erase_threshold).cpu() & (self.mined[index] == 0)
            self.mined[index] = torch.where(new, torch.tensor(step, dtype=torch.uint8), self.mined[index])
            self.cam_max[index] = torch.maximum(self.cam_max[index], cams.amax(1).half().cpu())
        self.train(was_training)

    @torch.no_grad()
    def make_pseudo_masks(self) -> None:
        masks = []
        for batch in self._whole_set():
            index, size = batch["index"], batch["image"].shape[-2:]
            claims = F.interpolate((self.mined[index] > 0).float(), size=size, mode="bilinear",
                                   align_corners=False) >= 0.5
            cam_max = F.interpolate(self.cam_max[index][:, None].float(), size=size, mode="bilinear",
                                    align_corners=False)[:, 0]
            masks.append(pseudo_masks(claims, cam_max, self.background, self.cfg.background_threshold,
                                      self.ctx.ignore_index).to(torch.uint8))
        self.masks = torch.cat(masks)

    def on_stage_end(self, stage: str) -> None:
        if stage.startswith("erase"):
            step = int(stage.removeprefix("erase"))
            total, count = distributed.all_reduce_sum(torch.tensor(self._tail, dtype=torch.float64)).tolist()
            self.step_losses.append(total / max(count, 1))  # every rank's losses, so every rank decides alike
            self._tail = [0.0, 0]
            if step > 1 and self.step_losses[-1] > self.cfg.stop_loss_ratio * self.step_losses[0]:
                self.stopped_at = step  # what is left cannot be classified: its CAMs are not trusted
            else:
                self.mine(step)
            self.classifier.load_state_dict(self._classifier_init)  # the next step starts fresh
        elif stage == "pseudo":
            if self.mined is None:
                raise BenchError("aepsl: no mined regions (no erasing step ran)")
            self.make_pseudo_masks()

    # training -----------------------------------------------------------------------------------

    def training_step(self, batch, step, stage="train"):
        tagged = batch["tagged"]
        images, tags, index = tagged["image"], tagged["tags"].float(), tagged["index"]
        if stage.startswith("erase"):
            return self._classifier_step(images, tags, index, step)
        return self._segment_step(images, tags, index)

    def _classifier_step(self, images, tags, index, step):
        images = self.erased(images, index)
        lo = min(self.ctx.scale[0], 1.0)
        images = warp(images, random_crop_theta(len(images), (lo, 1.0), images.device))
        logits = self.classifier(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), tags)
        total = self.erase_iterations()
        if step >= total - max(1, round(total / 10)):  # the step's final loss: mean over its last tenth
            self._tail[0] += float(loss.detach())
            self._tail[1] += 1
        return {"loss": loss}

    def _segment_step(self, images, tags, index):
        ignore = self.ctx.ignore_index
        target = self.masks[index.cpu()].to(images.device).long()
        theta = random_crop_theta(len(images), self.ctx.scale, images.device)
        images, target = warp(images, theta), warp_labels(target, theta, ignore)
        feats = self.segmenter.features(images)
        seg = F.interpolate(self.segmenter.classify(feats), size=images.shape[-2:], mode="bilinear",
                            align_corners=False)
        pseudo_loss = masked_cross_entropy(seg, target, ignore)
        if not self.cfg.psl:
            return {"loss": pseudo_loss, "pseudo": pseudo_loss.detach()}
        class_logits = self.cls_branch(feats.mean((2, 3)))
        cls_loss = F.binary_cross_entropy_with_logits(class_logits.float(), tags)
        online = online_mask(seg.detach(), class_logits.detach().sigmoid(), tags, self.background)
        inside = warp_labels(torch.zeros_like(target), theta, ignore) != ignore  # not padding
        online_loss = masked_cross_entropy(seg, torch.where(inside, online, ignore), ignore)
        loss = self.cfg.cls_weight * cls_loss + pseudo_loss + online_loss
        return {"loss": loss, "cls": cls_loss.detach(), "pseudo": pseudo_loss.detach(), "online": online_loss.detach()}

    @torch.no_grad()
    def predict(self, images):
        return self.segmenter(images)

    # results and checkpointing ------------------------------------------------------------------

    def pseudo_labels(self):
        return None if self.masks is None else ("tagged", self.masks)

    def summary(self):
        return {"erasing_steps": self.steps_taken, "step_losses": [round(x, 5) for x in self.step_losses],
                "stopped_by_loss_at_step": self.stopped_at, "psl": self.cfg.psl,
                "background_rule": (f"unmined pixels with max CAM < {self.cfg.background_threshold} -> "
                                    f"{self.ctx.class_names[self.background]}") if self.background is not None
                else "no background class: unmined pixels ignored"}

    def get_extra_state(self):
        state = {"step_losses": torch.tensor(self.step_losses, dtype=torch.float64),
                 "stopped_at": torch.tensor(-1 if self.stopped_at is None else self.stopped_at),
                 "tail": torch.tensor(self._tail, dtype=torch.float64)}
        for key in ("mined", "cam_max", "masks"):
            if getattr(self, key) is not None:
                state[key] = getattr(self, key)
        return state

    def set_extra_state(self, state):
        self.step_losses = state["step_losses"].tolist()
        self.stopped_at = None if int(state["stopped_at"]) < 0 else int(state["stopped_at"])
        self._tail = state["tail"].tolist()
        self._tail[1] = int(self._tail[1])
        for key in ("mined", "cam_max", "masks"):
            setattr(self, key, state.get(key))
