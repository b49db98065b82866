"""The kinds of supervision a method may declare in ``needs``: one table, read by everything else.

Each kind says which training images it covers, what the method may read of them (the view's
dataset: only the ``pixel_labels`` view can open a mask file), its batch size, its annotation cost
(a field of the protocol's ``annotation_cost_s``, seconds per image of the kind's images) and its
name in reports. The runner builds one loader per declared kind (``views``), the protocol reads
the cost fields and their defaults (``bench/protocol.py``), the leaderboard the labels and the costs.

A new kind (points, boxes, scribbles) is one ``Kind`` here plus the dataset class that gives
its batches (``bench/data/views.py``); a method declares it by name in ``needs``.

This module imports no torch: the protocol and the leaderboard read the table without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from bench import BenchError


def _labeled_dataset(source, ids, augment):
    from bench.data.views import LabeledDataset

    return LabeledDataset(source, ids, augment)


def _tagged_dataset(source, ids, augment):
    from bench.data.views import TaggedDataset

    # the tags are derived from the masks here, before the method exists; the dataset cannot open a mask
    return TaggedDataset(source, ids, augment, source.image_tags(ids))


def _image_dataset(source, ids, augment):
    from bench.data.views import ImageDataset

    return ImageDataset(source, ids, augment)


@dataclass(frozen=True)
class Kind:
    """One kind of supervision.

    ``name``: what a method writes in ``needs`` (also recorded in every result's ``supervision``).
    ``view``: the key of its batches in ``training_step``'s ``batch`` and of ``pseudo_labels()``.
    ``images``: which training ids it covers: the labeled ones, the others, or all.
    ``dataset(source, ids, augment)``: the view's dataset; it holds only what the method may read.
    ``batch_size``: the protocol's ``train`` field that sizes its batches.
    ``carries_labels``: its images come with a label of some kind (the leaderboard's labeled
    images/s); ``label``: its name in reports; ``cost_s``: the default of its
    ``annotation_cost_s.<name>`` (seconds of annotation per covered image; the three first kinds'
    from Bearman et al., ECCV 2016, on VOC).
    ``hashed_at_default``: its cost field was in the config hash of records made before this table
    existed; a kind added later (False) leaves the hash while its cost is at its default, so older
    records keep their hashes.
    """

    name: str
    view: str
    images: Literal["labeled", "unlabeled", "all"]
    dataset: Callable
    batch_size: Literal["batch_size", "unlabeled_batch_size"]
    carries_labels: bool
    label: str
    cost_s: float
    hashed_at_default: bool = False


# in the order the runner builds the views: the first one's loader drives the epochs
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("pixel_labels", "labeled", "labeled", _labeled_dataset, "batch_size", True, "pixel labels", 239.0,
         hashed_at_default=True),
    Kind("image_tags", "tagged", "all", _tagged_dataset, "batch_size", True, "image tags", 20.0,
         hashed_at_default=True),
    Kind("unlabeled_images", "unlabeled", "unlabeled", _image_dataset, "unlabeled_batch_size", False, "unlabeled",
         0.0, hashed_at_default=True),
)}

# a method that needs nothing gets every training image, images only, under this view name
UNSUPERVISED_VIEW = "images"
UNSUPERVISED_LABEL = "none"


def check_needs(method: str, needs) -> None:
    bad = set(needs) - set(KINDS)
    if bad:
        raise BenchError(f"method {method} declares unknown supervision {sorted(bad)}; valid: {sorted(KINDS)}")


def ordered(needs) -> list[str]:
    """``needs`` in table order; names the table does not know (an old record's) last, sorted."""
    return [k for k in KINDS if k in needs] + sorted(set(needs) - set(KINDS))


def kind_ids(kind: Kind, train_ids: list[str], labeled: list[str]) -> list[str]:
    if kind.images == "labeled":
        return list(labeled)
    if kind.images == "all":
        return list(train_ids)
    chosen = set(labeled)
    return [i for i in train_ids if i not in chosen]


def image_count(kind: Kind, n_train: int, n_labeled: int) -> int:
    """How many training images a kind covers, from a record's split counts."""
    return {"labeled": n_labeled, "all": n_train, "unlabeled": n_train - n_labeled}[kind.images]


def views(needs, method: str, source, train_ids: list[str], labeled: list[str], augment, train,
          protocol: str) -> dict[str, tuple]:
    """view name -> (dataset, batch size) for the kinds in ``needs``, and nothing more; ``train`` is
    the protocol's ``train`` section (batch sizes)."""
    out: dict[str, tuple] = {}
    for name in ordered(needs):
        kind = KINDS[name]
        ids = kind_ids(kind, train_ids, labeled)
        if not ids:
            raise BenchError(f"protocol {protocol} leaves no {kind.images} images; method {method} needs some")
        out[kind.view] = (kind.dataset(source, ids, augment), getattr(train, kind.batch_size))
    if not out:
        out[UNSUPERVISED_VIEW] = (_image_dataset(source, train_ids, augment), train.batch_size)
    return out


def batch_sizes(needs, train: dict) -> dict[str, int]:
    """view name -> batch size, from a recorded ``train`` section (a dict)."""
    sizes = {KINDS[n].view: train[KINDS[n].batch_size] for n in ordered(needs) if n in KINDS}
    return sizes or {UNSUPERVISED_VIEW: train["batch_size"]}


def labeled_views() -> tuple[str, ...]:
    """Views whose images carry labels (pixel masks, image tags); the others are unlabeled images."""
    return tuple(k.view for k in KINDS.values() if k.carries_labels)


def label(needs) -> str:
    """A combination of kinds in reports: "pixel labels + unlabeled", "none"."""
    names = ordered(needs)
    return " + ".join(KINDS[n].label if n in KINDS else n for n in names) or UNSUPERVISED_LABEL


def annotation_seconds(needs, cost: dict, n_train: int, n_labeled: int) -> float:
    """Annotation time of the training images a run used, by the protocol's cost model ``cost``
    (``annotation_cost_s``, seconds per image of each kind)."""
    return sum(image_count(KINDS[n], n_train, n_labeled) * cost[n] for n in ordered(needs) if n in KINDS)
