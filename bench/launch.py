"""Where a sweep's runs execute: ``inline`` (this process), ``local`` (a pool of worker processes,
one per GPU or N CPU workers) or ``slurm`` (a submitit job array). Only glue: every run goes through
``runner.run_sweep`` for one plan, which skips a finished run, resumes a checkpointed one and writes
its record atomically, so any launcher can re-submit a sweep and only what is missing is done.
Two processes never work on the same run at once: each takes an exclusive lock on its run folder.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from bench import BenchError
from bench.runner import Outcome, RunPlan, run_sweep

LAUNCHERS = ("inline", "local", "slurm")


# --- local pool -------------------------------------------------------------------------------------

_worker_device = "auto"


def _init_worker(slots, threads: int | None) -> None:
    """Runs first in each fresh (spawned) worker: pin it to one GPU before CUDA is initialised."""
    global _worker_device
    slot = slots.get()
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
        _worker_device = "cuda:0"
    else:
        _worker_device = "cpu"
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_in_worker(plan: RunPlan, results_dir: Path, cache_dir: Path) -> Outcome:
    [outcome] = run_sweep([plan], results_dir, _worker_device, cache_dir, progress=False,
                          log=lambda line: print(f"[pid {os.getpid()}] {line}", flush=True))
    return outcome


def local_slots(device: str, workers: int | None) -> list[int | None]:
    """One slot per worker: a GPU index (CUDA_VISIBLE_DEVICES) or None for a CPU worker."""
    import torch

    from bench.engine import resolve_device

    resolve_device(device)  # an unknown name, or CUDA asked for where there is none: its own clear error
    use_gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_gpu:
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [int(g) for g in gpus.split(",") if g.strip()] if gpus else list(range(torch.cuda.device_count()))
        return ids[:workers] if workers else ids
    if device not in ("auto", "cpu"):
        raise BenchError(f"--launcher local pins whole devices; use --device auto, cuda or cpu (got {device!r})")
    return [None] * (workers or 1)


def launch_local(plans: list[RunPlan], results_dir: Path, cache_dir: Path, device: str = "auto",
                 workers: int | None = None, log=print) -> list[Outcome]:
    slots = local_slots(device, workers)
    ctx = mp.get_context("spawn")  # fresh interpreters: CUDA_VISIBLE_DEVICES is set before torch sees a GPU
    queue = ctx.Queue()
    for slot in slots:
        queue.put(slot)
    threads = None if slots[0] is not None else max(1, (os.cpu_count() or 1) // len(slots))
    log(f"[local] {len(plans)} runs on {len(slots)} workers "
        f"({', '.join(f'GPU {s}' for s in slots) if slots[0] is not None else f'CPU, {threads} threads each'})")
    outcomes: list[Outcome] = []
    with ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=_init_worker, initargs=(queue, threads)) as pool:
        futures = {pool.submit(_run_in_worker, plan, results_dir, cache_dir): plan for plan in plans}
        for future in as_completed(futures):
            plan = futures[future]
            try:
                outcome = future.result()
            except BrokenProcessPool:
                outcome = Outcome(plan, "failed", error="a worker process died; re-run the sweep to finish it")
            except Exception as exc:  # noqa: BLE001 - reported per run, the sweep goes on
                outcome = Outcome(plan, "failed", error=f"{type(exc).__name__}: {exc}")
            log(f"[{outcome.status}] {plan.label}" + (f": {outcome.error}" if outcome.error else ""))
            outcomes.append(outcome)
    order = {id(p): i for i, p in enumerate(plans)}
    return sorted(outcomes, key=lambda o: order.get(id(o.plan), 0))


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
