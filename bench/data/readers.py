"""Readers for the standard datasets, in the layouts their distributions unpack to.

Each is a ``FolderSource`` with its own paths, split lists and label mapping, so the loaders,
mask validation, tags and ``check`` are shared. ``open_source(layout, root)`` picks one by the
name protocols use (``dataset.name``) and ``bench data check --dataset``.

=============  ==========================================================================  ==========
layout         files                                                                        classes
=============  ==========================================================================  ==========
folder         classes.txt, images/<id>.*, masks/<id>.png, splits/<split>.txt              classes.txt
voc            JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (SBD, preferred) or      21
               SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val,train_aug}.txt
cityscapes     leftImg8bit/<split>/<city>/<id>_leftImg8bit.png,                            19 train ids
               gtFine/<split>/<city>/<id>_gtFine_labelIds.png
cityscapes27   the same files, label ids 7..33 as 27 classes (the unsupervised setting)   27
camvid         SegNet layout: <split>/<id>.png, <split>annot/<id>.png, split in           11 (11 = void)
               train/val/test
=============  ==========================================================================  ==========
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import BenchError
from bench.data.folder import FolderSource

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
                  "bicyclist"]
# Cityscapes label ids (gtFine *_labelIds.png) of the 19 evaluated classes, in train-id order
CITYSCAPES_TRAIN_IDS = {7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole",
                        19: "traffic light", 20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky",
                        24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train", 32: "motorcycle",
                        33: "bicycle"}
# label ids 7..33: the 27 classes of the unsupervised Cityscapes setting (PiCIE, STEGO)
CITYSCAPES_27 = ["road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
                 "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
                 "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]


def _lookup(pairs: dict[int, int], size: int = 256, ignore: int = 255) -> np.ndarray:
    table = np.full(size, ignore, dtype=np.int64)
    for stored, index in pairs.items():
        table[stored] = index
    return table


def _require(root: Path, *relative: str, layout: str) -> None:
    if not root.is_dir():
        raise BenchError(f"dataset folder {root} does not exist")
    for rel in relative:
        if not (root / rel).exists():
            raise BenchError(f"{layout} dataset at {root} is missing {rel}")


@dataclass
class VOCSource(FolderSource):
    layout = "voc"
    mask_dir: str = "SegmentationClassAug"

    @classmethod
    def open(cls, root) -> "VOCSource":
        root = Path(root)
        _require(root, "JPEGImages", "ImageSets/Segmentation", layout="voc")
        mask_dir = next((d for d in ("SegmentationClassAug", "SegmentationClass") if (root / d).is_dir()), None)
        if mask_dir is None:
            raise BenchError(f"voc dataset at {root} has neither SegmentationClassAug (SBD) nor SegmentationClass")
        return cls(root, list(VOC_CLASSES), 255, mask_dir=mask_dir)

    def split_list(self, split: str) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def split_ids(self, split: str) -> list[str]:
        path = self.split_list(split)
        if not path.exists():
            have = sorted(p.stem for p in path.parent.glob("*.txt"))
            raise BenchError(f"split {split!r} not found: {path} is missing (lists present: {', '.join(have)})")
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        for image_id in ids:
            self.check_id(image_id, path)
        return ids

    def image_path(self, image_id: str) -> Path:
        path = self.root / "JPEGImages" / f"{image_id}.jpg"
        if not path.exists():
            raise BenchError(f"image for id {image_id!r} not found: {path}")
        return path

    def mask_path(self, image_id: str) -> Path:
        path = self.root / self.mask_dir / f"{image_id}.png"
        if not path.exists():
            raise BenchError(f"mask for id {image_id!r} not found: {path}")
        return path


@dataclass
class CamVidSource(FolderSource):
    """SegNet's CamVid: 11 classes stored 0..10, 11 = void (mapped to the ignore label)."""

    layout = "camvid"
    _split_of: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root) -> "CamVidSource":
        root = Path(root)
        _require(root, "train", "trainannot", layout="camvid")
        return cls(root, list(CAMVID_CLASSES), 255, label_map=_lookup({i: i for i in range(11)}))

    def split_ids(self, split: str) -> list[str]:
        folder = self.root / split
        if split not in ("train", "val", "test") or not folder.is_dir():
            have = [s for s in ("train", "val", "test") if (self.root / s).is_dir()]
            raise BenchError(f"camvid split {split!r} not found at {folder} (splits present: {', '.join(have)})")
        ids = sorted(p.stem for p in folder.glob("*.png"))
        for image_id in ids:
            self._split_of[image_id] = split
        return ids

    def _split(self, image_id: str) -> str:
        if image_id not in self._split_of:
            for split in ("train", "val", "test"):
                if (self.root / split / f"{image_id}.png").exists():
                    self._split_of[image_id] = split
                    break
            else:
                raise BenchError(f"camvid image {image_id!r} is in none of {self.root}/train, val, test")
        return self._split_of[image_id]

    def image_path(self, image_id: str) -> Path:
        return self.root / self._split(image_id) / f"{image_id}.png"

    def mask_path(self, image_id: str) -> Path:
        path = self.root / f"{self._split(image_id)}annot" / f"{image_id}.png"
        if not path.exists():
            raise BenchError(f"mask for id {image_id!r} not found: {path}")
        return path


@dataclass
class CityscapesSource(FolderSource):
    """gtFine label ids mapped to the 19 train ids (others ignored); ids are the file stems
    (``<city>_<seq>_<frame>``), whose first part names the city folder."""

    layout = "cityscapes"
    _split_of: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root) -> "CityscapesSource":
        root = Path(root)
        _require(root, "leftImg8bit", "gtFine", layout=cls.layout)
        names, table = cls.classes()
        return cls(root, names, 255, label_map=table)

    @staticmethod
    def classes() -> tuple[list[str], np.ndarray]:
        return list(CITYSCAPES_TRAIN_IDS.values()), _lookup({lid: i for i, lid in enumerate(CITYSCAPES_TRAIN_IDS)})

    def split_ids(self, split: str) -> list[str]:
        folder = self.root / "leftImg8bit" / split
        if not folder.is_dir():
            have = sorted(p.name for p in (self.root / "leftImg8bit").iterdir() if p.is_dir())
            raise BenchError(f"cityscapes split {split!r} not found: {folder} (splits present: {', '.join(have)})")
        ids = sorted(p.name.removesuffix("_leftImg8bit.png") for p in folder.glob("*/*_leftImg8bit.png"))
        for image_id in ids:
            self._split_of[image_id] = split
        return ids

    def _where(self, image_id: str) -> tuple[str, str]:
        split = self._split_of.get(image_id)
        if split is None:
            raise BenchError(f"cityscapes id {image_id!r} is not in any split listed so far")
        return split, image_id.split("_")[0]

    def image_path(self, image_id: str) -> Path:
        split, city = self._where(image_id)
        return self.root / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png"

    def mask_path(self, image_id: str) -> Path:
        split, city = self._where(image_id)
        path = self.root / "gtFine" / split / city / f"{image_id}_gtFine_labelIds.png"
        if not path.exists():
            raise BenchError(f"mask for id {image_id!r} not found: {path}")
        return path


@dataclass
class Cityscapes27Source(CityscapesSource):
    layout = "cityscapes27"

    @staticmethod
    def classes() -> tuple[list[str], np.ndarray]:
        return list(CITYSCAPES_27), _lookup({lid: lid - 7 for lid in range(7, 34)})


LAYOUTS: dict[str, type[FolderSource]] = {cls.layout: cls for cls in
                                          (FolderSource, VOCSource, CityscapesSource, Cityscapes27Source, CamVidSource)}


def open_source(layout: str, root) -> FolderSource:
    if layout not in LAYOUTS:
        raise BenchError(f"unknown dataset layout {layout!r}; valid: {', '.join(sorted(LAYOUTS))}")
    if root is None:
        raise BenchError(f"a {layout} dataset needs its folder: pass --data-root PATH (or dataset.root=PATH)")
    return LAYOUTS[layout].open(root)
