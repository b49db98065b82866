"""Telemetry, best-of-N validation, prediction samples, `bench eval` / `bench predict` from a kept
checkpoint, the collapse flag and the leaderboard's figures from them: end to end on the tiny protocol."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from bench import registry
from bench.cli import main
from bench.method import Method
from bench.predict import load_npz
from bench.telemetry import children_cpu_seconds, read_metrics
from tests.conftest import TINY, write_protocol


def _runs(results):
    return {p.parent.parent.name: p.parent for p in results.rglob("result.json")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_children_cpu_seconds_sees_a_busy_child_and_not_other_processes():
    busy_then_wait = ("import time\nt = time.process_time()\n"
                      "while time.process_time() - t < 0.3: pass\nimport sys; sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", busy_then_wait], stdin=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while (children_cpu_seconds().get(child.pid, 0.0)) < 0.25 and time.time() < deadline:
            time.sleep(0.05)
        seen = children_cpu_seconds()
        assert seen[child.pid] >= 0.25 and os.getppid() not in seen and os.getpid() not in seen
    finally:
        child.communicate(b"")
    assert child.pid not in children_cpu_seconds()


def test_workers_cpu_time_adds_exited_and_live_workers(monkeypatch):
    """The trainer's account of its loader workers' CPU: a worker that exits keeps its last sample,
    a pid taken by a new worker (less CPU than the old one had) starts a new account, a child that
    was there before the stage started is not counted."""
    from bench import trainer as trainer_module
    # pid 99: a child from before the stage (multiprocessing's resource tracker), in every sample
    samples = iter([{11: 1.0, 12: 2.0, 99: 7.0}, {11: 1.5, 99: 7.0}, {11: 0.2, 13: 4.0, 99: 7.0}])
    monkeypatch.setattr(trainer_module, "children_cpu_seconds", lambda: next(samples))
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)
    trainer.telemetry = {"workers_cpu_done": 0.0, "workers_cpu_live": {}}
    trainer.not_workers = {99}
    for expected in (3.0, 3.5, 1.5 + 2.0 + 0.2 + 4.0):
        trainer._sample_workers()
        assert trainer.workers_cpu_s() == pytest.approx(expected)
    monkeypatch.setattr(trainer_module, "children_cpu_seconds", lambda: None)  # no /proc: unknown from then on
    trainer._sample_workers()
    assert trainer.workers_cpu_s() is None


def test_telemetry_best_of_n_samples_eval_predict_and_figures(tmp_path, cache_dir, capsys):
    protocol = write_protocol(tmp_path, {**TINY, "eval": {**TINY["eval"], "every": 3, "report": "best"}})
    results = tmp_path / "results"
    assert main(["run", "--methods", "ce", "--protocol", str(protocol), "--results-dir", str(results),
                 "--cache-dir", str(cache_dir), "--no-progress", "--keep-checkpoint", "--tensorboard"]) == 0
    out = capsys.readouterr().out
    run = _runs(results)["ce"]
    record = json.loads((run / "result.json").read_text())

    # metrics.jsonl: a line per 10-step window and stage end (8 steps: one), validations at steps 3 and 6
    lines = read_metrics(run / "metrics.jsonl")
    train = [e for e in lines if e["kind"] == "train"]
    val = [e for e in lines if e["kind"] == "val"]
    assert [e["step"] for e in train] == [8] and set(train[0]["parts"]) == {"loss"}
    assert train[0]["lr"] > 0 and set(train[0]["images_per_s"]) == {"labeled"}
    assert [e["step"] for e in val] == [3, 6] and all(0 <= e["miou"] <= 100 for e in val)
    # best-of-N: its own labeled field over the 2 periodic evaluations and the final one; metrics stay final
    best = record["best_validation"]
    assert best["n_evaluations"] == 3 and "optimistic" in best["note"]
    assert best["miou"] == pytest.approx(max([e["miou"] for e in val] + [record["metrics"]["miou"]]), abs=1e-3)
    # timing facts and throughput per view
    assert record["train_cpu_time_s"] > 0 and record["load"]["cpu_count"] >= 1
    if sys.platform.startswith("linux"):  # no loader workers here: none of their time
        assert record["train_worker_cpu_time_s"] == 0.0
    assert set(record["train_images_per_s_by_view"]) == {"labeled"}
    assert record["collapse"]["collapsed"] in (True, False) and "top_class_share" in record["collapse"]
    # TensorBoard: written when installed, else a clear message and the run goes on
    try:
        import torch.utils.tensorboard  # noqa: F401
        assert any((run / "tensorboard").iterdir())
    except ImportError:
        assert "--tensorboard needs the tensorboard package" in out
    # prediction samples: the protocol's first 4 evaluation images once, this run's predictions beside it
    samples = load_npz(run.parent.parent / record["samples_file"])
    preds = load_npz(run / "predictions.npz")
    assert list(samples["ids"]) == list(preds["ids"]) and len(preds["ids"]) == 4
    assert preds["pred_0"].shape == samples["mask_0"].shape == samples["image_0"].shape[:2]

    # bench eval: the kept checkpoint gives the recorded numbers again
    assert main(["eval", "--run", str(run), "--cache-dir", str(cache_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"mIoU {record['metrics']['miou']:.2f}" in out.splitlines()[0]
    assert main(["eval", "--run", str(run), "--cache-dir", str(cache_dir), "--split", "train", "--no-progress"]) == 0
    assert "on split train" in capsys.readouterr().out

    # bench predict: colour masks and overlays of image files
    image = next((cache_dir / "data").rglob("images/*.png"))
    assert main(["predict", "--run", str(run), "--images", str(image), "--out", str(tmp_path / "pred"),
                 "--cache-dir", str(cache_dir)]) == 0
    mask = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}_mask.png"))
    assert mask.shape == (32, 32) and mask.max() < 8
    assert Image.open(tmp_path / "pred" / f"{image.stem}_overlay.png").size == (32, 32)
    assert "disc" in (tmp_path / "pred" / "classes.json").read_text()

    # without a kept checkpoint: a clear error naming the flag
    (cache_dir / "checkpoints").rename(tmp_path / "moved")
    assert main(["eval", "--run", str(run), "--cache-dir", str(cache_dir)]) == 2
    assert "--keep-checkpoint" in capsys.readouterr().err

    # the page: best-of-N column, training curves and prediction overlays
    assert main(["leaderboard", "--results-dir", str(results), "--bootstrap", "10"]) == 0
    page = (results / "leaderboard.md").read_text()
    assert "best-of-N val mIoU (%) ⚠ optimistic" in page and "(N=3)" in page
    assert "](figures/training_curves_tiny.png)" in page and "](figures/predictions_tiny.png)" in page
    assert (results / "figures" / "predictions_tiny.png").stat().st_size > 1000

    # real photographs (here: the same run, its record renamed to a folder dataset) are drawn only
    # when asked: the overlays copy the dataset's images into the published figures
    edited = json.loads((run / "result.json").read_text())
    edited["config"]["protocol"]["dataset"].update(name="folder", root="/data/my_photos")
    (run / "result.json").write_text(json.dumps(edited))
    (results / "figures" / "predictions_tiny.png").unlink()
    assert main(["leaderboard", "--results-dir", str(results), "--bootstrap", "10"]) == 0
    assert "predictions_tiny" not in (results / "leaderboard.md").read_text()
    assert not (results / "figures" / "predictions_tiny.png").exists()
    assert main(["leaderboard", "--results-dir", str(results), "--bootstrap", "10", "--real-photos"]) == 0
    assert "](figures/predictions_tiny.png)" in (results / "leaderboard.md").read_text()


class Constant(Method):
    """Built to collapse: predicts class 0 on every pixel, whatever it learns."""

    name = "constant_for_test"
    needs = frozenset({"pixel_labels"})

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.bias = nn.Parameter(torch.ones(ctx.num_classes))

    def training_step(self, batch, step, stage="train"):
        decay = (self.bias ** 2).sum()
        return {"loss": decay + 0 * batch["labeled"]["image"].mean(), "decay": decay.detach()}

    @torch.no_grad()
    def predict(self, images):
        logits = torch.zeros(images.shape[0], self.ctx.num_classes, *images.shape[-2:], device=images.device)
        logits[:, 0] = 1
        return logits


def test_a_run_built_to_collapse_is_flagged(tmp_path, tiny_protocol, cache_dir, capsys, monkeypatch):
    registry.list_methods()  # discover the real methods first
    monkeypatch.setitem(registry._METHODS, Constant.name, Constant)
    results = tmp_path / "results"
    assert main(["run", "--methods", Constant.name, "--protocol", str(tiny_protocol), "--results-dir", str(results),
                 "--cache-dir", str(cache_dir), "--no-progress", "train.iterations=2"]) == 0
    out = capsys.readouterr().out
    record = json.loads(next(results.rglob("result.json")).read_text())
    assert record["collapse"]["collapsed"] and record["collapse"]["top_class_share"] == 100.0
    assert "COLLAPSED" in out  # the [done] line and the summary table
    summary = out.split("status")[1]
    assert "COLLAPSED: one class on 100.0% of pixels" in summary
    # every loss part a training_step returns reaches metrics.jsonl
    [line] = [e for e in read_metrics(next(results.rglob("metrics.jsonl"))) if e["kind"] == "train"]
    assert set(line["parts"]) == {"loss", "decay"}
