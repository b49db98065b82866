"""The table of supervision kinds: a new kind is one entry, and the views, labels and costs follow."""
from types import SimpleNamespace

import pytest

from bench import BenchError, supervision
from bench.protocol import AnnotationCost
from bench.supervision import KINDS, Kind


def test_the_protocol_cost_model_has_one_field_per_kind():
    assert list(AnnotationCost.model_fields) == list(KINDS)
    assert AnnotationCost().model_dump() == {"pixel_labels": 239.0, "image_tags": 20.0, "unlabeled_images": 0.0}


def test_a_new_kind_is_one_entry(monkeypatch):
    """A made-up "points" kind (a few clicked pixels per labeled image): the runner's views, the
    report label and the annotation cost come from its entry alone."""
    points = Kind("points", "pointed", "labeled", lambda source, ids, augment: ("points dataset", ids),
                  "batch_size", True, "points", 22.0)
    monkeypatch.setitem(KINDS, "points", points)
    train = SimpleNamespace(batch_size=2, unlabeled_batch_size=3)
    ids, labeled = [f"im{i}" for i in range(6)], ["im1", "im4"]
    source = SimpleNamespace(load_image=None)
    built = supervision.views({"points", "unlabeled_images"}, "mine", source, ids, labeled, None, train, "p")
    assert list(built) == ["unlabeled", "pointed"]  # table order: the new kind comes last
    assert built["pointed"] == (("points dataset", labeled), 2)
    assert built["unlabeled"][0].ids == ["im0", "im2", "im3", "im5"] and built["unlabeled"][1] == 3
    assert supervision.label(["points", "unlabeled_images"]) == "unlabeled + points"
    cost = {"pixel_labels": 239.0, "image_tags": 20.0, "unlabeled_images": 0.0, "points": 22.0}
    assert supervision.annotation_seconds(["points"], cost, n_train=6, n_labeled=2) == 44.0
    assert "pointed" in supervision.labeled_views()
    supervision.check_needs("mine", {"points"})


def test_unknown_kind_and_an_empty_view_are_named():
    with pytest.raises(BenchError, match=r"method mine declares unknown supervision \['boxes'\]"):
        supervision.check_needs("mine", {"pixel_labels", "boxes"})
    train = SimpleNamespace(batch_size=2, unlabeled_batch_size=2)
    with pytest.raises(BenchError, match="protocol full leaves no unlabeled images; method semi needs some"):
        supervision.views({"unlabeled_images"}, "semi", object(), ["a", "b"], ["a", "b"], None, train, "full")


def test_labels_of_the_committed_kinds():
    assert supervision.label([]) == "none"
    assert supervision.label(["unlabeled_images", "pixel_labels"]) == "pixel labels + unlabeled"
    assert supervision.label(["image_tags"]) == "image tags"
    assert supervision.batch_sizes([], {"batch_size": 8}) == {"images": 8}
