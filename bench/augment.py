"""Batched augmentations on the device, with per-image parameters.

Methods that make their own views of a batch (prcl's strong view, picie's two views) use these
instead of per-image PIL transforms in the loader: one kernel call per batch, any device, and the
parameters are tensors that can be kept (picie applies the same geometry to a feature map).

Images here are ImageNet-normalised float tensors [B, 3, H, W] as the loaders give them;
photometric functions work in [0, 1] RGB and return normalised images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.data.views import MEAN, STD


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images * STD.to(images) + MEAN.to(images)


def from_unit(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN.to(images)) / STD.to(images)


# --- geometry -------------------------------------------------------------------------------------

def crop_theta(scale: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Affine matrices [B, 2, 3] (output -> input, normalised coordinates, ``align_corners=False``)
    for: rescale the image by ``scale``, take the window whose top-left corner is at (``top``,
    ``left``) in *fractions of the output size* in the rescaled image, flip it horizontally where
    ``flip``. The window may reach past the rescaled image (zoom-out): those pixels are padding.

    With a continuous coordinate y in [0, H) and u = 2y/H - 1, an output point u_o lies at
    y_s = top*H + (u_o + 1)H/2 in the rescaled image, i.e. at u_i = (u_o + 1)/s + 2*top/s - 1.
    """
    inv = 1.0 / scale
    sign = 1.0 - 2.0 * flip.to(scale.dtype)
    theta = torch.zeros(len(scale), 2, 3, dtype=scale.dtype, device=scale.device)
    theta[:, 0, 0] = inv * sign
    theta[:, 0, 2] = inv + 2 * left * inv - 1
    theta[:, 1, 1] = inv
    theta[:, 1, 2] = inv + 2 * top * inv - 1
    return theta


def random_crop_params(n: int, scale_range: tuple[float, float], flip: bool = True,
                       generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
    """Per image: scale ~ U(scale_range); window position uniform over the places a full window
    fits (at 0 where the rescaled image is smaller than the output: padded bottom/right, as a
    pad-then-crop loader does); flip with p 0.5."""
    lo, hi = scale_range
    u = torch.rand(n, 4, generator=generator, device=device)
    scale = lo + (hi - lo) * u[:, 0]
    room = (scale - 1).clamp(min=0)  # free space in units of the output size
    return {"scale": scale, "top": u[:, 1] * room, "left": u[:, 2] * room,
            "flip": (u[:, 3] < 0.5) if flip else torch.zeros(n, dtype=torch.bool, device=u.device)}


def random_crop_theta(n: int, scale_range: tuple[float, float], device=None) -> torch.Tensor:
    """``crop_theta`` of fresh ``random_crop_params``: a random rescale, crop and flip per image."""
    p = random_crop_params(n, scale_range, device=device)
    return crop_theta(p["scale"], p["top"], p["left"], p["flip"])


def warp(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None,
         mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` [B, C, H, W] through ``theta``; outside the input is 0."""
    size = size or tuple(x.shape[-2:])
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_labels(labels: torch.Tensor, theta: torch.Tensor, ignore_index: int,
                size: tuple[int, int] | None = None) -> torch.Tensor:
    """Nearest-neighbour warp of an integer map [B, H, W]; pixels from outside become ``ignore_index``."""
    x = torch.stack([labels.float(), torch.ones_like(labels, dtype=torch.float)], 1)
    out = warp(x, theta, size, mode="nearest")
    return torch.where(out[:, 1] > 0.5, out[:, 0].round().long(), torch.full_like(out[:, 0], ignore_index).long())


# --- photometry -----------------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def color_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-image brightness, contrast, saturation factors and hue shift (fraction of a turn), in
    that order, on [0, 1] RGB. Hue is a rotation of the chroma plane in YIQ space: linear, so it
    is one batched matmul (torchvision's HSV route takes one factor for the whole batch)."""
    x = images * brightness.view(-1, 1, 1, 1)
    x = x.clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast.view(-1, 1, 1, 1) + mean).clamp(0, 1)
    g = _gray(x)
    x = ((x - g) * saturation.view(-1, 1, 1, 1) + g).clamp(0, 1)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=x.dtype, device=x.device)
    angle = hue.to(x.dtype) * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(x), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [B, 3, 3]
    x = torch.einsum("bij,bjhw->bihw", m, x)
    return x.clamp(0, 1)


def grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Grayscale (3 equal channels) where ``apply`` [B] is true."""
    return torch.where(apply.view(-1, 1, 1, 1), _gray(images).expand_as(images), images)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-image Gaussian blur (separable, reflect padding); ``sigma`` [B] > 0."""
    b, c, h, w = images.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (t[None] / sigma.to(images.dtype)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def draw_photometric(n: int, generator: torch.Generator | None = None, device=None, *, jitter_p: float,
                     brightness: float, contrast: float, saturation: float, hue: float, gray_p: float,
                     blur_p: float, blur_sigma: tuple[float, float],
                     jitter_per_operation: bool = False) -> dict[str, torch.Tensor]:
    """Per-image photometric parameters: colour jitter (factors ~ U[1 - a, 1 + a], hue ~ U[-hue, hue])
    with p ``jitter_p`` for all four at once, or for each on its own (``jitter_per_operation``),
    grayscale with p ``gray_p``, blur (sigma ~ U(blur_sigma)) with p ``blur_p``."""
    u = torch.rand(n, 9, generator=generator, device=device)  # 9 columns: the draws of earlier runs
    if jitter_per_operation:  # column 0 for brightness, three more draws for the others
        on_u = torch.cat([u[:, :1], torch.rand(n, 3, generator=generator, device=device)], 1)
        on = [on_u[:, i] < jitter_p for i in range(4)]
    else:
        on = [u[:, 0] < jitter_p] * 4
    one = torch.ones(n, device=u.device)

    def factor(op, a):
        return torch.where(on[op], 1 - a + 2 * a * u[:, op + 1], one)

    return {"brightness": factor(0, brightness), "contrast": factor(1, contrast),
            "saturation": factor(2, saturation), "hue": torch.where(on[3], hue * (2 * u[:, 4] - 1), 0 * one),
            "gray": u[:, 5] < gray_p, "blur": u[:, 6] < blur_p,
            "sigma": blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[:, 7]}


def apply_photometric(images: torch.Tensor, params: dict[str, torch.Tensor], kernel_size: int) -> torch.Tensor:
    """Normalised images -> jittered, grayscaled, blurred normalised images (all really applied)."""
    p = {k: v.to(images.device) for k, v in params.items()}
    x = color_jitter(to_unit(images), p["brightness"], p["contrast"], p["saturation"], p["hue"])
    x = grayscale(x, p["gray"])
    x = torch.where(p["blur"].view(-1, 1, 1, 1), gaussian_blur(x, p["sigma"], kernel_size), x)
    return from_unit(x)
