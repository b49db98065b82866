"""Where a sweep's runs execute: ``inline`` (this process), ``local`` (a process per run, at most
one per GPU, or N CPU workers, at a time) or ``slurm`` (a submitit job array). Only glue: every run goes through
``sweep.run_sweep`` for one plan, which skips a finished run, resumes a checkpointed one and writes
its record atomically, so any launcher can re-submit a sweep and only what is missing is done.
Two processes never work on the same run at once: each takes an exclusive lock on its run folder.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import wait
from pathlib import Path

from bench import BenchError
from bench.device import gpu_slots, threads_per_worker
from bench.record import read_record
from bench.results import FAILURE_FILE, RESULT_FILE, write_json_atomic
from bench.planning import RunPlan
from bench.sweep import Outcome, run_sweep

LAUNCHERS = ("inline", "local", "slurm")


# --- local pool -------------------------------------------------------------------------------------

def _run_in_worker(plan: RunPlan, results_dir: Path, cache_dir: Path, slot: int | None, threads: int | None,
                   conn) -> None:
    """A fresh (spawned) process for one run: pinned to its GPU before CUDA is initialised; sends
    the run's outcome back. If it dies instead (OOM killer, a signal), the parent records that."""
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        [outcome] = run_sweep([plan], results_dir, "cuda:0" if slot is not None else "cpu", cache_dir,
                              progress=False, log=lambda line: print(f"[pid {os.getpid()}] {line}", flush=True))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        return
    except BenchError as exc:  # e.g. the results dir cannot be written: this run fails, said plainly
        outcome = Outcome(plan, "failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - reported for this run, the sweep goes on
        outcome = Outcome(plan, "failed", error=f"{type(exc).__name__}: {exc}")
    conn.send(outcome)
    conn.close()


def _died(plan: RunPlan, exitcode: int | None) -> Outcome:
    """The outcome of a run whose process ended without reporting one; recorded in its failure.json
    unless its record was written first (the process died after finishing the run)."""
    how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    if exitcode is not None and -exitcode == signal.SIGKILL:
        how += ", e.g. the out-of-memory killer"
    reason = (f"its worker process died ({how}); re-run the sweep to resume it from its last checkpoint")
    if (plan.dir / RESULT_FILE).exists():
        return Outcome(plan, "done", record=read_record(plan.dir / RESULT_FILE))
    try:
        write_json_atomic(plan.dir / FAILURE_FILE, {
            "method": plan.method, "protocol": plan.protocol.name, "seed": plan.seed,
            "config_hash": plan.config_hash, "reason": reason, "traceback_tail": [],
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except OSError as exc:
        reason += f" (its {FAILURE_FILE} could not be written: {exc.strerror or exc})"
    return Outcome(plan, "failed", error=reason)


@dataclass
class _Worker:
    proc: object
    receive: object  # the parent's end of the pipe the outcome comes through
    slot: int | None
    outcome: Outcome | None = None
    listening: bool = True  # until the outcome, or EOF, has been read


def launch_local(plans: list[RunPlan], results_dir: Path, cache_dir: Path, device: str = "auto",
                 workers: int | None = None, log=print) -> list[Outcome]:
    """Each run in a process of its own, at most one per slot at a time: a worker that dies (OOM,
    a signal) fails its own run, recorded in its failure.json; the other runs go on."""
    slots = gpu_slots(device, workers)
    ctx = mp.get_context("spawn")  # fresh interpreters: CUDA_VISIBLE_DEVICES is set before CUDA starts
    threads = None if slots[0] is not None else threads_per_worker(len(slots))
    log(f"[local] {len(plans)} runs on {len(slots)} workers "
        f"({', '.join(f'GPU {s}' for s in slots) if slots[0] is not None else f'CPU, {threads} threads each'})")
    pending, free = list(enumerate(plans)), list(slots)
    running: dict[int, _Worker] = {}  # plan index -> its process
    outcomes: dict[int, Outcome] = {}
    try:
        while pending or running:
            while pending and free:
                index, plan = pending.pop(0)
                slot = free.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_run_in_worker, args=(plan, results_dir, cache_dir, slot, threads, send),
                                   daemon=True)
                proc.start()
                send.close()  # the child holds its copy: EOF here once it is gone
                running[index] = _Worker(proc, receive, slot)
            # read outcomes as they come (a large one fills the pipe: the child waits for us to read)
            wait([w.proc.sentinel for w in running.values()]
                 + [w.receive for w in running.values() if w.listening], timeout=5)
            for index, worker in list(running.items()):
                if worker.listening and worker.receive.poll():
                    try:
                        worker.outcome = worker.receive.recv()
                    except Exception:  # noqa: BLE001 - EOF, or died while sending: no outcome
                        pass
                    worker.listening = False
                if worker.proc.is_alive():
                    continue
                worker.proc.join()
                worker.receive.close()
                plan = plans[index]
                outcome = worker.outcome or _died(plan, worker.proc.exitcode)
                outcome.plan = plan
                log(f"[{outcome.status}] {plan.label}" + (f": {outcome.error}" if outcome.error else ""))
                outcomes[index] = outcome
                del running[index]
                free.append(worker.slot)
    finally:  # interrupted: the workers go too (their runs resume from their checkpoints)
        for worker in running.values():
            worker.proc.terminate()
        for worker in running.values():
            worker.proc.join()
    return [outcomes[i] for i in range(len(plans))]


# --- slurm (submitit) --------------------------------------------------------------------------------

class SlurmRun:
    """The job of one array task. On preemption or time-out submitit calls ``checkpoint``, which
    requeues the same run; it resumes from its last checkpoint (the harness writes them)."""

    def __init__(self, results_dir: Path, cache_dir: Path, device: str):
        self.results_dir, self.cache_dir, self.device = Path(results_dir), Path(cache_dir), device

    def __call__(self, plan: RunPlan) -> Outcome:
        [outcome] = run_sweep([plan], self.results_dir, self.device, self.cache_dir, progress=False)
        return outcome

    def checkpoint(self, plan: RunPlan):
        import submitit

        return submitit.helpers.DelayedSubmission(self, plan)


def launch_slurm(plans: list[RunPlan], results_dir: Path, cache_dir: Path, device: str = "auto",
                 folder: Path = Path("slurm_logs"), partition: str | None = None, time_min: int = 240,
                 gpus: int = 1, cpus: int = 8, array_parallelism: int = 64, cluster: str | None = None,
                 wait: bool = False, log=print) -> list[Outcome] | list:
    """Submit one array task per run. ``cluster``: None = Slurm when ``sbatch`` exists; "local" or
    "debug" run the same jobs without Slurm (tests). Returns the outcomes with ``wait``, else the jobs."""
    try:
        import submitit
    except ImportError:
        raise BenchError("--launcher slurm needs submitit: pip install 'bench[slurm]'") from None
    if cluster is None:  # submitit would fall back to running the jobs here, in the background
        if shutil.which("sbatch") is None:
            raise BenchError("--launcher slurm: Slurm is not available here (no sbatch on PATH); "
                             "use --launcher local or inline on this machine")
        cluster = "slurm"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": time_min, "gpus_per_node": gpus, "cpus_per_task": cpus, "tasks_per_node": 1,
              "slurm_array_parallelism": array_parallelism, "name": "bench"}
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    jobs = executor.map_array(SlurmRun(results_dir, cache_dir, device), plans)
    log(f"[slurm] submitted {len(jobs)} runs ({executor.cluster}): job ids {', '.join(j.job_id for j in jobs[:5])}"
        + (" ..." if len(jobs) > 5 else "") + f"; logs in {folder}")
    if not wait:
        return jobs
    outcomes = []
    for plan, job in zip(plans, jobs):
        try:
            outcomes.append(job.result())
        except Exception as exc:  # noqa: BLE001 - a failed job is one failed run
            outcomes.append(Outcome(plan, "failed", error=f"job {job.job_id}: {type(exc).__name__}: {exc}"))
    return outcomes
