"""Choosing which training ids carry pixel labels.

Procedure (seeded, documented, stable): sort the training ids; draw ``torch.randperm`` with a
``torch.Generator`` seeded by ``labelled.seed``; take the first ``n`` (``count``, or
``max(1, round(ratio * N))``); sort them. Or read a user's split file, one id per line.
The sorted list, one id per line with a final newline, is what the sha256 is taken of.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import BenchError
from bench.protocol import LabelledSpec
from bench.results import write_text_atomic


@dataclass
class LabelledSplit:
    ids: list[str]
    sha256: str
    source: str  # "seeded:<seed>" or "file:<path>"
    file_sha256: str | None = None  # of a user's split file, byte for byte

    def record(self, n_train: int) -> dict:
        out = {"labelled_sha256": self.sha256, "n_labelled": len(self.ids), "n_train": n_train, "source": self.source}
        if self.file_sha256:
            out["split_file_sha256"] = self.file_sha256
        return out


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256(("\n".join(ids) + "\n").encode()).hexdigest()


def select_labelled(train_ids: list[str], spec: LabelledSpec, pool: list[str] | None = None) -> LabelledSplit:
    """``pool``: the candidate ids (a split inside the training split), default all training ids."""
    if pool is not None:
        outside = sorted(set(pool) - set(train_ids))
        if outside:
            raise BenchError(f"labelled.pool {spec.pool!r} holds {len(outside)} ids outside the training split "
                             f"(first: {outside[0]!r})")
        train_ids = pool
    if spec.split_file:
        path = Path(spec.split_file)
        if not path.is_file():
            raise BenchError(f"split file {path} does not exist")
        known = set(train_ids)
        chosen = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            image_id = line.strip().split()[0] if line.strip() else ""
            if not image_id:
                continue
            image_id = Path(image_id).stem if "/" in image_id else image_id  # "JPEGImages/x.jpg ..." lists
            if image_id not in known:
                raise BenchError(f"split file {path} line {n}: id {image_id!r} is not in the training split"
                                 + (f" ({spec.pool})" if spec.pool else ""))
            chosen.append(image_id)
        chosen = sorted(set(chosen))
        if not chosen:
            raise BenchError(f"split file {path} lists no ids")
        return LabelledSplit(chosen, ids_sha256(chosen), f"file:{path}",
                             hashlib.sha256(path.read_bytes()).hexdigest())
    ordered = sorted(train_ids)
    n = spec.count if spec.count is not None else max(1, round(spec.ratio * len(ordered)))
    if n > len(ordered):
        raise BenchError(f"labelled.count={n} exceeds the {len(ordered)} training images")
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(spec.seed))[:n]
    chosen = sorted(ordered[i] for i in perm.tolist())
    return LabelledSplit(chosen, ids_sha256(chosen), f"seeded:{spec.seed}")


def write_split_file(directory: Path, split: LabelledSplit) -> Path:
    """The labelled ids actually used, named by their sha256 (shared by every run that used them)."""
    path = Path(directory) / f"labelled-{split.sha256[:16]}.txt"
    if not path.exists():
        write_text_atomic(path, "\n".join(split.ids) + "\n")
    return path
