"""Generic folder datasets: ``classes.txt``, ``images/<id>.<ext>``, ``masks/<id>.png``, ``splits/<split>.txt``.

The embedded ``synth`` dataset is written in this layout, so this reader is the one every run uses.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench import BenchError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def read_text_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a text file the harness reads (split lists, classes.txt) as
    (line number, stripped text); a missing, unreadable or non-UTF-8 file is an error naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise BenchError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BenchError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def check_split_name(split: str) -> None:
    """A split name becomes a file or folder name under the data root: it cannot be a path."""
    from bench.protocol import plain_name

    try:
        plain_name(split)
    except ValueError as exc:
        raise BenchError(f"split name {exc}") from None


def existing(path: Path, kind: str, image_id: str) -> Path:
    """``path`` if the file is there, else an error naming the id and the path it looked at."""
    if not path.exists():
        raise BenchError(f"{kind} for id {image_id!r} not found: {path}")
    return path


@dataclass
class FolderSource:
    """Where the images and masks of one dataset lie, and what the classes are."""

    root: Path
    class_names: list[str]
    ignore_index: int = 255
    # stored value -> class index (ignore for values that are not a class); None: stored = class index
    label_map: np.ndarray | None = field(default=None, repr=False)
    resize: int | None = None  # shorter side after loading (protocol dataset.resize); None = as stored
    _image_ext: dict[str, str] = field(default_factory=dict, repr=False)
    layout = "folder"  # the name protocols and `bench data check --dataset` use for this reader

    @classmethod
    def open(cls, root: str | Path) -> "FolderSource":
        root = Path(root)
        if not root.is_dir():
            raise BenchError(f"dataset folder {root} does not exist")
        for required in ("classes.txt", "images", "masks", "splits"):
            if not (root / required).exists():
                raise BenchError(f"dataset folder {root} is missing {required}")
        names: dict[int, str] = {}
        ignore = 255
        for n, line in read_text_lines(root / "classes.txt"):
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise BenchError(f"{root / 'classes.txt'} line {n}: expected '<index> <name>', got {line!r}")
            index = int(parts[0])
            if index in names:
                raise BenchError(f"{root / 'classes.txt'} line {n}: class index {index} is listed twice")
            if index == 255:
                ignore = 255
                continue
            names[index] = parts[1].strip()
        if sorted(names) != list(range(len(names))):
            raise BenchError(f"{root / 'classes.txt'}: class indices must be 0..N-1, got {sorted(names)}")
        return cls(root, [names[i] for i in range(len(names))], ignore)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def entry_id(self, stem: str) -> str:
        """The id of a split-list entry whose file name (without extension) is ``stem``."""
        return stem

    def split_ids(self, split: str) -> list[str]:
        check_split_name(split)
        path = self.root / "splits" / f"{split}.txt"
        if not path.exists():
            have = sorted(p.stem for p in (self.root / "splits").glob("*.txt"))
            raise BenchError(f"split {split!r} not found: {path} is missing (splits present: {', '.join(have)})")
        return self.read_id_list(path)

    def read_id_list(self, path: Path, first_field: bool = False) -> list[str]:
        """The ids a split list names, one per line (``first_field``: the first word of each line),
        each checked (``check_id``) and none listed twice."""
        first_line: dict[str, int] = {}
        for n, line in read_text_lines(path):
            image_id = line.split()[0] if first_field else line
            self.check_id(image_id, path, n)
            if image_id in first_line:
                raise BenchError(f"{path} line {n}: id {image_id!r} is listed twice (first on line "
                                 f"{first_line[image_id]})")
            first_line[image_id] = n
        return list(first_line)

    def check_id(self, image_id: str, listed_in: Path, line: int | None = None) -> None:
        """An id must name a file inside the root (no path separators, no '..') and be readable text."""
        where = f"{listed_in}" + (f" line {line}" if line else "")
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            raise BenchError(f"{where}: id {image_id!r} tries to leave the dataset folder")
        if not image_id.isprintable():
            raise BenchError(f"{where}: id {image_id!r} holds control characters")

    def image_path(self, image_id: str) -> Path:
        ext = self._image_ext.get(image_id)
        if ext is None:
            for ext in IMAGE_EXTENSIONS:
                if (self.root / "images" / f"{image_id}{ext}").exists():
                    break
            else:
                raise BenchError(f"image for id {image_id!r} not found in {self.root / 'images'}")
            self._image_ext[image_id] = ext
        return self.root / "images" / f"{image_id}{ext}"

    def mask_path(self, image_id: str) -> Path:
        return existing(self.root / "masks" / f"{image_id}.png", "mask", image_id)

    def _open(self, image_id: str, kind: str) -> Image.Image:
        """The stored image or mask as a PIL image (readers without files override this)."""
        return Image.open(self.image_path(image_id) if kind == "image" else self.mask_path(image_id))

    @contextmanager
    def _reading(self, image_id: str, kind: str):
        """The stored image or mask, open, for the ``with`` body to decode: any failure there or in
        opening (PIL raises several types for corrupt files) becomes one error naming the file.
        A ``BenchError`` (a missing file, a reader's own finding) already names it: passed through.
        The path is looked up only for the message: every mask a run loads passes through here."""
        try:
            with self._open(image_id, kind) as im:
                yield im
        except BenchError:
            raise
        except Exception as exc:
            path = self.image_path(image_id) if kind == "image" else self.mask_path(image_id)
            raise BenchError(f"cannot read {kind} {path}: {exc}") from None

    def load_image(self, image_id: str) -> torch.Tensor:
        """uint8 tensor [3, H, W]."""
        with self._reading(image_id, "image") as im:
            arr = np.asarray(im.convert("RGB"))
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        if self.resize:
            image = TF.resize(image, self._size(image.shape[-2:]), interpolation=v2.InterpolationMode.BILINEAR,
                              antialias=True)
        return image

    def check_image(self, image_id: str) -> tuple[int, int]:
        """Decode the stored image as ``load_image`` does, for ``bench data check``. A JPEG is decoded
        at 1/8 scale (``draft``): libjpeg still reads every entropy-coded block, so a truncated or
        corrupt file fails as it does at full size, for about half the decoding time and none
        of the full-size pixels. Returns its stored (height, width)."""
        with self._reading(image_id, "image") as im:
            width, height = im.size
            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # a no-op but for JPEG
            im.convert("RGB").load()
        return height, width

    def _size(self, hw) -> list[int]:
        h, w = hw
        s = self.resize / min(h, w)
        return [max(1, round(h * s)), max(1, round(w * s))]

    def load_mask(self, image_id: str) -> torch.Tensor:
        """int64 tensor [H, W] of class indices, ``ignore_index`` for unlabeled pixels; validated."""
        mask = torch.from_numpy(self.mask_labels(image_id).astype(np.int64))
        if self.resize:
            mask = TF.resize(mask[None], self._size(mask.shape), interpolation=v2.InterpolationMode.NEAREST)[0]
        return mask

    def mask_labels(self, image_id: str, image_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The stored mask as class indices at its stored size, validated (what ``load_mask`` resizes;
        all ``bench data check`` needs of a mask); ``image_hw``: the image's size where the caller
        has read it already (else read from the image's header)."""
        path = self.mask_path(image_id)
        with self._reading(image_id, "mask") as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise BenchError(
                    f"mask {path} is a {im.mode} image; expected a single-channel index mask "
                    f"(value = class index, {self.ignore_index} = ignore), not a colour mask")
            arr = np.asarray(im)
        if self.label_map is not None:
            if arr.size and (arr.max() >= len(self.label_map) or arr.min() < 0):
                raise BenchError(f"mask {path} has stored value {int(arr.max())} outside 0..{len(self.label_map) - 1}")
            arr = self.label_map[arr]
        # validated as stored, before any resize can hide a bad pixel or a size mismatch; this is
        # the one place every mask passes through (training, evaluation, tags, `bench data check`)
        self._check_labels(arr, path)
        self._check_size(image_id, arr.shape, image_hw)
        return arr

    def _check_labels(self, labels: np.ndarray, path) -> None:
        """Every label a class index or the ignore label; the message names the first bad pixel in
        raster order. Compared in the mask's own dtype: on an 8-bit mask about 15x cheaper than a
        bincount of its values, which widens every pixel to int64 first."""
        bad = ((labels < 0) | (labels >= self.num_classes)) & (labels != self.ignore_index)
        if bad.any():
            first = labels.ravel()[np.argmax(bad.ravel())]
            raise BenchError(
                f"mask {path} has label {int(first)} outside 0..{self.num_classes - 1} "
                f"(and not the ignore label {self.ignore_index})")

    def _check_size(self, image_id: str, mask_hw: tuple[int, int], image_hw: tuple[int, int] | None = None) -> None:
        image_hw = image_hw or self.image_size(image_id)
        if mask_hw != image_hw:
            raise BenchError(f"image {self.image_path(image_id)} is {image_hw} but its mask {self.mask_path(image_id)} "
                             f"is {mask_hw}")

    def check_sizes(self, ids: list[str]) -> None:
        """Image and mask sizes from the files' headers only (cheap): run before training, so a
        mismatch in the labeled or evaluation split stops a run before it trains, not after."""
        for image_id in ids:
            with self._reading(image_id, "mask") as im:
                width, height = im.size
            self._check_size(image_id, (height, width))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(height, width) of the stored image, from its header."""
        with self._reading(image_id, "image") as im:
            width, height = im.size
        return height, width

    def check(self, splits: list[str], progress: bool = True, workers: int = 1) -> dict[str, int]:
        """Open every image and mask of ``splits`` and validate the masks; the first missing or
        malformed file (in split and list order) raises an error naming it. ``workers`` > 1: that
        many processes decode and validate (a DataLoader's workers, results taken in order, so the
        error named is the one a single process names). Returns counts per split and in all."""
        counts: dict[str, int] = {}
        seen: set[str] = set()
        for split in splits:
            ids = self.split_ids(split)
            if not ids:
                raise BenchError(f"split {split!r} of {self.root} lists no ids")
            new = [i for i in dict.fromkeys(ids) if i not in seen]
            files = _CheckFiles(self, new)
            # batch_size=None: one chunk of ids per item; workers=1 reads in this process
            loader = DataLoader(files, batch_size=None, num_workers=workers if workers > 1 else 0)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(new), desc=f"checking {split}", unit="img", leave=False, dynamic_ncols=True)
            for i, error in enumerate(loader):
                if error is not None:
                    raise BenchError(error)
                if bar is not None:
                    bar.update(len(files.chunk(i)))
            if bar is not None:
                bar.close()
            seen.update(new)
            counts[split] = len(ids)
        counts["distinct images checked"] = len(seen)
        return counts

    def image_tags(self, ids: list[str]) -> torch.Tensor:
        """Multi-hot [N, C]: the classes present in each mask (ignore excluded)."""
        tags = torch.zeros(len(ids), self.num_classes)
        for row, image_id in enumerate(ids):
            mask = self.load_mask(image_id)
            present = mask[mask != self.ignore_index].unique()
            tags[row, present] = 1.0
        return tags


class _CheckFiles(Dataset):
    """``bench data check``'s work for one chunk of ids: each image and mask read and validated as a
    run reads them; the first error's message (in list order), or None. Chunks of 16 ids: a
    worker's round trip per id cost as much as a 500 x 375 mask's check."""

    CHUNK = 16

    def __init__(self, source: FolderSource, ids: list[str]):
        self.source, self.ids = source, ids

    def chunk(self, i: int) -> list[str]:
        return self.ids[i * self.CHUNK:(i + 1) * self.CHUNK]

    def __len__(self):
        return -(-len(self.ids) // self.CHUNK)

    def __getitem__(self, i):
        try:
            for image_id in self.chunk(i):
                image_hw = self.source.check_image(image_id)
                self.source.mask_labels(image_id, image_hw)  # validates the mask and its size against the image's
        except BenchError as exc:
            return str(exc)
        return None
