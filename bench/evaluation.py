"""Evaluation: whole-image or sliding-window prediction, one bincount confusion matrix per image
(as torchvision's ``references/segmentation``), mIoU, and the scoring of pseudo-labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from bench import BenchError, distributed
from bench.data.folder import FolderSource
from bench.data.views import LabeledDataset
from bench.device import amp_context
from bench.method import Method
from bench.metrics import ConfusionMatrix, cluster_scores, scores
from bench.protocol import EvalSpec


@torch.no_grad()
def slide_logits(method: Method, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Sliding-window logits: average over overlapping crops; images smaller than the crop are padded."""
    b, _, h, w = images.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    x = F.pad(images, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    out, count = None, torch.zeros(1, 1, H, W, device=images.device)
    tops = sorted({min(t, H - crop) for t in range(0, H - crop + stride, stride)})
    lefts = sorted({min(l, W - crop) for l in range(0, W - crop + stride, stride)})
    for top in tops:
        for left in lefts:
            logits = method.predict(x[:, :, top:top + crop, left:left + crop]).float()
            if out is None:
                out = torch.zeros(b, logits.shape[1], H, W, device=images.device)
            out[:, :, top:top + crop, left:left + crop] += logits
            count[:, :, top:top + crop, left:left + crop] += 1
    return (out / count)[:, :, :h, :w]


def _collate_list(items):
    return items


@torch.no_grad()
def evaluate(method: Method, source: FolderSource, ids: list[str], spec: EvalSpec, device: torch.device,
             amp: bool = True, progress: bool = True, cpu_amp: bool = False) -> tuple[dict, torch.Tensor]:
    """Predict every evaluation image at its label's resolution and score the whole set at once.

    Returns the metrics and the per-image confusion matrices [N, C, K] (int32, in ``ids`` order),
    from which paired bootstrap comparisons over images are computed later. ``amp``, ``cpu_amp``: the
    protocol's ``train.amp`` and ``train.cpu_amp``, so a run predicts under the autocast it trained in.
    """
    method.eval()
    distributed.average_batchnorm_stats(method)
    dataset = LabeledDataset(source, ids, augment=None)
    # under torchrun each rank predicts every world-th image; the matrices are summed below
    mine = range(distributed.rank(), len(ids), distributed.world())
    loader = DataLoader(dataset, sampler=[(i, 0) for i in mine], batch_size=spec.batch_size,
                        collate_fn=_collate_list)
    cm = ConfusionMatrix(source.num_classes, method.num_outputs, source.ignore_index, device)
    per_image = torch.zeros(len(ids), source.num_classes, method.num_outputs, dtype=torch.int32)
    autocast, _ = amp_context(device, amp, cpu_amp)
    for items in tqdm(loader, desc=f"{method.name} eval", disable=not progress or not distributed.is_main(),
                      leave=False, dynamic_ncols=True):
        # images of one size are stacked into one forward pass; real datasets mix sizes
        by_size: dict[tuple, list] = {}
        for item in items:
            by_size.setdefault(tuple(item["image"].shape), []).append(item)
        for group in by_size.values():
            images = torch.stack([it["image"] for it in group]).to(device)
            with autocast:
                if spec.mode == "slide":
                    logits = slide_logits(method, images, spec.crop, spec.stride)
                else:
                    logits = method.predict(images)
            for it, pred in zip(group, logits.argmax(1)):
                per_image[it["index"]] = cm.update(it["mask"].to(device), pred).to("cpu", torch.int32)
    cm.all_reduce()
    per_image = distributed.all_reduce_sum(per_image.long()).to(torch.int32)  # each image on one rank only
    if method.output == "clusters":
        metrics = cluster_scores(cm.mat.cpu(), source.class_names)
    else:
        metrics = scores(cm.mat.cpu(), source.class_names)
        metrics["matching"] = "direct"
    metrics["n_images"] = len(ids)
    return metrics, per_image


@torch.no_grad()
def predict_classes(method: Method, images: torch.Tensor, spec: EvalSpec, device: torch.device,
                    amp: bool = True, cluster_to_class: list[int] | None = None,
                    ignore_index: int = 255, cpu_amp: bool = False) -> torch.Tensor:
    """Class index map [B, H, W] (int64, CPU) of a batch of normalised images, as ``evaluate``
    predicts them; cluster outputs go through the record's cluster -> class map (unmatched
    clusters -> ``ignore_index``)."""
    method.eval()
    autocast, _ = amp_context(device, amp, cpu_amp)
    with autocast:
        images = images.to(device)
        if spec.mode == "slide":
            logits = slide_logits(method, images, spec.crop, spec.stride)
        else:
            logits = method.predict(images)
    pred = logits.argmax(1).cpu()
    if cluster_to_class is not None:
        table = torch.as_tensor(cluster_to_class, dtype=torch.int64)
        pred = torch.where(table[pred] < 0, torch.full_like(pred, ignore_index), table[pred])
    return pred


@torch.no_grad()
def score_pseudo_labels(source: FolderSource, dataset, masks: torch.Tensor) -> dict:
    """Score a method's pseudo masks of its training images against the true masks (read here, by
    the harness, after training; the method never sees them). Two views: over the pixels the
    pseudo masks label (``labeled_pixels``), and over all pixels with unlabeled ones counted as
    misses (``all_pixels``); ``coverage`` = labeled share of the valid ground-truth pixels."""
    truth = LabeledDataset(source, dataset.ids, dataset.augment)
    if len(masks) != len(truth):
        raise BenchError(f"pseudo masks for {len(masks)} images, but the view has {len(truth)}")
    c, ignore = source.num_classes, source.ignore_index
    labeled = torch.zeros(c, c, dtype=torch.int64)
    missed = torch.zeros(c, dtype=torch.int64)  # valid ground-truth pixels the pseudo masks leave unlabeled
    for i in range(len(truth)):
        gt = truth[(i, 0)]["mask"].long().reshape(-1)
        pseudo = masks[i].long().reshape(-1)
        if gt.shape != pseudo.shape:
            raise BenchError(f"pseudo mask {i} has {pseudo.numel()} pixels, its image {gt.numel()}")
        valid = gt != ignore
        covered = valid & (pseudo != ignore)
        labeled += torch.bincount(gt[covered] * c + pseudo[covered], minlength=c * c).view(c, c)
        missed += torch.bincount(gt[valid & ~covered], minlength=c)
    total = labeled.sum() + missed.sum()
    return {"n_images": len(truth), "coverage": round(float(labeled.sum() / total.clamp(min=1) * 100), 4),
            "labeled_pixels": scores(labeled, source.class_names),
            "all_pixels": scores(labeled, source.class_names, unmatched=missed)}
