"""Choosing which training ids carry pixel labels.

Procedure (seeded, documented, stable): sort the training ids; draw ``torch.randperm`` with a
``torch.Generator`` seeded by ``labeled.seed``; take the first ``n`` (``count``, or
``max(1, round(ratio * N))``); sort them. Or read a split file, one id (or one U2PL/UniMatch
``<image> <mask>`` line) per line: the field's official lists ship in ``protocols/splits``.
The sorted list, one id per line with a final newline, is what the sha256 is taken of.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from bench import BenchError
from bench.data.folder import read_text_lines
from bench.protocol import LabeledSpec
from bench.results import write_text_atomic


@dataclass
class LabeledSplit:
    ids: list[str]
    sha256: str
    source: str  # "seeded:<seed>" or "file:<path>"
    file_sha256: str | None = None  # of a user's split file, byte for byte

    def record(self, n_train: int) -> dict:
        out = {"labeled_sha256": self.sha256, "n_labeled": len(self.ids), "n_train": n_train, "source": self.source}
        if self.file_sha256:
            out["split_file_sha256"] = self.file_sha256
        return out


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256(("\n".join(ids) + "\n").encode()).hexdigest()


def split_file_sha256(spec: LabeledSpec) -> str | None:
    """The sha256 of the protocol's split file (None for a seeded draw), checked against the sha256
    the protocol pins: a missing or different list is an error naming the file, before any training."""
    path = spec.split_path()
    if path is None:
        return None
    if not path.is_file():
        raise BenchError(f"split file {path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if spec.split_sha256 is not None and digest != spec.split_sha256:
        raise BenchError(f"split file {path}: sha256 {digest[:16]}… differs from the {spec.split_sha256[:16]}… "
                         f"its protocol pins (labeled.split_sha256); the list was edited or replaced")
    return digest


def select_labeled(train_ids: list[str], spec: LabeledSpec, pool: list[str] | None = None,
                    entry_id=lambda stem: stem) -> LabeledSplit:
    """``pool``: the candidate ids (a split inside the training split), default all training ids.
    ``entry_id``: a dataset's id of a split-file entry's file stem (Cityscapes drops ``_leftImg8bit``)."""
    if pool is not None:
        outside = sorted(set(pool) - set(train_ids))
        if outside:
            raise BenchError(f"labeled.pool {spec.pool!r} holds {len(outside)} ids outside the training split "
                             f"(first: {outside[0]!r})")
        train_ids = pool
    if spec.split_file:
        path = spec.split_path()
        file_sha256 = split_file_sha256(spec)
        known = set(train_ids)
        first_line: dict[str, int] = {}
        for n, line in read_text_lines(path):
            image_id = entry_id(_list_entry_id(line.split()[0], path, n))
            if image_id not in known:
                raise BenchError(f"split file {path} line {n}: id {image_id!r} is not in the training split"
                                 + (f" ({spec.pool})" if spec.pool else ""))
            if image_id in first_line:
                raise BenchError(f"split file {path} line {n}: id {image_id!r} is listed twice (first on line "
                                 f"{first_line[image_id]})")
            first_line[image_id] = n
        chosen = sorted(first_line)
        if not chosen:
            raise BenchError(f"split file {path} lists no ids")
        return LabeledSplit(chosen, ids_sha256(chosen), f"file:{spec.split_file}", file_sha256)
    ordered = sorted(train_ids)
    n = spec.count if spec.count is not None else max(1, round(spec.ratio * len(ordered)))
    if n > len(ordered):
        raise BenchError(f"labeled.count={n} exceeds the {len(ordered)} training images")
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(spec.seed))[:n]
    chosen = sorted(ordered[i] for i in perm.tolist())
    return LabeledSplit(chosen, ids_sha256(chosen), f"seeded:{spec.seed}")


def _list_entry_id(entry: str, path: Path, line: int) -> str:
    """The id of a split-file entry: a bare id, or a path inside the data root as the U2PL/UniMatch
    lists write them (``JPEGImages/x.jpg``: id ``x``). A path that is absolute or climbs out with
    ``..`` is an error, not quietly cut down to its file name."""
    if not entry.isprintable():
        raise BenchError(f"split file {path} line {line}: id {entry!r} holds control characters")
    if "/" not in entry and "\\" not in entry:
        if entry in (".", ".."):
            raise BenchError(f"split file {path} line {line}: id {entry!r} tries to leave the data root")
        return entry
    parts = PurePosixPath(entry.replace("\\", "/"))
    if parts.is_absolute() or any(p in ("..", ".", "") for p in entry.replace("\\", "/").split("/")):
        raise BenchError(f"split file {path} line {line}: {entry!r} tries to leave the data root")
    return parts.stem


def write_split_file(directory: Path, split: LabeledSplit) -> Path:
    """The labeled ids actually used, named by their sha256 (shared by every run that used them).
    A file of the same ids written under the old spelling (``labelled-``) is used as it is."""
    legacy = Path(directory) / f"labelled-{split.sha256[:16]}.txt"
    if legacy.exists():
        return legacy
    path = Path(directory) / f"labeled-{split.sha256[:16]}.txt"
    if not path.exists():
        write_text_atomic(path, "\n".join(split.ids) + "\n")
    return path
