"""The sweep: each planned run under its folder's lock; a finished run is skipped, a checkpointed
one resumes, a failed one records its failure and the sweep goes on."""
from __future__ import annotations

import os
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench import BenchError, distributed
from bench.checkpoint import checkpoint_path
from bench.device import rank_device, resolve_device
from bench.execution import execute
from bench.planning import RunPlan
from bench.record import RunRecord, read_record, write_record
from bench.results import (FAILURE_FILE, PER_IMAGE_FILE, RESULT_FILE, check_writable, git_commit, remove_orphaned_tmp,
                           run_lock, save_per_image, write_json_atomic)

DEFAULT_CACHE = Path(os.environ.get("BENCH_CACHE_DIR", ".bench_cache"))


@dataclass
class Outcome:
    plan: RunPlan
    status: str  # "done", "skipped", "failed", "busy" (another process holds the run)
    record: RunRecord | None = None
    error: str | None = None


def run_sweep(plans: list[RunPlan], results_dir: Path, device_name: str = "auto", cache_dir: Path = DEFAULT_CACHE,
              progress: bool = True, log=print, keep_checkpoint: bool = False,
              tensorboard: bool = False) -> list[Outcome]:
    """``keep_checkpoint``: leave each finished run's final checkpoint (its weights and method state)
    in the cache instead of deleting it, e.g. to evaluate it again later."""
    check_writable(results_dir)
    device = rank_device(resolve_device(device_name))
    commit = git_commit()  # the code this process loaded, whatever happens to the tree meanwhile
    if not distributed.is_main():
        log = _quiet  # rank 0 speaks for the group
    outcomes = []
    for plan in plans:
        try:
            # under torchrun rank 0 holds the lock and decides; every rank follows its decision
            with (run_lock(plan.dir) if distributed.is_main() else nullcontext(True)) as mine:
                if not distributed.broadcast_flag(mine):
                    log(f"[busy] {plan.label}: another process is running it")
                    outcomes.append(Outcome(plan, "busy"))
                    continue
                outcomes.append(_run_one(plan, device, cache_dir, commit, progress, log, keep_checkpoint, tensorboard))
        except OSError as exc:  # the run folder or its lock cannot be made (full disk, read-only)
            reason = f"cannot write in {plan.dir}: {_os_reason(exc)}"
            log(f"[fail] {plan.label}: {reason}")
            outcomes.append(Outcome(plan, "failed", error=reason))
    return outcomes


def _os_reason(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _quiet(*_):
    pass


def _run_one(plan: RunPlan, device, cache_dir: Path, commit: str | None, progress: bool, log,
             keep_checkpoint: bool = False, tensorboard: bool = False) -> Outcome:
    """One run, under its lock. Whatever goes wrong (training, evaluation, writing the record, a
    record on disk that cannot be read) fails this run only: its failure.json says why."""
    result_path = plan.dir / RESULT_FILE
    if distributed.broadcast_flag(result_path.exists()):
        try:
            record = read_record(result_path)
        except BenchError as exc:  # left as it is: a finished record is never overwritten
            return _failed(plan, f"{exc}; fix or delete it to run again", log)
        stale = record.stale()
        if stale:
            log(f"[stale] {plan.label}: {result_path} {stale}; delete its folder to re-run it")
        else:
            log(f"[skip] {plan.label}: {result_path} exists")
        return Outcome(plan, "skipped", record=record)
    log(f"[run]  {plan.label} on {device}")
    ckpt_path = checkpoint_path(plan, cache_dir)
    try:
        if distributed.is_main():  # what a killed run of this plan left half-written (we hold its lock)
            for directory in (plan.dir, ckpt_path.parent, plan.dir.parent.parent / "splits"):
                remove_orphaned_tmp(directory)
        record, per_image = execute(plan, device, cache_dir, commit, progress, tensorboard)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return _failed(plan, _reason(exc), log)
    if keep_checkpoint:
        record.checkpoint = str(Path(ckpt_path).resolve())
    error = None
    if distributed.is_main():
        try:
            save_per_image(plan.dir / PER_IMAGE_FILE, per_image)
            write_record(result_path, record)  # last: its presence marks the run finished
            (plan.dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure of this run is now superseded
            if not keep_checkpoint:
                ckpt_path.unlink(missing_ok=True)
        except OSError as exc:
            error = f"cannot write the record: {_os_reason(exc)}"
    distributed.barrier()  # the record exists before any rank looks at the next run
    if error is not None:
        return _failed(plan, error, log)
    collapsed = record.collapse["collapsed"]
    log(f"[done] {plan.label}: mIoU {record.metrics.miou:.2f}  pixel acc {record.metrics.pixel_acc:.2f}"
        + (f"  COLLAPSED ({'; '.join(record.collapse['reasons'])})" if collapsed else ""))
    return Outcome(plan, "done", record=record)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BenchError):
        reason = str(exc)
    elif isinstance(exc, OSError):
        reason = f"{type(exc).__name__}: {_os_reason(exc)}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    if "Original Traceback" in reason:  # raised in a loader worker: its last line is the message
        reason = reason.strip().splitlines()[-1].removeprefix("bench.BenchError: ")
    return " ".join(reason.split("\n")).strip()


def _failed(plan: RunPlan, reason: str, log) -> Outcome:
    """Record the failure next to where the run's result would be; a failure that cannot be
    written either (full disk) is still reported, and the sweep goes on."""
    if distributed.is_main():
        try:
            write_json_atomic(plan.dir / FAILURE_FILE, {
                "method": plan.method, "protocol": plan.protocol.name, "seed": plan.seed,
                "config_hash": plan.config_hash, "reason": reason,
                "traceback_tail": traceback.format_exc().splitlines()[-15:],
                "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        except OSError as exc:
            reason += f" (its {FAILURE_FILE} could not be written either: {_os_reason(exc)})"
        log(f"[fail] {plan.label}: {reason}")
    return Outcome(plan, "failed", error=reason)
