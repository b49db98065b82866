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
    "labeled": {"ratio": 0.25, "seed": 0},
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


def interrupt_and_resume(run, method_cls, tmp_path: Path, monkeypatch, kill_step: int = 4):
    """``run(results_dir, cache_dir)`` interrupted at the end of step ``kill_step`` (after the
    method's own ``on_step_end``): it must exit 130; then the same run again, which must resume and
    finish. Returns (the checkpoint state the interrupted run left, the resumed run's record)."""
    import json

    from bench.checkpoint import load_checkpoint

    original = method_cls.on_step_end

    def interrupt(self, step):
        original(self, step)
        if step == kill_step:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(method_cls, "on_step_end", interrupt)
        assert run(tmp_path / "r", tmp_path / "c") == 130
    [ckpt] = (tmp_path / "c").rglob("*.pt")
    state = load_checkpoint(ckpt)
    assert run(tmp_path / "r", tmp_path / "c") == 0
    [resumed] = (tmp_path / "r").rglob("result.json")
    return state, json.loads(resumed.read_text())
