"""What a number means next to the evaluation masks alone: the majority-class prediction, and
whether a run's predictions collapsed onto one class.

Both work on a run's confusion matrix (``mat[t, p]`` over valid pixels, summed over the
evaluation images), so the leaderboard can apply them to older records from ``per_image.npz``.
"""
from __future__ import annotations

import numpy as np

# a run is "collapsed" when one class takes more than this share of its predicted pixels ...
COLLAPSE_SHARE = 95.0
# ... or when its mIoU is at most this many points above predicting the majority class everywhere
COLLAPSE_MARGIN = 1.0


def class_confusion(mat: np.ndarray, cluster_to_class: list[int] | None = None) -> np.ndarray:
    """[C, K] confusion -> [C, C + 1]: class columns, then the pixels of unmatched clusters."""
    mat = np.asarray(mat, dtype=np.int64)
    c, k = mat.shape
    if cluster_to_class is None:
        return np.concatenate([mat, np.zeros((c, 1), np.int64)], axis=1)
    onehot = np.zeros((k, c + 1), np.int64)
    onehot[np.arange(k), np.where(np.asarray(cluster_to_class) < 0, c, cluster_to_class)] = 1
    return mat @ onehot


def majority_baseline(mat: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Scores of predicting the evaluation set's most frequent class on every pixel (from the
    ground-truth counts only; same mIoU convention as ``bench.metrics``)."""
    gt = np.asarray(mat, dtype=np.int64).sum(1)
    total = int(gt.sum())
    major = int(gt.argmax())
    present = int((gt > 0).sum())
    share = gt[major] / max(total, 1)
    names = class_names or [str(i) for i in range(len(gt))]
    return {"class": names[major], "miou": float(share / max(present, 1) * 100), "pixel_acc": float(share * 100)}


def collapse_check(mat: np.ndarray, miou: float, cluster_to_class: list[int] | None = None) -> dict:
    """``collapsed``: one class on more than ``COLLAPSE_SHARE`` % of the predicted pixels, or an mIoU
    no more than ``COLLAPSE_MARGIN`` points above the majority-class prediction (within the margin,
    or below it)."""
    square = class_confusion(mat, cluster_to_class)
    predicted = square[:, :-1].sum(0)
    share = float(predicted.max() / max(square.sum(), 1) * 100)
    majority = majority_baseline(mat)["miou"]
    reasons = []
    if share > COLLAPSE_SHARE:
        reasons.append(f"one class on {share:.1f}% of pixels")
    if miou <= majority + COLLAPSE_MARGIN:
        reasons.append(f"mIoU {miou:.2f} not {COLLAPSE_MARGIN:g} point above the majority class ({majority:.2f})")
    return {"collapsed": bool(reasons), "top_class_share": round(share, 2), "majority_miou": round(majority, 4),
            "reasons": reasons}
