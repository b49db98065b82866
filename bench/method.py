"""The method adapter interface. A method file subclasses ``Method``, decorates it with
``@register_method`` and holds only its own idea; the engine owns loops, optimiser, schedule,
AMP, checkpoints and evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from bench.models import FPN, CAMClassifier, Segmenter
from bench.protocol import ModelSpec

SUPERVISION = frozenset({"pixel_labels", "unlabeled_images", "image_tags"})


class MethodConfig(BaseModel):
    """Base for a method's hyper-parameters; subclasses list fields with the paper's defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass
class Stage:
    """One training stage. ``iterations=None`` means the protocol's ``train.iterations``."""

    name: str = "train"
    iterations: int | None = None


@dataclass
class RunContext:
    num_classes: int
    class_names: list[str]
    ignore_index: int
    device: torch.device
    model: ModelSpec
    iterations: int  # the protocol's training length, for schedules that depend on progress
    seed: int
    lr: float = 0.01  # the protocol's base learning rate, for a method that fixes one group's absolute LR
    scale: tuple[float, float] = (0.5, 2.0)  # the protocol's rescale range, for views a method makes itself
    batch_size: int = 8  # the protocol's batch size, for stages a method sizes in epochs

    def build_segmenter(self, num_classes: int | None = None) -> Segmenter:
        """The protocol's backbone + head; every method in a protocol builds its network here."""
        spec = self.model
        return Segmenter(num_classes or self.num_classes, spec.backbone, spec.output_stride,
                         spec.head_channels, spec.pretrained, spec.weights)

    def build_cam_classifier(self, output_stride: int = 8) -> CAMClassifier:
        """The protocol's backbone as a multi-label classifier with class activation maps; its own
        output stride (8: CAMs at 1/8 of the input, finer than the segmenter's 16)."""
        spec = self.model
        return CAMClassifier(self.num_classes, spec.backbone, output_stride, spec.pretrained, spec.weights)

    def build_fpn(self, dim: int, smoothing: bool = False) -> FPN:
        """The protocol's backbone under a feature pyramid decoder (stride 4, ``dim`` channels)."""
        spec = self.model
        return FPN(dim, spec.backbone, spec.output_stride, spec.pretrained, spec.weights, smoothing)


class Method(nn.Module):
    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    output: ClassVar[Literal["classes", "clusters"]] = "classes"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # which network ``predict`` uses (e.g. "student" or "ema_teacher"); recorded in every result
    eval_network: str = "model"
    # False: the loaders give whole images resized to the crop (no random scale/crop/flip), for
    # methods that draw and keep their own per-image views (picie)
    augment_in_loader: ClassVar[bool] = True
    # Bump when a change to the method's code alters the numbers an unchanged config produces (a
    # corrected loss, a fixed default). Every record stores it; records made at an older revision
    # keep their config hash, are never overwritten, and are marked stale by `bench run` and on the
    # leaderboard until they are deleted and re-run.
    code_revision: ClassVar[int] = 0

    def __init__(self, cfg: MethodConfig, ctx: RunContext):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.stage = "train"  # set by the engine before each stage
        # the training datasets by view name, set by the engine, for hooks that pass over the
        # whole set (clustering, pseudo masks); they hold only what the method's needs allow
        self.datasets: dict = {}

    @classmethod
    def revision(cls, cfg: MethodConfig) -> int:
        """The code revision behind results of this config; override when a change touched only
        some configurations (e.g. one mode of the method)."""
        return cls.code_revision

    def stages(self) -> list[Stage]:
        """``Stage(name, 0)`` is a stage with no training steps, only its ``on_stage_end`` work."""
        return [Stage("train")]

    def skip_stage(self, stage: Stage) -> bool:
        """Asked just before each stage runs (after the earlier ones): True leaves it out, e.g.
        erasing steps after a stopping rule fired. Decide from state kept in the state dict."""
        return False

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups for the current stage; ``lr_mult`` scales the protocol LR."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
        """``batch`` maps view name -> tensors. Returns a dict with ``"loss"`` and named parts to log."""
        raise NotImplementedError

    def on_step_end(self, step: int) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_stage_end(self, stage: str) -> None:
        """Non-training work after a stage (e.g. pseudo masks); keep its results in the state dict."""

    def pseudo_labels(self) -> tuple[str, torch.Tensor] | None:
        """Masks the method made for its training images from weaker supervision, as (view name,
        uint8 [N, H, W] in that view's dataset order and frame, ``ignore_index`` where unlabelled).
        The harness scores them against the true masks after training: evaluation only."""
        return None

    def summary(self) -> dict[str, Any]:
        """Facts about the finished training worth a column (steps taken, switches); recorded."""
        return {}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, C or K, H, W] at the input resolution."""
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        return self.ctx.num_classes
