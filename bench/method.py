"""The method adapter interface. A method file subclasses ``Method``, decorates it with
``@register_method`` and holds only its own idea; the engine owns loops, optimiser, schedule,
AMP, checkpoints and evaluation.

The life of a method in a run (``bench/trainer.py``, ``bench/evaluation.py``):

1. ``Method(cfg, ctx)`` on the run's device, with the seed already set; ``cfg`` is the validated
   ``Config``, ``ctx`` the protocol's facts and the training datasets (``RunContext``); nothing
   is assigned onto the method from outside afterwards. Build networks with
   ``ctx.build_segmenter()`` (or ``build_fpn`` / ``build_cam_classifier``).
2. If a checkpoint exists, ``load_state_dict`` with the checkpointed state dict.
3. For each of ``stages()`` not done yet and not ``skip_stage``: ``on_stage_start(name)``; an
   optimiser over ``param_groups(name)``; ``method.train()``; every step
   ``training_step(batch, step, name)`` under autocast, backward, optimiser step, ``on_step_end(step)``; ``on_epoch_start`` when the primary loader starts
   an epoch; ``on_stage_end`` after the last step; a checkpoint every ``train.checkpoint_every``
   steps and at the end of each stage.
4. ``method.eval()`` and ``predict`` on every evaluation image; ``pseudo_labels()`` and
   ``summary()`` go into the record.

**Resume.** A checkpoint holds ``method.state_dict()``, the optimiser, the RNG states, the step and
the finished stages; a resumed run must end with the metrics of an uninterrupted one. So every
piece of state that outlives a step must be in the state dict: sub-modules (an EMA teacher) are
there already; tensors go in buffers (``self.register_buffer("queue", ...)``, kept at their shape);
anything else (a Python number, a list) through ``get_extra_state``/``set_extra_state``. Draw
random numbers from the global torch RNG (or a generator seeded from ``ctx.seed`` and the step),
never from an unseeded one, so that the restored RNG state draws the same.

**Several processes** (``torchrun``, ``bench/distributed.py``). Each rank gets its share of every
global batch; the engine calls the method (``forward`` is ``training_step``) inside
``DistributedDataParallel``, which averages the gradients of the stage's ``param_groups()``, and
averages BatchNorm statistics at checkpoints (or converts to SyncBatchNorm, ``train.sync_bn``). A
stage whose steps can leave some of its parameters without a gradient says so in
``unused_parameters(stage)``. State a method builds
from the batches (queues, prototypes, running counts, a stopping rule's losses) must be reduced so
every rank holds the same: ``distributed.all_reduce_sum`` (sums; e.g. prcl's global prototypes sum
precision-weighted means and precisions) and ``distributed.all_gather_cat`` (every rank's rows;
e.g. pixcontrast enqueues every rank's embeddings). Both are the identity in one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from bench.models import FPN, CAMClassifier, Segmenter, backbone_head_groups
from bench.protocol import ModelSpec

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
    """What a method may know about the run: the protocol's facts, never its data.

    ``num_classes``, ``class_names`` and ``ignore_index`` (the label of unlabeled pixels, 255) are
    the dataset's; ``device`` is where the batches arrive; ``model`` is the protocol's network spec
    (use the ``build_*`` factories, so every method of a protocol has the same backbone);
    ``iterations`` the protocol's training length; ``seed`` the run's seed; ``lr``, ``scale`` and
    ``batch_size`` the protocol's base learning rate, rescale range and labeled batch size;
    ``datasets`` the run's training datasets by view name (``bench/supervision.py``), for hooks that
    pass over the whole set (clustering, pseudo masks): they hold only what the method's ``needs``
    allow (empty where no training runs: ``bench eval`` / ``bench predict``).
    """

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
    datasets: dict = field(default_factory=dict)  # view name -> the view's training dataset

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
    """Base class of a method. Subclasses set ``name`` (the registry key), ``needs`` (names of kinds
    in ``bench.supervision.KINDS``: the runner builds only the loaders these allow, so a method never
    sees what it did not declare), ``output`` (``"classes"``: ``predict`` gives class logits; ``"clusters"``:
    cluster scores, Hungarian-matched at evaluation) and ``Config`` (a ``MethodConfig`` with the
    reference's defaults; fields are overridable as ``<name>.<field>=value`` and hashed into the
    run's identity), and implement ``training_step`` and ``predict``.

    ``batch`` in ``training_step`` maps a view name to a dict of tensors on the device, one view per
    declared need: ``"labeled"`` (``pixel_labels``): ``image`` float [B, 3, H, W] ImageNet-normalised,
    ``mask`` long [B, H, W] with ``ctx.ignore_index`` on unlabeled pixels and padding, ``index``
    long [B] (position in the view's dataset); ``"unlabeled"`` (``unlabeled_images``): ``image``,
    ``index`` and ``valid`` bool [B, H, W] (False on the loader's padding: leave it out of unsupervised
    losses, as UniMatch does); ``"tagged"`` (``image_tags``): ``image``, ``valid``, ``index``, ``tags``
    float [B, C] multi-hot; ``"images"`` (no needs): ``image``, ``valid`` and ``index``. With ``augment_in_loader`` the
    loaders have already rescaled, cropped (padding: image 0, mask ignore) and flipped each image.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    output: ClassVar[Literal["classes", "clusters"]] = "classes"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # which network ``predict`` uses (e.g. "student" or "ema_teacher"); recorded in every result so
    # that a table can say which network was scored. Set it in __init__ from the config when a
    # method can evaluate more than one (prcl, meanteacher: ``eval_network=teacher|student``).
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

    def on_stage_start(self, stage: str) -> None:
        """Before each stage's optimiser is built (also when a stage resumes from a checkpoint)."""

    def param_groups(self, stage: str = "train") -> list[dict[str, Any]]:
        """Optimiser parameter groups for ``stage`` (the name of one of ``stages()``); ``lr_mult``
        scales the protocol LR (and follows its poly schedule). A group named anything but
        ``backbone`` (or ``*_backbone``) also gets the protocol's ``train.head_lr_mult``.

        Default: every trainable parameter (a frozen EMA teacher stays out), those inside a module
        named ``backbone`` in a "backbone" group and the rest in a "head" group, so a method that
        keeps this default trains at the protocol's head LR as every other method does."""
        return backbone_head_groups(self)

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], step: int,
                      stage: str = "train") -> dict[str, torch.Tensor]:
        """One step of ``stage`` (``step`` counts from 0 within it; a single-stage method can ignore
        ``stage``). ``batch``: view name -> tensors (see the class docstring). Returns
        ``{"loss": scalar with a graph, <name>: detached scalar, ...}``; the named parts (loss terms,
        a confident-pixel ratio) are logged, and shown when the loss is not finite. The engine does backward and the optimiser step; runs under autocast on CUDA."""
        raise NotImplementedError

    def forward(self, batch: dict[str, dict[str, torch.Tensor]], step: int,
                stage: str = "train") -> dict[str, torch.Tensor]:
        """``training_step``: the engine calls the method itself, so that under torchrun
        ``DistributedDataParallel`` wraps it (every network pass of the step, one backward)."""
        return self.training_step(batch, step, stage)

    def unused_parameters(self, stage: str = "train") -> bool:
        """True when some steps of ``stage`` leave parameters of ``param_groups(stage)`` without a
        gradient (a loss term skipped during a warm-up, a branch that is switched off). Only
        matters under torchrun: DDP then finds them after each forward (at some cost) instead of
        failing at the next step. Frozen networks and other stages' networks do not
        count: only the stage's optimiser parameters are synchronised."""
        return False

    def on_step_end(self, step: int) -> None:
        """After the optimiser step of ``step``: EMA updates (``bench.semi.EMATeacher.update``), queues."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first step of each epoch of the first view's loader (e.g. redraw per-image views)."""

    def on_stage_end(self, stage: str) -> None:
        """Non-training work after a stage (e.g. pseudo masks); keep its results in the state dict."""

    def pseudo_labels(self) -> tuple[str, torch.Tensor] | None:
        """Masks the method made for its training images from weaker supervision, as (view name,
        uint8 [N, H, W] in that view's dataset order and frame, ``ignore_index`` where unlabeled).
        The harness scores them against the true masks after training: evaluation only."""
        return None

    def summary(self) -> dict[str, Any]:
        """Facts about the finished training worth a column (steps taken, switches); recorded."""
        return {}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, C or K, H, W] at the input resolution, from the network named by
        ``eval_network``; called after ``method.eval()``."""
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        """Channels of ``predict``'s output (K clusters for a clustering method)."""
        return self.ctx.num_classes
