"""End-to-end runs of the tiny protocol: records, skipping, failures, supervision views."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.method import Method
from bench.registry import register_method
from bench.metrics import scores
from bench.record import read_record
from bench.results import load_per_image
from bench.planning import plan_sweep
from bench.sweep import run_sweep

REQUIRED = {"method", "protocol", "seed", "config", "config_hash", "split", "git_commit", "versions", "device",
            "train_time_s", "train_images_per_s", "peak_memory_mb", "metrics", "eval_network", "supervision",
            "schema_version"}


def _records(results_dir, name="result.json"):
    return sorted(results_dir.rglob(name))


def test_ce_run_writes_a_valid_record_and_reruns_skip(tmp_path, tiny_protocol, cache_dir, capsys):
    results = tmp_path / "results"
    args = ["run", "--methods", "ce", "--protocol", str(tiny_protocol), "--seeds", "0", "--results-dir",
            str(results), "--cache-dir", str(cache_dir), "--no-progress", "train.iterations=4"]
    assert main(args) == 0
    [path] = _records(results)
    record = json.loads(path.read_text())
    assert REQUIRED <= set(record)
    m = record["metrics"]
    assert 0 <= m["miou"] <= 100 and 0 <= m["pixel_acc"] <= 100 and m["matching"] == "direct"
    assert set(m["per_class_iou"]) == {"sky", "grass", "water", "road", "disc", "box", "triangle", "cross"}
    assert m["n_images"] == 4
    assert record["split"]["n_labeled"] == 4 and len(record["split"]["labeled_sha256"]) == 64
    split_file = results / "tiny" / record["split"]["file"]
    assert len(split_file.read_text().split()) == 4
    assert hashlib.sha256(split_file.read_bytes()).hexdigest() == record["split"]["labeled_sha256"]
    assert record["config"]["protocol"]["train"]["iterations"] == 4
    assert record["overrides"] == {"train.iterations": 4}
    # threads and, where the system names it, the CPU model: two CPUs can round float sums differently
    assert record["device"].startswith(f"cpu ({torch.get_num_threads()} threads")
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    if names:
        assert record["device"].endswith(f", {names[0]})")
    # the per-image confusion matrices add up to the whole-set metrics
    per_image = load_per_image(path.parent / record["per_image_file"])
    assert per_image.shape == (4, 8, 8)
    assert scores(per_image.sum(0), record["dataset"]["class_names"])["miou"] == pytest.approx(m["miou"])
    out = capsys.readouterr().out
    assert "mIoU" in out and "ce" in out
    assert "leaderboard rows, tiny" in out and "| ce | pixel labels |" in out
    before = path.read_bytes()
    assert main(args) == 0  # same config: skipped, record untouched
    assert "[skip]" in capsys.readouterr().out
    assert path.read_bytes() == before
    assert not list(cache_dir.rglob("*.pt"))  # the finished run's checkpoint is cleaned up


@register_method
class _NaNMethod(Method):
    """Diverges on purpose: the loss is NaN from the first step."""

    name = "_test_nan"
    needs = frozenset({"pixel_labels"})

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.model = ctx.build_segmenter()

    def training_step(self, batch, step, stage="train"):
        return {"loss": self.model(batch["labeled"]["image"]).sum() * float("nan")}

    def predict(self, images):
        return self.model(images)


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_protocol, cache_dir):
    results = tmp_path / "results"
    plans = plan_sweep(["_test_nan", "ce"], str(tiny_protocol), [0], ["train.iterations=2"], results)
    outcomes = run_sweep(plans, results, "cpu", cache_dir, progress=False, log=lambda *_: None)
    assert [o.status for o in outcomes] == ["failed", "done"]
    [failure] = _records(results, "failure.json")
    info = json.loads(failure.read_text())
    assert "loss is nan at step 0" in info["reason"] and info["method"] == "_test_nan"
    assert [p.parent.parent.name for p in _records(results)] == ["ce"]
    read_record(_records(results)[0])


class _Probe(Method):
    """Records what each training batch holds; predicts a constant."""

    seen: list = []

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.w = torch.nn.Parameter(torch.zeros(ctx.num_classes))

    def training_step(self, batch, step, stage="train"):
        type(self).seen.append({view: {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in b.items()}
                                for view, b in batch.items()})
        return {"loss": (self.w ** 2).sum() + 1.0}

    def predict(self, images):
        return self.w.view(1, -1, 1, 1).expand(images.shape[0], -1, *images.shape[-2:])


def _probe(name, needs):
    cls = type(f"Probe_{name}", (_Probe,), {"name": name, "needs": frozenset(needs), "seen": []})
    return register_method(cls)


@pytest.mark.parametrize("needs, views", [
    ((), {"images"}),
    (("image_tags",), {"tagged"}),
    (("unlabeled_images",), {"unlabeled"}),
    (("pixel_labels",), {"labeled"}),
    (("pixel_labels", "unlabeled_images"), {"labeled", "unlabeled"}),
])
def test_views_follow_declared_needs_and_masks_reach_only_pixel_label_methods(
        tmp_path, tiny_protocol, cache_dir, needs, views):
    cls = _probe("_probe_" + "_".join(needs or ("none",)), needs)
    results = tmp_path / "results"
    plans = plan_sweep([cls.name], str(tiny_protocol), [0], ["train.iterations=5"], results)
    [outcome] = run_sweep(plans, results, "cpu", cache_dir, progress=False, log=lambda *_: None)
    assert outcome.status == "done", outcome.error
    assert len(cls.seen) == 5
    for batch in cls.seen:
        assert set(batch) == views
        for view, content in batch.items():
            assert ("mask" in content) == (view == "labeled")
            assert ("tags" in content) == (view == "tagged")
            assert content["image"][1:] == (3, 32, 32)
    # labeled (4 of 16) and unlabeled ids never overlap
    if {"labeled", "unlabeled"} <= views:
        from bench.execution import build_views, prepare_source
        from bench.splits import select_labeled

        plan = plans[0]
        src = prepare_source(plan.protocol, cache_dir, progress=False)
        train = src.split_ids("train")
        built = build_views(cls, src, train, select_labeled(train, plan.protocol.labeled).ids, plan.protocol)
        labeled_ids, unlabeled_ids = set(built["labeled"][0].ids), set(built["unlabeled"][0].ids)
        assert len(labeled_ids) == 4 and len(unlabeled_ids) == 12 and not labeled_ids & unlabeled_ids


def test_atomic_writes_never_leave_partial_files(tmp_path):
    from bench.results import atomic_path, write_json_atomic

    path = tmp_path / "result.json"
    write_json_atomic(path, {"miou": 1.0})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            open(tmp, "w").write('{"miou": 2')  # a writer dying half-way
            raise RuntimeError("killed")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"miou": object()})
    assert json.loads(path.read_text()) == {"miou": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_every_committed_record_keeps_the_hash_a_rerun_computes():
    """Re-running a committed sweep must find its records: the plan of each record's own method,
    protocol, seed and overrides resolves to the record's config hash (fields added to protocols
    later leave the hash while at their defaults)."""
    from bench.planning import plan_sweep

    root = Path(__file__).resolve().parent.parent / "results"
    records = [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]
    assert records, "no committed records"
    for r in records:
        overrides = [f"{k}={json.dumps(v) if isinstance(v, (bool, list)) else v}" for k, v in r["overrides"].items()]
        [plan] = plan_sweep([r["method"]], r["protocol"], [r["seed"]], overrides, root)
        assert plan.config_hash == r["config_hash"], (r["method"], r["protocol"], r["seed"], r["overrides"])


def test_loader_workers_are_capped_at_the_cores_unless_set_on_the_command_line(tmp_path, cache_dir, monkeypatch):
    """A protocol asking for more workers than cores gets the cores (recorded, not hashed); a
    number given on the command line is used as given."""
    from bench import execution
    from tests.conftest import TINY, write_protocol

    monkeypatch.setattr(execution.os, "sched_getaffinity", lambda pid: {0})  # a one-core machine
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert execution.loader_workers(8, user_set=False) == {"requested": 8, "used": 1, "cores": 1, "capped": True}
    assert execution.loader_workers(8, user_set=True)["used"] == 8
    assert execution.loader_workers(0, user_set=False)["used"] == 0
    monkeypatch.setattr(execution.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of one run share the cores
    assert execution.loader_workers(8, user_set=False)["used"] == 4

    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(execution.os, "sched_getaffinity", lambda pid: {0})
    protocol = write_protocol(tmp_path, {**TINY, "train": {**TINY["train"], "num_workers": 3}})
    results = tmp_path / "results"
    args = ["run", "--methods", "ce", "--protocol", str(protocol), "--seeds", "0", "--results-dir", str(results),
            "--cache-dir", str(cache_dir), "--no-progress", "train.iterations=2"]
    assert main(args) == 0
    [path] = _records(results)
    record = json.loads(path.read_text())
    assert record["loader_workers"] == {"requested": 3, "used": 1, "cores": 1, "capped": True}
    assert record["config"]["protocol"]["train"]["num_workers"] == 3  # the protocol's, as asked
    (tmp_path / "p").mkdir()
    plain = plan_sweep(["ce"], str(write_protocol(tmp_path / "p", TINY)), [0], ["train.iterations=2"], results)
    assert record["config_hash"] == plain[0].config_hash  # workers are not part of the identity


def test_every_method_trains_and_evaluates_under_cpu_autocast(tmp_path, tiny_protocol, cache_dir):
    """``train.cpu_amp=true``: bf16 autocast on the CPU, in training and evaluation. ce's every
    convolution computes in bf16 (fp32 without the switch, a run with its own hash); every method
    finishes under it, which is the autocast path GPU users take with ``train.amp``, where a method
    mixing dtypes would fail. (Whole-set passes in a method's hooks, picie's clustering and aepsl's
    mining, run outside the step's autocast, on GPUs as here.)"""
    from bench.registry import list_methods

    methods = [m for m in list_methods() if not m.startswith("_")]  # not the tests' own
    assert len(methods) >= 8
    results = tmp_path / "results"
    common = ["--protocol", str(tiny_protocol), "--results-dir", str(results), "--cache-dir", str(cache_dir),
              "--no-progress", "train.iterations=3", "aepsl.erase_epochs=0.5", "aepsl.max_erase_steps=2"]

    def conv_dtypes_of_run(methods, *overrides):
        seen = set()

        def record_dtype(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d):
                seen.add(output.dtype)

        handle = torch.nn.modules.module.register_module_forward_hook(record_dtype)
        try:
            assert main(["run", "--methods", methods, *common, *overrides]) == 0
        finally:
            handle.remove()
        return seen

    assert conv_dtypes_of_run("ce", "train.cpu_amp=true") == {torch.bfloat16}
    assert conv_dtypes_of_run("ce") == {torch.float32}
    ce = [json.loads(p.read_text()) for p in _records(results / "tiny" / "ce")]
    assert sorted(r["config"]["protocol"]["train"]["cpu_amp"] for r in ce) == [False, True]
    assert len({r["config_hash"] for r in ce}) == 2
    others = [m for m in methods if m != "ce"]
    assert torch.bfloat16 in conv_dtypes_of_run(",".join(others), "train.cpu_amp=true")
    records = [json.loads(p.read_text()) for p in _records(results)]
    assert sorted(r["method"] for r in records if r["config"]["protocol"]["train"]["cpu_amp"]) == sorted(methods)
    assert all(0 <= r["metrics"]["miou"] <= 100 for r in records)


def test_cpu_autocast_warns_where_the_cpu_has_no_bf16_path(tmp_path, tiny_protocol, cache_dir, monkeypatch, capsys):
    """Without oneDNN's bf16 path a bf16 step is many times slower than fp32: the run says so, once,
    and trains anyway (its numbers are right, only slow)."""
    import bench.execution

    def run(results, *overrides):
        return main(["run", "--methods", "ce", "--protocol", str(tiny_protocol), "--results-dir", str(tmp_path / results),
                     "--cache-dir", str(cache_dir), "--no-progress", "train.iterations=2", *overrides])

    monkeypatch.setattr(bench.execution, "cpu_bf16_fast", lambda: False)
    assert run("r", "train.cpu_amp=true") == 0
    err = capsys.readouterr().err
    assert err.count("train.cpu_amp=true, but this CPU has no bf16 path") == 1
    # no warning without the switch, nor where the CPU has the path
    assert run("r") == 0
    monkeypatch.setattr(bench.execution, "cpu_bf16_fast", lambda: True)
    assert run("r2", "train.cpu_amp=true") == 0
    assert "no bf16 path" not in capsys.readouterr().err
