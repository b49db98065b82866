"""One run on two processes (torchrun, gloo on CPU): the split of each global batch, evaluation
equal to a one-process evaluation of the same checkpoint, and methods with cross-image state."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench import distributed
from bench.data.views import StepBatchSampler
from bench.checkpoint import load_checkpoint
from bench.evaluation import evaluate
from bench.trainer import Trainer
from bench.method import Method, MethodConfig, RunContext, Stage
from bench.protocol import TrainSpec
from bench.registry import get_method_class
from bench.results import load_per_image
from bench.execution import prepare_source
from bench.planning import plan_sweep

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


# --- DistributedDataParallel in the engine: two gloo processes against one ---------------------------

class _Pixels(torch.utils.data.Dataset):
    """12 fixed 8 px images whose every pixel is labeled: each rank's mean loss over its equal share is
    then the global mean's share, so two processes must train what one does on the global batch."""

    def __len__(self):
        return 12

    def __getitem__(self, item):
        i, _ = item
        gen = torch.Generator().manual_seed(i)
        image = torch.randn(3, 8, 8, generator=gen)
        return {"image": image, "mask": (image[0] > 0).long() + (image[1] > 0).long(), "index": i}


class _TwoStages(Method):
    """No BatchNorm (per-rank batch statistics would differ from the global batch's). Stage ``body``
    trains the body and a head that some steps leave unused; stage ``head`` another head on the
    frozen body; a frozen copy (a teacher) runs in every step. ``stop_at``: raise after that step."""

    name = "two_stages"
    stop_at: int | None = None

    def __init__(self):
        super().__init__(MethodConfig(), None)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(6, 3, 1)
        self.sometimes = torch.nn.Conv2d(6, 3, 1)
        self.other_head = torch.nn.Conv2d(6, 3, 1)
        self.teacher = copy.deepcopy(self.body).requires_grad_(False)

    def stages(self):
        return [Stage("body", 6), Stage("head", 3)]

    def param_groups(self, stage="train"):
        if stage == "body":
            return [{"params": [*self.body.parameters(), *self.head.parameters()]},
                    {"params": list(self.sometimes.parameters()), "lr_mult": 2.0}]
        return [{"params": list(self.other_head.parameters())}]

    def unused_parameters(self, stage="train"):
        return stage == "body"

    def training_step(self, batch, step, stage="train"):
        x, y = batch["labeled"]["image"], batch["labeled"]["mask"]
        with torch.no_grad():
            hint = self.teacher(x).mean()
        if stage == "head":
            with torch.no_grad():
                feats = self.body(x)
            return {"loss": F.cross_entropy(self.other_head(feats), y)}
        feats = self.body(x)
        loss = F.cross_entropy(self.head(feats), y) + F.cross_entropy(self.head(feats.flip(-1)), y.flip(-1))
        if step % 2:  # a term only every other step: ``sometimes`` has no gradient on the others
            loss = loss + F.cross_entropy(self.sometimes(feats), y)
        return {"loss": loss, "hint": hint}

    def on_step_end(self, step):
        if step == self.stop_at:
            raise KeyboardInterrupt


def _train(ckpt: Path, out: Path, stop_at: int | None = None) -> None:
    torch.manual_seed(0)
    method = _TwoStages()
    method.stop_at = stop_at
    spec = TrainSpec(crop=8, batch_size=4, iterations=6, checkpoint_every=3)
    trainer = Trainer(method, {"labeled": (_Pixels(), 4)}, spec, torch.device("cpu"), 0, ckpt, "h", progress=False)
    try:
        trainer.run()
    except KeyboardInterrupt:
        return
    if distributed.is_main():
        torch.save(method.state_dict(), out)


def _rank(rank: int, tmp: Path) -> None:
    """One rank: a whole run, then a run killed after step 4."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'group'}", rank=rank, world_size=2)
    try:
        _train(tmp / "two.pt", tmp / "two_state.pt")
        _train(tmp / "killed.pt", tmp / "never.pt", stop_at=4)
    finally:
        dist.destroy_process_group()


def test_two_processes_train_what_one_does_on_the_global_batch_and_checkpoints_interchange(tmp_path):
    """DDP over each stage's parameters (a frozen teacher, another stage's head, a parameter without
    a gradient every other step): two gloo processes end where one process does, to float tolerance.
    A two-process run killed after step 4 (checkpoint at step 3) resumes in one process to the same
    result: checkpoints carry no DDP prefix."""
    mp.start_processes(_rank, args=(tmp_path,), nprocs=2, start_method="spawn")
    _train(tmp_path / "one.pt", tmp_path / "one_state.pt")
    one, two = torch.load(tmp_path / "one_state.pt"), torch.load(tmp_path / "two_state.pt")
    assert list(two) == list(one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.manual_seed(0)
    untrained = _TwoStages().state_dict()
    for key in ("body.0.weight", "sometimes.weight", "other_head.weight"):
        assert not torch.equal(one[key], untrained[key]), key  # every stage trained its part

    killed = load_checkpoint(tmp_path / "killed.pt")
    assert killed["step"] == 3 and not (tmp_path / "never.pt").exists()
    assert list(killed["method"]) == list(one)  # no "module." prefix
    _train(tmp_path / "killed.pt", tmp_path / "resumed_state.pt")
    resumed = torch.load(tmp_path / "resumed_state.pt")
    for key in one:
        torch.testing.assert_close(resumed[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
