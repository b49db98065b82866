"""The shared model factory: a timm backbone (``features_only``) under a DeepLabV3+ head.

Every method in a protocol builds its network here, so the backbone, output stride and head width
are the protocol's, never the method's.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import BenchError


def conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int]):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        # no BN after pooling: a 1x1 map with batch 1 would make BatchNorm fail in training
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


def create_backbone(name: str, output_stride: int = 16, pretrained: bool = False,
                    weights: str | None = None) -> nn.Module:
    try:
        kwargs = {} if output_stride == 32 else {"output_stride": output_stride}
        backbone = timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BenchError(f"unknown timm backbone {name!r} (see timm.list_models())") from None
        raise
    if weights:
        load_backbone_weights(backbone, weights)
    return backbone


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local state dict (a timm/torchvision classifier checkpoint or a features-only one).

    Classifier-only keys (``fc.``, ``head.``, ``classifier.``) are dropped; any other mismatch is
    an error naming the keys, so a wrong file never silently leaves the backbone random.
    """
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"weights file {p} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier."))}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise BenchError(f"weights file {p} does not fit the backbone: {str(exc).splitlines()[1:3]}") from None
    if missing or unexpected:
        raise BenchError(f"weights file {p} does not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")


class Segmenter(nn.Module):
    """Backbone + DeepLabV3+ decoder. ``features(x)`` gives the decoder's stride-4 map (for
    projection heads); ``classify`` turns it into logits; ``forward`` gives logits at input size."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", output_stride: int = 16,
                 head_channels: int = 256, pretrained: bool = False, weights: str | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, output_stride, pretrained, weights)
        reductions = self.backbone.feature_info.reduction()
        channels = self.backbone.feature_info.channels()
        # low-level skip = the first stride-4 map; high-level = the deepest map
        self.low_idx = next((i for i, r in enumerate(reductions) if r >= 4), 0)
        self.high_idx = len(reductions) - 1
        rates = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]
        self.aspp = ASPP(channels[self.high_idx], head_channels, rates)
        low_ch = max(8, head_channels * 48 // 256)  # DeepLabV3+ reduces the skip to 48 of 256
        self.low_proj = conv_bn_relu(channels[self.low_idx], low_ch, 1)
        self.fuse = nn.Sequential(conv_bn_relu(head_channels + low_ch, head_channels, 3),
                                  conv_bn_relu(head_channels, head_channels, 3))
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.feature_dim = head_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return self.decode(feats[self.low_idx], feats[self.high_idx])

    def decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The decoder on the backbone's stride-4 map ``low`` and deepest map ``high``."""
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, self.low_proj(low)], dim=1))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classify(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_perturbed(self, x: torch.Tensor, dropout: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``x`` and of a feature-perturbed copy, both at input size (UniMatch's ``need_fp``).

        The backbone runs once; the decoder runs on one batch holding the clean encoder maps and
        copies with channel dropout (``Dropout2d(dropout)``, active in train and eval mode alike, as
        the reference builds a fresh module), so the decoder's BatchNorm sees both halves together.
        """
        feats = self.backbone(x)
        low, high = feats[self.low_idx], feats[self.high_idx]
        low = torch.cat([low, F.dropout2d(low, dropout, training=True)])
        high = torch.cat([high, F.dropout2d(high, dropout, training=True)])
        logits = F.interpolate(self.classify(self.decode(low, high)), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return logits[:len(x)], logits[len(x):]

    def param_groups(self) -> list[dict]:
        """Backbone and head as separate groups, so a protocol or method can scale the head LR."""
        return backbone_head_groups(self)


def backbone_head_groups(module: nn.Module) -> list[dict]:
    """``module``'s trainable parameters as optimiser groups: those inside a sub-module named
    ``backbone`` ("backbone") and all others ("head", which the trainer gives the protocol's
    ``train.head_lr_mult``), in ``named_parameters`` order; an empty group is left out. Frozen
    parameters (an EMA teacher) stay out."""
    backbone, head = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (backbone if ".backbone." in f".{name}" else head).append(p)
    return [g for g in ({"params": backbone, "name": "backbone"}, {"params": head, "name": "head"}) if g["params"]]


class CAMClassifier(nn.Module):
    """Backbone + a 1x1 class layer on its deepest map + global average pooling: a multi-label
    image classifier whose class score maps (``score_maps``) are its CAMs, since pooling and the
    linear layer commute. No ASPP or decoder: ASPP's image-pooling branch hands every location a
    summary of the whole image, so a classifier on top of it need not localise anything."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", output_stride: int = 8,
                 pretrained: bool = False, weights: str | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, output_stride, pretrained, weights)
        self.classifier = nn.Conv2d(self.backbone.feature_info.channels()[-1], num_classes, 1, bias=False)

    def score_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_maps(x).mean((2, 3))


class FPN(nn.Module):
    """Backbone + a top-down feature pyramid merged at stride 4: ``dim`` channels (PiCIE's decoder).

    Every backbone level from stride 4 down gets a 1x1 lateral projection; from the deepest up,
    each is upsampled and added to the next (PiCIE's decoder ends there); ``smoothing=True`` adds
    a 3x3 conv on the stride-4 sum, as detection FPNs do.
    """

    def __init__(self, dim: int = 128, backbone: str = "resnet18", output_stride: int = 16,
                 pretrained: bool = False, weights: str | None = None, smoothing: bool = False):
        super().__init__()
        self.backbone = create_backbone(backbone, output_stride, pretrained, weights)
        reductions = self.backbone.feature_info.reduction()
        channels = self.backbone.feature_info.channels()
        self.levels = [i for i, r in enumerate(reductions) if r >= 4]
        self.lateral = nn.ModuleList(nn.Conv2d(channels[i], dim, 1) for i in self.levels)
        self.smooth = nn.Conv2d(dim, dim, 3, padding=1) if smoothing else nn.Identity()
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        out = self.lateral[-1](feats[self.levels[-1]])
        for lateral, i in zip(reversed(self.lateral[:-1]), reversed(self.levels[:-1])):
            f = feats[i]
            out = lateral(f) + F.interpolate(out, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return self.smooth(out)
