"""Shared fixtures: a tiny synth protocol that trains in seconds on a CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(2)

TINY = {
    "name": "tiny",
    "description": "a few 32 px synth images, for tests",
    "dataset": {"name": "synth", "synth": {"seed": 3, "num_train": 16, "num_val": 4, "size": 32}},
    "labelled": {"ratio": 0.25, "seed": 0},
    "model": {"backbone": "resnet18", "output_stride": 16, "head_channels": 16},
    "train": {"crop": 32, "scale": [0.75, 1.25], "batch_size": 2, "unlabeled_batch_size": 2, "iterations": 8,
              "optimizer": {"name": "sgd", "lr": 0.01}, "checkpoint_every": 3},
    "eval": {"mode": "whole", "batch_size": 4},
}


def write_protocol(directory: Path, data: dict, name: str | None = None) -> Path:
    path = Path(directory) / f"{name or data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_protocol(tmp_path) -> Path:
    """Path of the tiny protocol file (pass it as --protocol)."""
    return write_protocol(tmp_path, TINY)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    """Per test: generated data is tiny, and a shared one would share checkpoints between tests."""
    return tmp_path / "cache"
