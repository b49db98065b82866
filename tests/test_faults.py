"""Fault injection: the catalogue of hostile inputs and faults of issue 15, run as parameterised
cases through the real command line (in process). Each case asserts the exit status, one clear
line naming the file or field (on stderr, or as the reason in the failed run's failure.json), no
traceback, and that the finished record already in the results dir is left byte for byte.

Everything is made here: a 2-class folder dataset of 32x40 images, a protocol that trains for one
step, and one finished run (ce, seed 0) that every case starts from.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bench.cli import main
from bench.method import Method, MethodConfig
from bench.registry import register_method
from bench.results import remove_orphaned_tmp, tmp_owner
from bench.checkpoint import checkpoint_path
from bench.planning import plan_sweep

N_TRAIN, N_VAL = 6, 2
IDS = [f"im{i:02d}" for i in range(N_TRAIN + N_VAL)]
PROTOCOL = {
    "name": "t", "dataset": {"name": "folder"}, "labeled": {"ratio": 1.0, "seed": 0},
    "model": {"backbone": "resnet18", "output_stride": 16, "head_channels": 8},
    "train": {"crop": 32, "scale": [0.75, 1.25], "batch_size": 2, "iterations": 1, "checkpoint_every": 1},
    "eval": {"mode": "whole", "batch_size": 4},
}


def make_folder(root: Path) -> None:
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("0 ground\n1 thing\n255 ignore\n")
    rng = np.random.default_rng(0)
    for image_id in IDS:
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
        write_mask(root, image_id)
    (root / "splits" / "train.txt").write_text("\n".join(IDS[:N_TRAIN]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(IDS[N_TRAIN:]) + "\n")


def write_mask(root: Path, image_id: str, size=(32, 40), bad_pixel: int | None = None) -> None:
    mask = np.zeros(size, np.uint8)
    mask[:, size[1] // 2:] = 1
    if bad_pixel is not None:
        mask[5, 7] = bad_pixel  # one pixel: a 16-pixel resize (nearest) drops it
    Image.fromarray(mask, "L").save(root / "masks" / f"{image_id}.png")


@dataclass
class World:
    """One case's files: the dataset, the protocol, a results dir holding the finished record."""

    root: Path
    data: Path
    protocol: Path
    results: Path
    cache: Path

    def run(self, *extra, seeds="1", protocol=None, methods="ce") -> list[str]:
        # the data root is relative (the case runs in its own folder), so the finished record's
        # config, and hash, are the same in every case's copy
        return ["run", "--methods", methods, "--protocol", str(protocol or self.protocol), "--seeds", seeds,
                "--data-root", "data", "--results-dir", str(self.results), "--cache-dir", str(self.cache),
                "--no-progress", *extra]

    def write_protocol(self, file: str, **over) -> Path:
        """A protocol file ``<file>.yaml`` named ``file`` unless ``over`` says otherwise."""
        path = self.root / f"{file}.yaml"
        path.write_text(yaml.safe_dump({**PROTOCOL, "name": file, **over}))
        return path

    def plan(self, seed: int, *overrides: str):
        [plan] = plan_sweep(["ce"], str(self.protocol), [seed], [*overrides, "dataset.root=data"], self.results)
        return plan


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A dataset, the protocol and one finished run (ce, seed 0), made once for the module."""
    base = tmp_path_factory.mktemp("finished")
    make_folder(base / "data")
    (base / "t.yaml").write_text(yaml.safe_dump(PROTOCOL))
    here = os.getcwd()
    os.chdir(base)
    try:
        assert main(["run", "--methods", "ce", "--protocol", "t.yaml", "--seeds", "0", "--data-root", "data",
                     "--results-dir", "results", "--cache-dir", "cache", "--no-progress"]) == 0
    finally:
        os.chdir(here)
    return base


@pytest.fixture
def world(finished, tmp_path, monkeypatch) -> World:
    monkeypatch.chdir(tmp_path)
    for name in ("data", "results"):
        shutil.copytree(finished / name, tmp_path / name)
    shutil.copy(finished / "t.yaml", tmp_path / "t.yaml")
    return World(tmp_path, tmp_path / "data", tmp_path / "t.yaml", tmp_path / "results", tmp_path / "cache")


def finished_files(results: Path) -> dict[str, bytes]:
    run = next(results.rglob("seed0-*/result.json")).parent
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name in ("result.json", "per_image.npz")}


# --- methods used by the cases (importable by spawned workers: the plan's config class lives here)

@register_method
class KilledWorker(Method):
    """Kills its own process for seed 2 (as the OOM killer would); trains like ce otherwise."""

    name = "_faults_kill"
    needs = frozenset({"pixel_labels"})

    class Config(MethodConfig):
        pass

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if ctx.seed == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        self.model = ctx.build_segmenter()

    def training_step(self, batch, step, stage="train"):
        return {"loss": torch.nn.functional.cross_entropy(self.model(batch["labeled"]["image"]),
                                                          batch["labeled"]["mask"], ignore_index=255)}

    @torch.no_grad()
    def predict(self, images):
        return self.model(images)

    def summary(self):  # a record larger than a pipe's buffer: the parent must read while the child sends
        return {"padding": "x" * 200_000}


@register_method
class Diverges(KilledWorker):
    name = "_faults_nan"

    class Config(MethodConfig):
        pass

    def training_step(self, batch, step, stage="train"):
        return {"loss": super().training_step(batch, step, stage)["loss"] * float("nan")}


# --- the catalogue --------------------------------------------------------------------------------

def _full_disk(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@contextlib.contextmanager
def _tmp_on_a_full_disk(path):
    yield "/dev/full"  # writes to it fail with ENOSPC, as on a full disk


def _mismatched_train_mask(w: World):
    write_mask(w.data, IDS[0], size=(16, 20))  # checked before training, whichever images step 1 draws
    return w.run()


def _mismatched_eval_mask(w: World):
    write_mask(w.data, IDS[-1], size=(16, 20))
    return w.run()


def _mismatch_data_check(w: World):
    write_mask(w.data, IDS[3], size=(16, 20))
    return ["data", "check", "--dataset", "folder", "--data-root", str(w.data), "--no-progress"]


def _name_escapes(w: World):
    return w.run(protocol=w.write_protocol("escape", name="../../../escaped"))


def _split_name_escapes(w: World):
    return w.run(protocol=w.write_protocol("t2", dataset={"name": "folder", "eval_split": "../../val"}))


def _check_split_name_escapes(w: World):
    return ["data", "check", "--dataset", "folder", "--data-root", str(w.data), "--splits", "../splits/train"]


def _corrupt_record_elsewhere(w: World):
    other = w.results / "other" / "ce" / "seed0-0123456789"
    other.mkdir(parents=True)
    (other / "result.json").write_text("{oops")
    return w.run()


def _corrupt_record_in_sweep(content: str):
    def setup(w: World):
        path = w.plan(1).dir / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(content)
        return w.run(seeds="0,1,2")
    return setup


def _per_image_write_fails(w: World, monkeypatch):
    monkeypatch.setattr("bench.sweep.save_per_image", _full_disk)
    return w.run()


def _every_write_fails(w: World, monkeypatch):
    monkeypatch.setattr("bench.sweep.save_per_image", _full_disk)
    monkeypatch.setattr("bench.sweep.write_json_atomic", _full_disk)
    return w.run(seeds="1,2")


def _checkpoint_disk_full(w: World, monkeypatch):
    monkeypatch.setattr("bench.checkpoint.atomic_path", _tmp_on_a_full_disk)
    return w.run("train.iterations=2")


def _run_folder_cannot_be_made(w: World):
    (w.results / "t2").write_text("a file where the protocol's folder goes")
    return w.run(protocol=w.write_protocol("t2"))


def _duplicate_ids(w: World):
    (w.data / "splits" / "train.txt").write_text("\n".join(IDS[:N_TRAIN] + IDS[:2]) + "\n")
    return w.run()


def _duplicate_ids_data_check(w: World):
    _duplicate_ids(w)
    return ["data", "check", "--dataset", "folder", "--data-root", str(w.data), "--no-progress"]


def _duplicate_ids_split_file(w: World):
    (w.root / "mine.txt").write_text(f"{IDS[1]}\n{IDS[2]}\n{IDS[1]}\n")
    return w.run("--split-file", str(w.root / "mine.txt"))


def _duplicate_class_index(w: World):
    (w.data / "classes.txt").write_text("0 ground\n0 thing\n1 sky\n255 ignore\n")
    return ["data", "check", "--dataset", "folder", "--data-root", str(w.data), "--no-progress"]


def _unreadable_split_list(w: World):
    (w.data / "splits" / "train.txt").write_bytes(b"im00\n\xff\xfe\n")
    return w.run()


def _extends_beside_the_file(w: World):
    (w.root / "sub").mkdir()
    shutil.copy(w.protocol, w.root / "sub" / "base.yaml")
    (w.root / "sub" / "child.yaml").write_text("extends: base.yaml\nname: child\n")
    return ["data", "check", "--protocol", str(w.root / "sub" / "child.yaml"), "--data-root", str(w.data),
            "--no-progress"]


def _scalar_record(w: World):
    w.plan(1).dir.mkdir(parents=True)
    (w.plan(1).dir / "result.json").write_text("42\n")
    return ["leaderboard", "--results-dir", str(w.results), "--output", str(w.root / "lb.md"), "--bootstrap", "10"]


def _leaderboard_output_under_a_file(w: World):
    (w.root / "blocker").write_text("x")
    return ["leaderboard", "--results-dir", str(w.results), "--output", str(w.root / "blocker" / "lb.md")]


def _leaderboard_figures_unwritable(w: World):
    (w.results / "figures").write_text("a file where the figures folder goes")
    return ["leaderboard", "--results-dir", str(w.results), "--output", str(w.root / "lb.md"), "--bootstrap", "10"]


def _checkpoint(content: Callable[[Path], None]):
    def setup(w: World):
        path = checkpoint_path(w.plan(1), w.cache)
        path.parent.mkdir(parents=True)
        content(path)
        return w.run()
    return setup


def _mask_value_hidden_by_resize(w: World):
    for image_id in IDS[:N_TRAIN]:
        write_mask(w.data, image_id, bad_pixel=9)
    return w.run("dataset.resize=16", "train.crop=16")


def _split_file_path_escapes(w: World):
    (w.root / "mine.txt").write_text("../x/images/im01\n")
    return w.run("--split-file", str(w.root / "mine.txt"))


def _slurm_without_slurm(w: World, monkeypatch):
    monkeypatch.setattr("bench.launch.shutil.which", lambda name: None)
    return w.run("--launcher", "slurm", "--slurm-folder", str(w.root / "logs"))


def _killed_local_worker(w: World):
    # one worker: the run queued behind the killed one still runs (tests/test_launch.py kills one
    # of two busy workers: the run in flight beside it finishes too)
    return w.run("--launcher", "local", "--workers", "1", seeds="2,1", methods="_faults_kill")


@dataclass
class Case:
    id: str
    setup: Callable  # (world[, monkeypatch]) -> argv
    status: int
    message: str  # a regex the one line must match
    where: str = "stderr"  # or "failure": the reason of the one failed run (failure.json and the [fail] line)
    done: int = 0  # runs this command must finish besides the failed ones (the sweep goes on)
    failed: int = 1  # runs reported failed, when the command ran a sweep (exit 1)
    planted: int = 0  # records the case wrote itself (besides the finished one)


CASES = [
    # 1: an image and its mask of different sizes, wherever they are read
    Case("1-size-mismatch-labeled", _mismatched_train_mask, 1,
         r"image .*images/im0\d\.png is \(32, 40\) but its mask .*masks/im0\d\.png is \(16, 20\)$", "failure"),
    Case("1-size-mismatch-eval", _mismatched_eval_mask, 1,
         r"image .*images/im07\.png is \(32, 40\) but its mask .*masks/im07\.png is \(16, 20\)$", "failure"),
    Case("1-size-mismatch-data-check", _mismatch_data_check, 2, r"im03\.png is \(32, 40\) but its mask .*\(16, 20\)$"),
    # 2: names from user input never leave their folder
    Case("2-protocol-name", _name_escapes, 2, r"escape\.yaml: field name: .*'\.\./\.\./\.\./escaped' is not a plain name"),
    Case("2-split-name", _split_name_escapes, 2, r"field dataset\.eval_split: .*'\.\./\.\./val' is not a plain name"),
    Case("2-split-name-data-check", _check_split_name_escapes, 2, r"split name '\.\./splits/train' is not a plain name"),
    # 3: a record that cannot be read fails its own run only, or nothing
    Case("3-corrupt-unrelated-record", _corrupt_record_elsewhere, 0, r"warning: result record .*other/ce/seed0-0123456789"
         r"/result\.json is not valid JSON.*; left out of these rows$", done=1, planted=1),
    Case("3-corrupt-record-in-sweep", _corrupt_record_in_sweep("{oops"), 1,
         r"result record .*seed1-\w+/result\.json is not valid JSON: .*; fix or delete it to run again$", "failure",
         done=1, planted=1),
    # 4: write errors: the run that hit them fails, recorded where possible; the sweep goes on
    Case("4-per-image-write-fails", _per_image_write_fails, 1,
         r"cannot write the record: No space left on device$", "failure"),
    Case("4-every-write-fails", _every_write_fails, 1,
         r"cannot write the record: No space left on device \(its failure\.json could not be written either: "
         r"No space left on device\)$", "stdout", failed=2),
    Case("4-checkpoint-disk-full", _checkpoint_disk_full, 1,
         r"cannot write checkpoint .*seed1-\w+\.pt: No space left on device$", "failure"),
    Case("4-run-folder-cannot-be-made", _run_folder_cannot_be_made, 1, r"cannot write in .*t2/ce/seed1-\w+: ", "stdout"),
    # 5: a killed local worker fails its own run; the others finish
    Case("5-killed-local-worker", _killed_local_worker, 1,
         r"its worker process died \(signal 9, e\.g\. the out-of-memory killer\); re-run the sweep", "failure", done=1),
    # 6: an id listed twice
    Case("6-duplicate-ids-run", _duplicate_ids, 1, r"splits/train\.txt line 7: id 'im00' is listed twice "
         r"\(first on line 1\)$", "failure"),
    Case("6-duplicate-ids-data-check", _duplicate_ids_data_check, 2, r"splits/train\.txt line 7: id 'im00' is listed twice"),
    Case("6-duplicate-ids-split-file", _duplicate_ids_split_file, 1, r"mine\.txt line 3: id 'im01' is listed twice",
         "failure"),
    Case("6-duplicate-class-index", _duplicate_class_index, 2, r"classes\.txt line 2: class index 0 is listed twice$"),
    Case("6-split-list-not-text", _unreadable_split_list, 1, r"splits/train\.txt is not UTF-8 text \(byte 5\)$", "failure"),
    # 7: extends is read beside the extending file
    Case("7-extends-relative", _extends_beside_the_file, 0, r"^folder dataset at .*: OK", "stdout"),
    # 8: empty lists
    Case("8-empty-seeds", lambda w: w.run(seeds=""), 2, r"argument --seeds: seeds must be integers"),
    Case("8-empty-methods", lambda w: w.run(methods=","), 2, r"argument --methods: expected a comma-separated list"),
    # 9: errors, not tracebacks
    Case("9-bootstrap-0", lambda w: ["leaderboard", "--results-dir", str(w.results), "--bootstrap", "0"], 2,
         r"argument --bootstrap: expected a positive integer, got '0'"),
    Case("9-workers-negative", lambda w: w.run("--launcher", "local", "--workers", "-2"), 2,
         r"argument --workers: expected a positive integer, got '-2'"),
    Case("9-leaderboard-output-unwritable", _leaderboard_output_under_a_file, 2, r"cannot write the leaderboard .*blocker/lb\.md.*: .*blocker: "),
    Case("9-results-dir-unwritable", _leaderboard_figures_unwritable, 2, r"cannot write the leaderboard .*: .*results/figures: "),
    Case("9-record-is-a-json-scalar", _scalar_record, 0,
         r"warning: result record .*result\.json holds a JSON int, not an object; left out of the leaderboard$",
         planted=1),
    Case("9-checkpoint-wrong-structure", _checkpoint(lambda p: torch.save({"weights": torch.zeros(2)}, p)), 1,
         r"checkpoint .*\.pt is not a bench checkpoint \(lacks config_hash, .*\); delete it to start the run over$",
         "failure"),
    # 10: mask values checked as stored, before dataset.resize
    Case("10-mask-value-hidden-by-resize", _mask_value_hidden_by_resize, 1,
         r"mask .*masks/im0\d\.png has label 9 outside 0\.\.1", "failure"),
    # 11: validation gaps
    Case("11-negative-scale", lambda w: w.run("train.scale=[-1,2]"), 2,
         r"field train: .*train\.scale must be \[low, high\] with 0 < low <= high, got \[-1\.0, 2\.0\]"),
    Case("11-lr-inf", lambda w: w.run("train.optimizer.lr=.inf"), 2, r"field train\.optimizer\.lr: .*finite"),
    Case("11-split-file-path-escapes", _split_file_path_escapes, 1,
         r"mine\.txt line 1: '\.\./x/images/im01' tries to leave the data root$", "failure"),
    Case("11-nan-without-checkpoint", lambda w: w.run("train.checkpoint_every=5", methods="_faults_nan"), 1,
         r"loss is nan at step 0 .*; no checkpoint was written before it$", "failure"),
    # 13: a damaged checkpoint: our message, not torch's advice to load it unsafely
    Case("13-corrupt-checkpoint", _checkpoint(lambda p: p.write_bytes(b"PK\x03\x04 not a checkpoint")), 1,
         r"checkpoint .*\.pt is damaged or not a bench checkpoint; delete it to start the run over$", "failure"),
    # 14: no silent fallback to running the jobs here
    Case("14-slurm-without-slurm", _slurm_without_slurm, 2, r"--launcher slurm: Slurm is not available here"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, world: World, monkeypatch, capfd):
    before = finished_files(world.results)
    setup = case.setup
    argv = setup(world, monkeypatch) if setup.__code__.co_argcount == 2 else setup(world)
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's usage errors, as `python -m bench` exits with them
        status = exc.code
    out, err = capfd.readouterr()
    assert status == case.status, out + err
    assert "Traceback" not in err and "Traceback" not in out
    if case.where == "stderr":
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.search(case.message, lines[0]), err
    elif case.where == "stdout":
        assert any(re.search(case.message, line) for line in out.splitlines()), out
    else:
        failures = list(world.results.rglob("failure.json"))
        assert len(failures) == 1, out
        reason = json.loads(failures[0].read_text())["reason"]
        assert "\n" not in reason and re.search(case.message, reason), reason
        assert f": {reason}" in out  # the [fail] line says the same
    if case.status == 1:
        assert len([line for line in out.splitlines() if re.match(r"\[fail(ed)?\] ", line)]) == case.failed, out
    if case.status != 2:  # a sweep that ran: every other run of it finished
        assert len(list(world.results.rglob("result.json"))) == 1 + case.planted + case.done, out
    assert finished_files(world.results) == before
    assert not list(world.root.rglob("*.tmp"))
    assert not (world.root.parent.parent / "escaped").exists()


def test_torch_advice_to_load_unsafely_is_not_repeated(world):
    from bench import BenchError
    from bench.checkpoint import load_checkpoint

    path = world.root / "bad.pt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(BenchError) as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "succeed" not in str(info.value)


def test_half_written_files_of_a_killed_writer_are_removed_on_the_next_run(world):
    """12: a kill during a checkpoint or record write leaves a temp file; the next run of that plan
    removes it (its writer is gone), but never a file a live process is writing."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = tmp_owner().rpartition("-")[0]
    plan = world.plan(1)
    ckpt_dir = checkpoint_path(plan, world.cache).parent
    orphans = [ckpt_dir / f"seed1-x.pt.{host}-{dead.pid}.abc123.tmp", plan.dir / f"result.json.{host}-{dead.pid}.q.tmp"]
    live = ckpt_dir / f"seed1-x.pt.{tmp_owner()}.def456.tmp"
    other_host = ckpt_dir / f"seed1-x.pt.elsewhere-{dead.pid}.ghi789.tmp"
    for path in [*orphans, live, other_host]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a checkpoint")
    assert main(world.run()) == 0
    assert not any(p.exists() for p in orphans)
    assert live.exists() and other_host.exists()
    assert remove_orphaned_tmp(ckpt_dir) == []
