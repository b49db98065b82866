"""One run on two processes (torchrun, gloo on CPU): the split of each global batch, evaluation
equal to a one-process evaluation of the same checkpoint, and methods with cross-image state."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data.views import StepBatchSampler
from bench.engine import evaluate, load_checkpoint
from bench.method import RunContext
from bench.registry import get_method_class
from bench.results import load_per_image
from bench.runner import plan_sweep, prepare_source

from .conftest import TINY, write_protocol

ROOT = Path(__file__).resolve().parent.parent


def test_each_rank_takes_every_world_th_sample_of_the_global_batch():
    whole = list(StepBatchSampler(10, 4, 0, "labeled/train", 0, 6))
    ranks = [list(StepBatchSampler(10, 4, 0, "labeled/train", 0, 6, rank=r, world=2)) for r in range(2)]
    for step, batch in enumerate(whole):
        assert ranks[0][step] == batch[0::2] and ranks[1][step] == batch[1::2]
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        StepBatchSampler(10, 4, 0, "labeled/train", 0, 6, rank=0, world=3)


def _torchrun(tmp_path, protocol, methods, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bench", "run", "--methods", methods, "--protocol", str(protocol), "--device", "cpu",
           "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_process_evaluation_equals_one_process_evaluation_of_the_same_checkpoint(tmp_path):
    protocol = write_protocol(tmp_path, TINY)
    out = _torchrun(tmp_path, protocol, "ce", "--keep-checkpoint")
    assert out.count("[done]") == 1  # rank 0 speaks; one record
    [path] = (tmp_path / "r").rglob("result.json")
    record = json.loads(path.read_text())
    assert record["processes"] == 2
    [ckpt_path] = (tmp_path / "c").rglob("*.pt")

    [plan] = plan_sweep(["ce"], str(protocol), [0], [], tmp_path / "r")
    source = prepare_source(plan.protocol, tmp_path / "c", progress=False)
    p = plan.protocol
    ctx = RunContext(source.num_classes, source.class_names, source.ignore_index, torch.device("cpu"), p.model,
                     p.train.iterations, 0, p.train.optimizer.lr, tuple(p.train.scale), p.train.batch_size)
    method = get_method_class("ce")(plan.method_cfg, ctx)
    method.load_state_dict(load_checkpoint(ckpt_path)["method"])
    metrics, per_image = evaluate(method, source, source.split_ids("val"), p.eval, torch.device("cpu"),
                                  progress=False)
    assert np.array_equal(per_image.numpy(), load_per_image(path.parent / "per_image.npz"))
    assert metrics["miou"] == pytest.approx(record["metrics"]["miou"], abs=1e-12)


def test_methods_with_cross_image_state_run_on_two_processes(tmp_path):
    """prcl (global prototypes summed over the ranks) and pixcontrast with memory (every rank
    enqueues every rank's entries): both finish, one record each."""
    protocol = write_protocol(tmp_path, TINY)
    _torchrun(tmp_path, protocol, "prcl,pixcontrast", "prcl.num_queries=4", "prcl.num_negatives=8",
              "pixcontrast.memory=true", "pixcontrast.memory_size=16", "pixcontrast.warmup_fraction=0",
              "pixcontrast.min_pixels=1")
    records = [json.loads(p.read_text()) for p in (tmp_path / "r").rglob("result.json")]
    assert sorted(r["method"] for r in records) == ["pixcontrast", "prcl"]
    assert all(r["processes"] == 2 for r in records)
