"""Confusion-matrix metrics (torchvision references style) and the cluster-matching path.

mIoU convention: the mean IoU over the classes that occur in the ground truth or in the
prediction of the evaluated set (union > 0); a class absent from both has IoU ``None`` and does
not count. Pixel accuracy and mean class accuracy ignore the ignore label; mean class accuracy
averages over classes present in the ground truth.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class ConfusionMatrix:
    """``mat[t, p]`` = number of valid pixels with target ``t`` and prediction ``p``.

    ``num_pred`` may exceed ``num_classes`` (K clusters x C classes for unsupervised methods).
    """

    def __init__(self, num_classes: int, num_pred: int | None = None, ignore_index: int = 255,
                 device: str | torch.device = "cpu"):
        self.num_classes, self.num_pred, self.ignore_index = num_classes, num_pred or num_classes, ignore_index
        self.mat = torch.zeros(num_classes, self.num_pred, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Add one image (or batch); returns its own matrix, for per-image statistics."""
        target, pred = target.reshape(-1), pred.reshape(-1).to(target.device)
        valid = target != self.ignore_index
        if (target[valid] >= self.num_classes).any() or (target[valid] < 0).any():
            raise ValueError(f"target holds labels outside 0..{self.num_classes - 1} (ignore {self.ignore_index})")
        idx = target[valid].long() * self.num_pred + pred[valid].long()
        mat = torch.bincount(idx, minlength=self.num_classes * self.num_pred).view_as(self.mat)
        self.mat += mat
        return mat

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)


def scores(mat: torch.Tensor | np.ndarray, class_names: list[str] | None = None,
           unmatched: torch.Tensor | None = None) -> dict:
    """Metrics (percent) from a square C x C confusion matrix.

    ``unmatched[t]`` counts pixels of class t predicted by no class at all (clusters left out of a
    one-to-one matching): false negatives of t, false positives of nothing.
    """
    m = torch.as_tensor(mat).double().cpu()
    tp = m.diag()
    gt, pr = m.sum(1), m.sum(0)
    if unmatched is not None:
        gt = gt + torch.as_tensor(unmatched).double().cpu()
    union = gt + pr - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = gt.sum()
    names = class_names or [str(i) for i in range(m.shape[0])]
    return {
        "miou": float(iou[present].mean() * 100) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / total * 100) if total > 0 else 0.0,
        "mean_class_acc": float((tp[gt > 0] / gt[gt > 0]).mean() * 100) if (gt > 0).any() else 0.0,
        "per_class_iou": {n: (round(float(v) * 100, 4) if p else None) for n, v, p in zip(names, iou, present)},
    }


def hungarian_match(mat: torch.Tensor | np.ndarray) -> np.ndarray:
    """One-to-one cluster -> class map maximising matched pixels, from a C x K matrix.

    Returns ``mapping`` of length K with the class of each cluster, -1 for clusters left unmatched
    (when K > C; when K < C some classes get no cluster).
    """
    m = np.asarray(torch.as_tensor(mat).cpu())
    rows, cols = linear_sum_assignment(m, maximize=True)
    mapping = np.full(m.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def majority_match(mat: torch.Tensor | np.ndarray) -> np.ndarray:
    """Many-to-one map for over-clustering: each cluster goes to its most frequent class."""
    return np.asarray(torch.as_tensor(mat).cpu()).argmax(0).astype(np.int64)


def remap(mat: torch.Tensor | np.ndarray, mapping: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """C x K cluster confusion + cluster->class map -> (C x C class confusion, unmatched pixels per class)."""
    m = torch.as_tensor(mat).cpu().to(torch.int64)
    c = m.shape[0]
    out = torch.zeros(c, c + 1, dtype=torch.int64)  # the extra column collects unmatched clusters
    out.index_add_(1, torch.as_tensor(np.where(mapping < 0, c, mapping)), m)
    return out[:, :c], out[:, c]


def cluster_scores(mat: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Hungarian-matched metrics over the whole set; with K > C also majority-matched ones, separately."""
    k = mat.shape[1]
    mapping = hungarian_match(mat)
    square, unmatched = remap(mat, mapping)
    result = scores(square, class_names, unmatched)
    result["matching"] = "hungarian"
    result["cluster_to_class"] = mapping.tolist()  # -1: unmatched cluster
    result["num_clusters"] = k
    if k > mat.shape[0]:
        result["majority"] = scores(remap(mat, majority_match(mat))[0], class_names)
    return result
