"""A killed run resumes from its checkpoint and ends with exactly the metrics of an uninterrupted run."""
import json
import subprocess
import sys
import textwrap

import pytest

import methods.ce as ce
from bench.cli import main
from bench.checkpoint import load_checkpoint


def _run(protocol, results, cache):
    return main(["run", "--methods", "ce", "--protocol", str(protocol), "--seeds", "0", "--results-dir",
                 str(results), "--cache-dir", str(cache), "--no-progress"])


def _record(results):
    [path] = results.rglob("result.json")
    return json.loads(path.read_text())


def _telemetry(results):
    """metrics.jsonl without what a resume may change: timings and the machine's load."""
    from bench.telemetry import read_metrics

    [path] = results.rglob("metrics.jsonl")
    return [{k: v for k, v in e.items() if k not in ("images_per_s", "load_1min")} for e in read_metrics(path)]


@pytest.fixture
def uninterrupted(tmp_path, tiny_protocol, monkeypatch):
    monkeypatch.setattr("bench.trainer.LOG_EVERY", 2)  # lines between checkpoints, to see them kept exact
    assert _run(tiny_protocol, tmp_path / "ref", tmp_path / "ref-cache") == 0
    return _record(tmp_path / "ref")


# 8 iterations, a checkpoint every 3 steps: interrupt before the first checkpoint, between two,
# and on the last step
@pytest.mark.parametrize("kill_step, resumes_at", [(1, None), (4, 3), (7, 6)])
def test_interrupted_run_resumes_to_identical_metrics(tmp_path, tiny_protocol, uninterrupted, monkeypatch,
                                                      kill_step, resumes_at):
    def interrupt(self, step):
        if step == kill_step:
            raise KeyboardInterrupt

    results, cache = tmp_path / "results", tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(ce.CE, "on_step_end", interrupt)
        assert _run(tiny_protocol, results, cache) == 130
    assert not list(results.rglob("result.json"))
    ckpts = list(cache.rglob("*.pt"))
    if resumes_at is None:
        assert not ckpts
    else:
        [ckpt] = ckpts
        assert load_checkpoint(ckpt)["step"] == resumes_at
    assert _run(tiny_protocol, results, cache) == 0
    record = _record(results)
    assert record["resumed_from_step"] == resumes_at
    assert record["metrics"] == uninterrupted["metrics"]
    assert record["config_hash"] == uninterrupted["config_hash"]
    # the telemetry continues from the checkpoint: no line twice, the same window means
    assert _telemetry(results) == _telemetry(tmp_path / "ref")
    assert [e["step"] for e in _telemetry(results)] == [2, 4, 6, 8]


def test_sigkilled_process_resumes_to_identical_metrics(tmp_path, tiny_protocol, uninterrupted):
    results, cache = tmp_path / "results", tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(2)
        import methods.ce as ce
        def die(self, step):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        ce.CE.on_step_end = die
        from bench.cli import main
        main(["run", "--methods", "ce", "--protocol", {str(tiny_protocol)!r}, "--seeds", "0",
              "--results-dir", {str(results)!r}, "--cache-dir", {str(cache)!r}, "--no-progress"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    [ckpt] = cache.rglob("*.pt")
    assert load_checkpoint(ckpt)["step"] == 3
    assert not list(cache.rglob("*.tmp"))  # no torn checkpoint left behind
    assert _run(tiny_protocol, results, cache) == 0
    record = _record(results)
    assert record["resumed_from_step"] == 3
    assert record["metrics"] == uninterrupted["metrics"]
