import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from bench.metrics import ConfusionMatrix, cluster_scores, hungarian_match, majority_match, scores


def test_confusion_matrix_counts_and_ignores():
    target = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    # rows = target, cols = prediction; the 255 pixel is not counted
    assert cm.mat.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_scores_hand_worked():
    # target 0: 4 px (3 right, 1 -> class 1); target 1: 2 px (both right); class 2 never occurs
    mat = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    s = scores(mat, ["a", "b", "c"])
    iou_a, iou_b = 3 / (4 + 3 - 3), 2 / (2 + 3 - 2)
    assert s["per_class_iou"]["a"] == pytest.approx(iou_a * 100, abs=1e-3)
    assert s["per_class_iou"]["b"] == pytest.approx(iou_b * 100, abs=1e-3)
    assert s["per_class_iou"]["c"] is None  # absent from target and prediction: not counted
    assert s["miou"] == pytest.approx((iou_a + iou_b) / 2 * 100)
    assert s["pixel_acc"] == pytest.approx(5 / 6 * 100)
    assert s["mean_class_acc"] == pytest.approx((3 / 4 + 2 / 2) / 2 * 100)


def test_class_only_in_prediction_counts_with_zero_iou():
    mat = torch.tensor([[2, 2], [0, 0]])
    s = scores(mat)
    assert s["per_class_iou"]["1"] == 0.0
    assert s["miou"] == pytest.approx(50 / 2)


def test_update_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(3).update(torch.tensor([5]), torch.tensor([0]))


def test_matches_torchmetrics_on_random_maps():
    g = torch.Generator().manual_seed(0)
    c = 5
    target = torch.randint(0, c, (4, 17, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=c - 1),
                       torch.randint(0, c, target.shape, generator=g))
    cm = ConfusionMatrix(c)
    for t, p in zip(target, pred):  # accumulated image by image, as in evaluation
        cm.update(t, p)
    ours = scores(cm.mat)
    jac = MulticlassJaccardIndex(c, average="none", ignore_index=255)(pred, target)
    assert [ours["per_class_iou"][str(i)] for i in range(c)] == pytest.approx((jac * 100).tolist(), abs=1e-3)
    assert ours["miou"] == pytest.approx(float(jac.mean()) * 100, abs=1e-3)
    acc = MulticlassAccuracy(c, average="micro", ignore_index=255)(pred, target)
    assert ours["pixel_acc"] == pytest.approx(float(acc) * 100, abs=1e-3)
    macc = MulticlassAccuracy(c, average="macro", ignore_index=255)(pred, target)
    assert ours["mean_class_acc"] == pytest.approx(float(macc) * 100, abs=1e-3)


def test_hungarian_recovers_a_permutation():
    mat = torch.tensor([[0, 9, 1], [8, 0, 0], [1, 0, 7]])  # cluster 1 -> class 0, 0 -> 1, 2 -> 2
    assert hungarian_match(mat).tolist() == [1, 0, 2]
    s = cluster_scores(mat)
    assert s["matching"] == "hungarian"
    assert s["pixel_acc"] == pytest.approx(24 / 26 * 100)


def test_cluster_scores_invariant_to_cluster_permutation():
    g = torch.Generator().manual_seed(1)
    mat = torch.randint(0, 50, (4, 4), generator=g)
    base = cluster_scores(mat)
    for _ in range(5):
        perm = torch.randperm(4, generator=g)
        permuted = cluster_scores(mat[:, perm])
        assert permuted["miou"] == pytest.approx(base["miou"])
        assert permuted["pixel_acc"] == pytest.approx(base["pixel_acc"])


def test_overclustering_reports_majority_separately():
    # 2 classes, 3 clusters: clusters 0 and 2 both belong to class 0
    mat = torch.tensor([[5, 0, 5], [0, 6, 0]])
    s = cluster_scores(mat)
    # one-to-one: one of the class-0 clusters is unmatched, its 5 pixels count as misses of class 0
    assert s["pixel_acc"] == pytest.approx(11 / 16 * 100)
    assert s["per_class_iou"]["0"] == pytest.approx(50.0)
    assert majority_match(mat).tolist() == [0, 1, 0]
    assert s["majority"]["pixel_acc"] == pytest.approx(100.0)
    assert s["num_clusters"] == 3


def test_fewer_clusters_than_classes():
    mat = torch.tensor([[5, 0], [0, 6], [3, 0]])
    s = cluster_scores(mat)
    assert s["per_class_iou"]["2"] == 0.0  # class 2 got no cluster
    assert np.isclose(s["pixel_acc"], 11 / 14 * 100)

