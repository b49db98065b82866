"""Launchers: a local pool of CPU workers, submitit's debug executor for the Slurm path, concurrent
sweeps over one results dir, and a worker killed mid-sweep."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.launch import launch_slurm
from bench.planning import plan_sweep

from .conftest import TINY, write_protocol

ROOT = Path(__file__).resolve().parent.parent


def _records(results: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in results.rglob("result.json")}


def _cli(tmp_path, protocol, *extra):
    return [sys.executable, "-m", "bench", "run", "--methods", "ce", "--protocol", str(protocol), "--seeds", "0,1,2,3",
            "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress", *extra]


def test_local_launcher_runs_a_sweep_on_two_cpu_workers_and_a_rerun_skips_it(tmp_path, tiny_protocol, capfd):
    args = ["run", "--methods", "ce", "--protocol", str(tiny_protocol), "--seeds", "0,1,2,3", "--results-dir",
            str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress", "--launcher", "local",
            "--workers", "2"]
    assert main(args) == 0
    out = capfd.readouterr().out  # the workers' lines too
    assert "4 runs on 2 workers (CPU, " in out
    records = _records(tmp_path / "r")
    assert sorted(r["seed"] for r in records.values()) == [0, 1, 2, 3]
    assert len({line.split("]")[0] for line in out.splitlines() if line.startswith("[pid")}) == 4  # a process per run
    assert main(args) == 0
    lines = lambda text, tag: [line for line in text.splitlines() if line.startswith(tag)]  # noqa: E731
    assert len(lines(out, "[done]")) == 4 and len(lines(capfd.readouterr().out, "[skipped]")) == 4


def test_concurrent_sweeps_share_one_results_dir_without_lost_or_torn_records(tmp_path, tiny_protocol):
    """Two processes given the same sweep at once: every run is done once, by one of them."""
    procs = [subprocess.Popen(_cli(tmp_path, tiny_protocol), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    records = _records(tmp_path / "r")
    assert sorted(r["seed"] for r in records.values()) == [0, 1, 2, 3]
    done = sum(o.count("[done]") for o in outs)
    assert done == 4, outs  # never twice: the other process skipped it or found it busy
    assert not list((tmp_path / "r").rglob("*.tmp"))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_a_worker_killed_mid_sweep_leaves_the_other_records_and_the_rerun_completes(tmp_path):
    protocol = write_protocol(tmp_path, {**TINY, "train": {**TINY["train"], "iterations": 40, "checkpoint_every": 5}})
    main_proc = subprocess.Popen(_cli(tmp_path, protocol, "--launcher", "local", "--workers", "2"), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def workers():
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == main_proc.pid:
                kids.append(int(stat.parent.name))
        return kids

    deadline = time.time() + 300
    while not list((tmp_path / "c").rglob("*.pt")) and time.time() < deadline:  # a run is under way
        time.sleep(0.2)
    victims = [pid for pid in workers() if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert victims, "no worker process found"
    os.kill(victims[0], signal.SIGKILL)
    out = main_proc.communicate(timeout=600)[0]
    assert main_proc.returncode == 1, out  # the killed worker's run failed, and only it
    assert "its worker process died (signal 9" in out
    [failure] = (tmp_path / "r").rglob("failure.json")
    assert "its worker process died (signal 9" in json.loads(failure.read_text())["reason"]
    records = _records(tmp_path / "r")
    assert len(records) == 3 and failure.parent.name not in records
    for record in records.values():  # whatever finished is whole
        assert record["metrics"]["miou"] >= 0
    assert not list((tmp_path / "r").rglob("*.tmp"))
    rerun = subprocess.run(_cli(tmp_path, protocol, "--launcher", "local", "--workers", "2"), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(r["seed"] for r in _records(tmp_path / "r").values()) == [0, 1, 2, 3]


def test_slurm_path_through_submitits_debug_executor(tmp_path, tiny_protocol):
    pytest.importorskip("submitit")
    plans = plan_sweep(["ce"], str(tiny_protocol), [0, 1], [], tmp_path / "r")
    outcomes = launch_slurm(plans, tmp_path / "r", tmp_path / "c", device="cpu", folder=tmp_path / "logs",
                            cluster="debug", wait=True)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert sorted(r["seed"] for r in _records(tmp_path / "r").values()) == [0, 1]
    again = launch_slurm(plans, tmp_path / "r", tmp_path / "c", device="cpu", folder=tmp_path / "logs",
                         cluster="debug", wait=True)
    assert [o.status for o in again] == ["skipped", "skipped"]


def test_a_requeued_slurm_task_resubmits_the_same_run():
    from bench.launch import SlurmRun

    run = SlurmRun(Path("r"), Path("c"), "cpu")
    delayed = run.checkpoint("plan")
    assert delayed.function is run and delayed.args == ("plan",)
