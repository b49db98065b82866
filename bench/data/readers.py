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
cocostuff27    images/<split>/<id>.jpg, annotations/<split>/<id>.png (stuffthingmaps: 0..181,   27
               255 unlabeled), annotations/instances_val2017.json + stuff_val2017.json
               (supercategories -> the 27 coarse classes), curated/<split>/
               Coco164kFull_Stuff_Coarse_7.txt for the ``curated_<split>`` lists of PiCIE
camvid         SegNet layout: <split>/<id>.png, <split>annot/<id>.png, split in           11 (11 = void)
               train/val/test; or the folder layout above with 11 classes (void = 255)
=============  ==========================================================================  ==========
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import BenchError
from bench.data.folder import FolderSource, check_split_name, existing

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
        check_split_name(split)
        path = self.split_list(split)
        if not path.exists():
            have = sorted(p.stem for p in path.parent.glob("*.txt"))
            raise BenchError(f"split {split!r} not found: {path} is missing (lists present: {', '.join(have)})")
        return self.read_id_list(path, first_field=True)

    def image_path(self, image_id: str) -> Path:
        return existing(self.root / "JPEGImages" / f"{image_id}.jpg", "image", image_id)

    def mask_path(self, image_id: str) -> Path:
        return existing(self.root / self.mask_dir / f"{image_id}.png", "mask", image_id)


@dataclass
class CamVidSource(FolderSource):
    """SegNet's CamVid: 11 classes stored 0..10, 11 = void (mapped to the ignore label)."""

    layout = "camvid"
    _split_of: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root) -> FolderSource:
        """The SegNet layout; or CamVid already converted to the generic folder layout (classes.txt
        naming its 11 classes, void stored as 255), read as a folder dataset, so the ``camvid_*``
        protocols run on either copy."""
        root = Path(root)
        if not (root / "trainannot").exists() and (root / "classes.txt").exists():
            source = FolderSource.open(root)
            if source.num_classes != len(CAMVID_CLASSES):
                raise BenchError(f"camvid dataset at {root}: classes.txt lists {source.num_classes} classes, "
                                 f"CamVid has {len(CAMVID_CLASSES)} ({', '.join(CAMVID_CLASSES)})")
            return source
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
        return existing(self.root / f"{self._split(image_id)}annot" / f"{image_id}.png", "mask", image_id)


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

    def entry_id(self, stem: str) -> str:
        return stem.removesuffix("_leftImg8bit")  # the official lists name the image files

    def split_ids(self, split: str) -> list[str]:
        check_split_name(split)
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
        return existing(self.root / "gtFine" / split / city / f"{image_id}_gtFine_labelIds.png", "mask", image_id)


@dataclass
class Cityscapes27Source(CityscapesSource):
    layout = "cityscapes27"

    @staticmethod
    def classes() -> tuple[list[str], np.ndarray]:
        return list(CITYSCAPES_27), _lookup({lid: lid - 7 for lid in range(7, 34)})


def coco_coarse_classes(categories: list[dict]) -> tuple[list[str], dict[int, int]]:
    """COCO categories (``id`` 1..182, ``name``, ``supercategory``; things are ids <= 91) -> the 27
    coarse classes of PiCIE/STEGO (``<supercategory>-things`` sorted, then ``-stuff`` sorted) and
    the map from the stuffthingmaps value (id - 1) to the coarse index."""
    def coarse(cat):
        return f"{cat['supercategory']}-{'things' if cat['id'] <= 91 else 'stuff'}"

    things = sorted({coarse(c) for c in categories if c["id"] <= 91})
    stuff = sorted({coarse(c) for c in categories if c["id"] > 91 and c["supercategory"] != "other"})
    names = things + stuff
    index = {n: i for i, n in enumerate(names)}
    return names, {c["id"] - 1: index[coarse(c)] for c in categories if coarse(c) in index}


@dataclass
class CocoStuff27Source(FolderSource):
    """COCO-Stuff 164k with the fine labels merged into the 27 coarse classes (unsupervised setting).
    The fine -> coarse map is read from COCO's own category lists (their supercategories), not
    typed in here; ``other`` (id 183) stays ignored."""

    layout = "cocostuff27"

    @classmethod
    def open(cls, root) -> "CocoStuff27Source":
        import json

        root = Path(root)
        files = ("annotations/instances_val2017.json", "annotations/stuff_val2017.json")
        _require(root, "images", "annotations", *files, layout="cocostuff27")
        categories = []
        for rel in files:
            try:
                categories += json.loads((root / rel).read_text())["categories"]
            except (ValueError, KeyError) as exc:
                raise BenchError(f"{root / rel}: cannot read its categories ({exc})") from None
        names, pairs = coco_coarse_classes(categories)
        if len(names) != 27:
            raise BenchError(f"{root}: COCO categories give {len(names)} coarse classes, expected 27")
        return cls(root, names, 255, label_map=_lookup(pairs))

    def split_ids(self, split: str) -> list[str]:
        check_split_name(split)
        if split.startswith("curated_"):
            base = split.removeprefix("curated_")
            path = self.root / "curated" / base / "Coco164kFull_Stuff_Coarse_7.txt"
            if not path.exists():
                raise BenchError(f"cocostuff27 split {split!r} needs {path}")
            ids = self.read_id_list(path)
        else:
            base, folder = split, self.root / "images" / split
            if not folder.is_dir():
                raise BenchError(f"cocostuff27 split {split!r} not found: {folder}")
            ids = sorted(p.stem for p in folder.glob("*.jpg"))
        self._split_of.update({i: base for i in ids})
        return ids

    _split_of: dict[str, str] = field(default_factory=dict, repr=False)

    def image_path(self, image_id: str) -> Path:
        split = self._split_of.get(image_id, "")
        return existing(self.root / "images" / split / f"{image_id}.jpg", "image", image_id)

    def mask_path(self, image_id: str) -> Path:
        split = self._split_of.get(image_id, "")
        return existing(self.root / "annotations" / split / f"{image_id}.png", "mask", image_id)


@dataclass
class HFSource(FolderSource):
    """A Hugging Face ``datasets`` dataset: a folder written by ``save_to_disk`` (``--data-root``) or
    a hub name (``dataset.hf.path``; needs the network the first time, then the local cache). The
    image and mask columns are named by config; ids are ``<split>-<row>``."""

    layout = "hf"
    image_column: str = "image"
    mask_column: str = "annotation"
    _data: object = field(default=None, repr=False)

    @classmethod
    def open(cls, root, spec=None) -> "HFSource":
        import datasets

        if spec is None or not spec.class_names:
            raise BenchError("an hf dataset needs dataset.hf.class_names (the mask values' class names, in order)")
        where = spec.path or root
        try:
            if root is not None and Path(root).is_dir() and (Path(root) / "dataset_dict.json").exists():
                data = datasets.load_from_disk(str(root))
            else:
                data = datasets.load_dataset(str(where), spec.config_name)
        except Exception as exc:  # the library raises many types (missing files, network, bad names)
            raise BenchError(f"cannot open Hugging Face dataset {where!r}: {exc}") from None
        for split in data:
            missing = {spec.image_column, spec.mask_column} - set(data[split].column_names)
            if missing:
                raise BenchError(f"Hugging Face dataset {where!r} split {split!r} has no column {sorted(missing)}; "
                                 f"columns: {data[split].column_names}")
        return cls(Path(str(where)), list(spec.class_names), spec.ignore_index, image_column=spec.image_column,
                   mask_column=spec.mask_column, _data=data)

    def split_ids(self, split: str) -> list[str]:
        if split not in self._data:
            raise BenchError(f"split {split!r} not in Hugging Face dataset {self.root} "
                             f"(splits: {', '.join(self._data)})")
        return [f"{split}-{i}" for i in range(len(self._data[split]))]

    def _row(self, image_id: str, column: str):
        split, _, row = image_id.rpartition("-")
        if split not in self._data or not row.isdigit() or int(row) >= len(self._data[split]):
            raise BenchError(f"no row {image_id!r} in Hugging Face dataset {self.root}")
        return self._data[split][int(row)][column]

    def image_path(self, image_id: str) -> str:  # for messages: rows have no files
        return f"{self.root}[{image_id}].{self.image_column}"

    def mask_path(self, image_id: str) -> str:
        return f"{self.root}[{image_id}].{self.mask_column}"

    def _open(self, image_id: str, kind: str):
        column = self.image_column if kind == "image" else self.mask_column
        value = self._row(image_id, column)
        if isinstance(value, dict) and value.get("bytes") is not None:  # Image feature, decode=False
            import io

            from PIL import Image

            value = Image.open(io.BytesIO(value["bytes"]))
        return value


LAYOUTS: dict[str, type[FolderSource]] = {
    cls.layout: cls for cls in (FolderSource, VOCSource, CityscapesSource, Cityscapes27Source, CocoStuff27Source,
                                CamVidSource, HFSource)}


def open_source(layout: str, root, hf=None) -> FolderSource:
    if layout not in LAYOUTS:
        raise BenchError(f"unknown dataset layout {layout!r}; valid: {', '.join(sorted(LAYOUTS))}")
    if layout == "hf":
        return HFSource.open(root, hf)
    if root is None:
        raise BenchError(f"a {layout} dataset needs its folder: pass --data-root PATH (or dataset.root=PATH)")
    return LAYOUTS[layout].open(root)
